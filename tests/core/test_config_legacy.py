"""Config bounds through `from_mapping` (broker/config.py): out-of-range
values are one-line errors naming the key, and the boundaries themselves pass.

Kept apart from tests/core/test_config.py, which covers the config module as a
whole; these came in with the review fixes and test only the bounds.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from broker.config import ConfigError, from_mapping
from broker.server.hub import limits_from_config

MAX_NUMBER = 2**31 - 1  # config numbers are C ints


BAD_MAPPINGS = [
    ("nan duration", {"stream": {"unknown_workflow_wait": math.nan}}, "stream.unknown_workflow_wait"),
    ("inf duration", {"buffer": {"terminal_ttl": math.inf}}, "buffer.terminal_ttl"),
    ("nan keepalive", {"stream": {"keepalive": math.nan}}, "stream.keepalive"),
    ("nan nonneg", {"order": {"reorder_window_ms": math.nan}}, "order.reorder_window_ms"),
    ("inf top-level", {"shutdown_timeout": math.inf}, "shutdown_timeout"),
    ("backlog over int32", {"http": {"backlog": MAX_NUMBER + 1}}, "http.backlog"),
    ("rcvhwm over int32", {"ingest": {"rcvhwm": 2**31}}, "ingest.rcvhwm"),
    ("huge duration", {"stream": {"ws_pong_timeout": 1e300}}, "stream.ws_pong_timeout"),
    ("zero keepalive", {"stream": {"keepalive": 0}}, "stream.keepalive"),
    ("zero slow_consumer_timeout", {"stream": {"slow_consumer_timeout": 0}}, "stream.slow_consumer_timeout"),
    ("zero ws_ping_interval", {"stream": {"ws_ping_interval": 0.0}}, "stream.ws_ping_interval"),
    ("empty top-level key", {"": 1}, "''"),
    ("empty top-level table", {"": {"shutdown_timeout": 1}}, "''"),
    ("peer pub not a string", {"cluster": {"peers": [{"pub": 5}]}}, "cluster.peers[0]"),
    (
        "peer replay not a string",
        {"cluster": {"peers": [{"pub": "tcp://a:1"}, {"pub": "tcp://b:1", "replay": 7}]}},
        "cluster.peers[1]",
    ),
    ("peer pub empty", {"cluster": {"peers": [{"pub": ""}]}}, "cluster.peers[0]"),
]


@pytest.mark.parametrize("mapping, needle", [c[1:] for c in BAD_MAPPINGS], ids=[c[0] for c in BAD_MAPPINGS])
def test_config_rejects_out_of_range_values(mapping: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(mapping)
    text = str(info.value)
    assert "\n" not in text
    assert f"config key '{needle}" in text or needle in text, text


def test_config_accepts_the_boundaries() -> None:
    cfg = from_mapping(
        {
            "http": {"backlog": MAX_NUMBER},
            "ingest": {"rcvhwm": MAX_NUMBER},
            "stream": {"keepalive": 0.001, "unknown_workflow_wait": 0, "ws_ping_interval": 0.5},
            "order": {"reorder_window_ms": 0},
            "cluster": {"peers": [{"pub": "tcp://a:1", "replay": "tcp://a:2"}, {"pub": "tcp://b:1"}]},
            "buffer": {"journal_bytes": 12345, "max_tasks": 7},
            "shutdown_timeout": 0,
        }
    )
    assert cfg.http.backlog == MAX_NUMBER and cfg.stream.keepalive == 0.001
    limits = limits_from_config(cfg)
    assert limits.journal_bytes == 12345 and limits.max_tasks == 7
