"""broker/config.py: typed sections, defaults, bounds, endpoints (DESIGN.md §13)."""

from __future__ import annotations

import dataclasses
import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.config import (
    MAX_NUMBER,
    AuditConfig,
    AuthConfig,
    BufferConfig,
    ClusterConfig,
    Config,
    ConfigError,
    ControlConfig,
    HttpConfig,
    IngestConfig,
    LimitsConfig,
    LogConfig,
    NodeConfig,
    OrderConfig,
    PeerConfig,
    ServiceConfig,
    StoreConfig,
    StreamConfig,
    from_mapping,
    load,
    parse_http_bind,
)

ROOT = Path(__file__).resolve().parents[2]

# What check-config printed before the sections were typed (same keys, same
# values), with the hardening keys since (docs/protocol.md "Limits and timeouts").
DEFAULTS: dict[str, Any] = {
    "shutdown_timeout": 5,
    "ingest": {
        "zmq_bind": "tcp://127.0.0.1:5557",
        "max_frame_bytes": 1048576,
        "max_parts": 1000,
        "rcvhwm": 10000,
        "curve_secret_file": "",
        "curve_clients_dir": "",
    },
    "http": {
        "bind": "127.0.0.1:8080",
        "cors_origins": [],
        "backlog": 1024,
        "idle_timeout": 10,
        "body_timeout": 30,
        "body_idle_timeout": 10,
        "max_pending_body_bytes": 64 * 1048576,
    },
    "buffer": {
        "ring_events": 1024,
        "ring_bytes": 1048576,
        "total_bytes": 512 * 1048576,
        "journal_events": 100000,
        "journal_bytes": 64 * 1048576,
        "max_tasks": 10000,
        "max_workflows": 100000,
        "terminal_ttl": 600,
    },
    "order": {"reorder_window_ms": 500, "dedup_window": 100000},
    "stream": {
        "keepalive": 15,
        "retry_ms": 2000,
        "unknown_workflow_wait": 5,
        "coalesce_after": 256,
        "slow_consumer_timeout": 10,
        "ws_ping_interval": 30,
        "ws_pong_timeout": 10,
        "direct_writes": True,
        "compression": False,
    },
    "limits": {"per_user": 5, "per_tenant": 1000, "global": 20000, "events_per_second": 0},
    "auth": {
        "mode": "none",
        "algorithms": ["HS256"],
        "secret": "",
        "secret_file": "",
        "public_key_file": "",
        "jwks_file": "",
        "audience": "",
        "issuer": "",
        "leeway": 30,
    },
    "audit": {"ring_events": 10000},
    "store": {
        "backend": "memory",
        "dsn": "",
        "batch_events": 1000,
        "flush_ms": 50.0,
        "spill_events": 1000000,
        "spill_bytes": 268435456,
        "durable_timeout": 5.0,
        "retention": 604800.0,
        "pool_size": 4,
        "statement_timeout": 10.0,
        "restore_events": 100000,
    },
    "cluster": {
        "bind": "",
        "replay_bind": "",
        "peers": [],
        "announce_interval": 1.0,
        "curve_secret_file": "",
        "curve_peers_dir": "",
    },
    "control": {"bind": "", "curve_secret_file": "", "curve_clients_dir": ""},
    "log": {"level": "info", "format": "text"},
    "service": {"probe_interval": 5.0},
}

SECTION_TYPES = {
    "node": NodeConfig,
    "ingest": IngestConfig,
    "http": HttpConfig,
    "buffer": BufferConfig,
    "order": OrderConfig,
    "stream": StreamConfig,
    "limits": LimitsConfig,
    "auth": AuthConfig,
    "audit": AuditConfig,
    "store": StoreConfig,
    "cluster": ClusterConfig,
    "control": ControlConfig,
    "log": LogConfig,
    "service": ServiceConfig,
}

DURATIONS = [
    ("buffer", "terminal_ttl"),
    ("http", "idle_timeout"),
    ("http", "body_timeout"),
    ("http", "body_idle_timeout"),
    ("stream", "keepalive"),
    ("stream", "unknown_workflow_wait"),
    ("stream", "slow_consumer_timeout"),
    ("stream", "ws_ping_interval"),
    ("stream", "ws_pong_timeout"),
    ("order", "reorder_window_ms"),
    ("stream", "retry_ms"),
    ("limits", "events_per_second"),
]


def error_of(mapping: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        from_mapping(mapping)
    text = str(info.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------ defaults


def test_defaults_are_the_documented_values() -> None:
    cfg = from_mapping({})
    got = cfg.as_dict()
    assert got.pop("node") == {"id": socket.gethostname() or "node"}
    assert got == DEFAULTS
    assert list(got) == list(DEFAULTS)  # key order too: check-config prints it
    assert cfg.source == "<defaults>"
    assert load(None) == cfg


def test_sections_are_typed_frozen_dataclasses() -> None:
    cfg = from_mapping({})
    for name, cls in SECTION_TYPES.items():
        section = getattr(cfg, name)
        assert type(section) is cls
        assert dataclasses.is_dataclass(section)
        assert not hasattr(section, "__dict__")  # slots
        first = dataclasses.fields(section)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, first, getattr(section, first))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.shutdown_timeout = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("section, key", DURATIONS)
def test_durations_are_floats_even_when_given_as_int(section: str, key: str) -> None:
    assert isinstance(getattr(getattr(from_mapping({}), section), key), float)
    cfg = from_mapping({section: {key: 3}})
    value = cfg.as_dict()[section][key]
    assert value == 3.0 and isinstance(value, float)
    assert isinstance(from_mapping({"shutdown_timeout": 2}).shutdown_timeout, float)


def test_counts_bools_lists_keep_their_types() -> None:
    cfg = from_mapping({"buffer": {"ring_events": 7}, "http": {"cors_origins": ["https://a.example"]}})
    assert cfg.buffer.ring_events == 7 and type(cfg.buffer.ring_events) is int
    assert cfg.http.cors_origins == ("https://a.example",)  # frozen: a tuple
    assert cfg.as_dict()["http"]["cors_origins"] == ["https://a.example"]  # printed as a list
    assert cfg.stream.direct_writes is True


@pytest.mark.parametrize("given", [None, ""])
def test_node_id_defaults_to_the_hostname(given: str | None) -> None:
    mapping = {} if given is None else {"node": {"id": given}}
    assert from_mapping(mapping).node.id == (socket.gethostname() or "node")
    assert from_mapping({"node": {"id": "node-a"}}).node.id == "node-a"


def test_config_built_directly_has_the_defaults() -> None:
    assert Config().as_dict() == from_mapping({}).as_dict()
    assert LimitsConfig(global_=3).global_ == 3


# ------------------------------------------------------------------ bounds

# (section, key, value, accepted?) — one row per kind and bound.
BOUNDS: list[tuple[str, str, Any, bool]] = [
    # count: int >= 1, <= MAX_NUMBER
    ("buffer", "ring_events", 1, True),
    ("buffer", "ring_events", MAX_NUMBER, True),
    ("buffer", "ring_events", 0, False),
    ("buffer", "ring_events", -5, False),
    ("buffer", "ring_events", MAX_NUMBER + 1, False),
    ("buffer", "ring_events", 1.5, False),
    ("buffer", "ring_events", 2.0, False),
    ("buffer", "ring_events", True, False),
    ("buffer", "ring_events", "3", False),
    # nonneg: number >= 0
    ("order", "reorder_window_ms", 0, True),
    ("order", "reorder_window_ms", 0.5, True),
    ("order", "reorder_window_ms", MAX_NUMBER, True),
    ("order", "reorder_window_ms", -0.1, False),
    ("order", "reorder_window_ms", math.nan, False),
    ("order", "reorder_window_ms", math.inf, False),
    ("order", "reorder_window_ms", float(MAX_NUMBER) + 1, False),
    ("order", "reorder_window_ms", False, False),
    # duration: seconds >= 0
    ("buffer", "terminal_ttl", 0, True),
    ("buffer", "terminal_ttl", 0.25, True),
    ("buffer", "terminal_ttl", -1, False),
    ("buffer", "terminal_ttl", math.inf, False),
    ("buffer", "terminal_ttl", 10**400, False),  # a huge TOML int: an error, not OverflowError
    # positive: seconds > 0
    ("stream", "keepalive", 0.001, True),
    ("stream", "keepalive", MAX_NUMBER, True),
    ("stream", "keepalive", 0, False),
    ("stream", "keepalive", 0.0, False),
    ("stream", "keepalive", -1, False),
    ("stream", "keepalive", math.nan, False),
    ("stream", "keepalive", "fast", False),
    # bool
    ("stream", "direct_writes", False, True),
    ("stream", "direct_writes", 1, False),
    ("stream", "direct_writes", "true", False),
    # str
    ("node", "id", "n1", True),
    ("node", "id", 5, False),
    ("auth", "issuer", "https://issuer.example", True),
    # strlist
    ("http", "cors_origins", [], True),
    ("http", "cors_origins", ["*"], True),
    ("http", "cors_origins", "*", False),
    ("http", "cors_origins", ["a", 1], False),
    # choices
    ("log", "level", "debug", True),
    ("log", "level", "loud", False),
    ("log", "format", "json", True),
    ("log", "format", "xml", False),
    ("auth", "mode", "none", True),
    ("auth", "mode", "jwt", True),
    ("auth", "mode", "oauth", False),
    ("auth", "leeway", -1, False),
    ("auth", "algorithms", "HS256", False),
    ("store", "backend", "sqlite", False),
    # peers
    ("cluster", "peers", [{"pub": "tcp://a:1", "replay": "tcp://a:2"}, {"pub": "tcp://b:1"}], True),
    ("cluster", "peers", {"pub": "tcp://a:1"}, False),
    ("cluster", "peers", [{"replay": "tcp://a:2"}], False),
    ("cluster", "peers", [{"pub": "tcp://a:1", "other": "x"}], False),
    ("cluster", "peers", [{"pub": ""}], False),
    ("cluster", "peers", ["tcp://a:1"], False),
]


@pytest.mark.parametrize(
    "section, key, value, ok", BOUNDS, ids=[f"{s}.{k}={v!r:.20}-{'ok' if ok else 'bad'}" for s, k, v, ok in BOUNDS]
)
def test_bounds_of_each_kind(section: str, key: str, value: Any, ok: bool) -> None:
    mapping = {section: {key: value}}
    if ok:
        got = from_mapping(mapping).as_dict()[section][key]
        assert got == value
    else:
        text = error_of(mapping)
        assert text.startswith(f"config key '{section}.{key}"), text


# Messages that tests, docs and operators rely on, byte for byte.
MESSAGES: list[tuple[dict[str, Any], str]] = [
    ({"store": {"backend": "postgres"}}, "config key 'store.dsn': store.backend = \"postgres\" needs a dsn"),
    ({"stream": {"keepalive": 0}}, "config key 'stream.keepalive': expected a number of seconds > 0, got int 0"),
    ({"stream": {"keepalive": "fast"}}, "config key 'stream.keepalive': expected a number, got str 'fast'"),
    ({"buffer": {"ring_events": 1.5}}, "config key 'buffer.ring_events': expected an integer, got float 1.5"),
    ({"buffer": {"ring_events": 0}}, "config key 'buffer.ring_events': expected an integer >= 1, got int 0"),
    (
        {"http": {"backlog": MAX_NUMBER + 1}},
        f"config key 'http.backlog': expected a finite number up to {MAX_NUMBER}, got int {MAX_NUMBER + 1}",
    ),
    (
        {"stream": {"unknown_workflow_wait": -1}},
        "config key 'stream.unknown_workflow_wait': expected a non-negative number, got int -1",
    ),
    ({"node": {"id": 5}}, "config key 'node.id': expected a string, got int 5"),
    ({"stream": {"direct_writes": 1}}, "config key 'stream.direct_writes': expected true or false, got int 1"),
    ({"http": {"cors_origins": "*"}}, "config key 'http.cors_origins': expected a list of strings, got str '*'"),
    ({"log": {"level": "loud"}}, "config key 'log.level': must be one of debug, info, warning, error (got 'loud')"),
    ({"auth": {"mode": "basic"}}, "config key 'auth.mode': must be one of none, jwt (got 'basic')"),
    (
        {"auth": {"secret": "s", "secret_file": "/f"}},
        "config key 'auth.secret_file': set auth.secret or auth.secret_file, not both",
    ),
    (
        {"auth": {"mode": "jwt", "algorithms": []}},
        "config key 'auth.algorithms': list at least one algorithm for auth.mode = \"jwt\"",
    ),
    (
        {"cluster": {"peers": [{"pub": 5}]}},
        "config key 'cluster.peers[0]': expected a table with string 'pub' and optional string 'replay'",
    ),
    (
        {"cluster": {"peers": "x"}},
        "config key 'cluster.peers': expected a list of {pub = ..., replay = ...} tables, got str 'x'",
    ),
    ({"stream": {"keepalve": 1}}, "config key 'stream.keepalve': unknown key"),
    ({"streams": {"keepalive": 1}}, "config key 'streams': unknown key"),
    ({"shutdown_timout": 3}, "config key 'shutdown_timout': unknown key"),
    ({"": 1}, "config key '': unknown key"),
    ({"stream": 5}, "config key 'stream': expected a table"),
    (
        {"shutdown_timeout": math.inf},
        f"config key 'shutdown_timeout': expected a finite number up to {MAX_NUMBER}, got float inf",
    ),
    ({"http": {"bind": "nonsense"}}, "config key 'http.bind': expected host:port, got 'nonsense'"),
    (
        {"ingest": {"zmq_bind": "127.0.0.1:5557"}},
        "config key 'ingest.zmq_bind': expected a ZeroMQ endpoint like tcp://127.0.0.1:5557, got '127.0.0.1:5557'",
    ),
    ({"limits": {"global": 0}}, "config key 'limits.global': expected an integer >= 1, got int 0"),
    ({"limits": {"global_": 5}}, "config key 'limits.global_': unknown key"),
]


@pytest.mark.parametrize("mapping, message", MESSAGES, ids=[m for _, m in MESSAGES])
def test_error_messages(mapping: dict[str, Any], message: str) -> None:
    assert error_of(mapping) == message


# ------------------------------------------------------------------ limits.global


def test_limits_global_maps_to_global_() -> None:
    cfg = from_mapping({"limits": {"global": 7}})
    assert cfg.limits.global_ == 7
    assert cfg.as_dict()["limits"]["global"] == 7
    assert "global_" not in cfg.as_dict()["limits"]
    assert from_mapping({}).limits.global_ == 20000


def test_load_reads_limits_global_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[limits]\nglobal = 42\n[stream]\nkeepalive = 2\n[http]\ncors_origins = ["*"]\n')
    cfg = load(path)
    assert cfg.limits.global_ == 42 and cfg.stream.keepalive == 2.0 and cfg.source == str(path)
    assert cfg.http.cors_origins == ("*",)


def test_the_design_cards_cluster_keys_are_accepted() -> None:
    """DESIGN §13 lists `announce_interval` among the keys operators rely
    on: the cluster is not built yet, but its block loads as written."""
    cfg = from_mapping({"cluster": {"bind": "", "replay_bind": "", "peers": [], "announce_interval": 1}})
    assert cfg.cluster.announce_interval == 1.0
    with pytest.raises(ConfigError, match="cluster.announce_interval"):
        from_mapping({"cluster": {"announce_interval": 0}})


# ------------------------------------------------------------------ round trip

CUSTOM: dict[str, Any] = {
    "shutdown_timeout": 2.5,
    "node": {"id": "node-x"},
    "ingest": {"zmq_bind": "ipc:///tmp/broker.sock", "rcvhwm": 5},
    "http": {"bind": "[::1]:9999", "cors_origins": ["https://a.example", "https://b.example"], "backlog": 7},
    "buffer": {"terminal_ttl": 0.5, "max_tasks": 3},
    "order": {"reorder_window_ms": 0},
    "stream": {"keepalive": 0.5, "direct_writes": False},
    "limits": {"global": 9, "events_per_second": 12.5},
    "store": {"batch_events": 10, "flush_ms": 5.0},
    "cluster": {
        "bind": "tcp://127.0.0.1:5558",
        "replay_bind": "tcp://*:*",
        "peers": [{"pub": "tcp://a:1", "replay": "tcp://a:2"}, {"pub": "tcp://b:1"}],
    },
    "control": {"bind": "inproc://control"},
    "log": {"level": "debug", "format": "json"},
}


@pytest.mark.parametrize("mapping", [{}, CUSTOM], ids=["defaults", "custom"])
def test_as_dict_round_trips(mapping: dict[str, Any]) -> None:
    cfg = from_mapping(mapping, "x.toml")
    again = from_mapping(cfg.as_dict(), "x.toml")
    assert again == cfg
    assert again.as_dict() == cfg.as_dict()


def test_as_dict_has_what_was_given() -> None:
    got = from_mapping(CUSTOM).as_dict()
    for name, values in CUSTOM.items():
        if isinstance(values, dict):
            assert got[name] == {**got[name], **values}, name
        else:
            assert got[name] == values
    assert got["cluster"]["peers"] == [{"pub": "tcp://a:1", "replay": "tcp://a:2"}, {"pub": "tcp://b:1"}]
    assert from_mapping(CUSTOM).cluster.peers == (PeerConfig("tcp://a:1", "tcp://a:2"), PeerConfig("tcp://b:1"))


# ------------------------------------------------------------------ endpoints

ZMQ_KEYS = ["ingest.zmq_bind", "cluster.bind", "cluster.replay_bind", "control.bind"]


def at(path: str, value: Any) -> dict[str, Any]:
    section, key = path.split(".")
    return {section: {key: value}}


@pytest.mark.parametrize("path", ZMQ_KEYS)
@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:65535",
        "tcp://*:5557",
        "tcp://[::1]:5557",
        "tcp://eth0:5557",
        "ipc:///tmp/broker.sock",
        "ipc://@abstract",
        "inproc://broker",
    ],
)
def test_good_zmq_endpoints(path: str, endpoint: str) -> None:
    cfg = from_mapping(at(path, endpoint))
    section, key = path.split(".")
    assert getattr(getattr(cfg, section), key) == endpoint


@pytest.mark.parametrize("path", ZMQ_KEYS)
@pytest.mark.parametrize("port", ["99999", "65536", "-1", pytest.param("9" * 5000, id="5000-digits")])
def test_zmq_port_out_of_range(path: str, port: str) -> None:
    endpoint = f"tcp://127.0.0.1:{port}"
    assert error_of(at(path, endpoint)) == f"config key '{path}': port out of range (0-65535) in {endpoint!r}"


@pytest.mark.parametrize("path", ZMQ_KEYS)
@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1", "tcp://:5557", "tcp://127.0.0.1:", "tcp://h:x", "tcp://h:+5"])
def test_zmq_endpoint_syntax(path: str, endpoint: str) -> None:
    assert error_of(at(path, endpoint)) == f"config key '{path}': expected tcp://host:port, got {endpoint!r}"


@pytest.mark.parametrize("path", ZMQ_KEYS)
def test_zmq_endpoint_scheme(path: str) -> None:
    text = error_of(at(path, "udp://127.0.0.1:5557"))
    assert text.startswith(f"config key '{path}': expected a ZeroMQ endpoint like tcp://")


def test_empty_endpoint_means_off_except_for_ingest() -> None:
    cfg = from_mapping({"cluster": {"bind": "", "replay_bind": ""}, "control": {"bind": ""}})
    assert cfg.cluster.bind == cfg.cluster.replay_bind == cfg.control.bind == ""
    assert "expected a ZeroMQ endpoint" in error_of({"ingest": {"zmq_bind": ""}})


@pytest.mark.parametrize(
    "peers, message",
    [
        (
            [{"pub": "tcp://a:99999"}],
            "config key 'cluster.peers[0].pub': port out of range (0-65535) in 'tcp://a:99999'",
        ),
        (
            [{"pub": "tcp://a:1"}, {"pub": "tcp://b:1", "replay": "tcp://b:70000"}],
            "config key 'cluster.peers[1].replay': port out of range (0-65535) in 'tcp://b:70000'",
        ),
        ([{"pub": "tcp://a"}], "config key 'cluster.peers[0].pub': expected tcp://host:port, got 'tcp://a'"),
        (
            [{"pub": "a:1"}],
            "config key 'cluster.peers[0].pub': expected a ZeroMQ endpoint like tcp://127.0.0.1:5557, got 'a:1'",
        ),
        (
            [{"pub": "tcp://a:*"}],
            "config key 'cluster.peers[0].pub': a peer endpoint needs a port number 1-65535, got 'tcp://a:*'",
        ),
        (
            [{"pub": "tcp://a:1", "replay": "tcp://a:0"}],
            "config key 'cluster.peers[0].replay': a peer endpoint needs a port number 1-65535, got 'tcp://a:0'",
        ),
    ],
)
def test_peer_endpoints(peers: list[dict[str, str]], message: str) -> None:
    assert error_of({"cluster": {"peers": peers}}) == message


@pytest.mark.parametrize(
    "bind, expected",
    [
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_good_http_binds(bind: str, expected: tuple[str, int]) -> None:
    assert parse_http_bind(bind) == expected
    assert from_mapping({"http": {"bind": bind}}).http.bind == bind


@pytest.mark.parametrize(
    "bind",
    ["127.0.0.1:80800", "127.0.0.1:65536", "[::1]:99999", "h:-1", pytest.param("h:" + "9" * 5000, id="5000-digits")],
)
def test_http_port_out_of_range(bind: str) -> None:
    message = f"config key 'http.bind': port out of range (0-65535) in {bind!r}"
    assert error_of({"http": {"bind": bind}}) == message
    with pytest.raises(ConfigError, match=r"port out of range \(0-65535\)"):
        parse_http_bind(bind)


@pytest.mark.parametrize("bind", ["nonsense", "127.0.0.1:", ":8080", "127.0.0.1:http", "h:²", "h:+80", ""])
def test_http_bind_syntax(bind: str) -> None:
    assert error_of({"http": {"bind": bind}}) == f"config key 'http.bind': expected host:port, got {bind!r}"


# ------------------------------------------------------------------ files and the CLI


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[stream\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(bad)


def test_check_config_refuses_a_port_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[ingest]\nzmq_bind = "tcp://127.0.0.1:99999"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", "-c", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, proc.stderr
    assert "ingest.zmq_bind" in lines[0] and "port out of range" in lines[0], lines[0]


def test_total_bytes_must_hold_at_least_one_full_ring() -> None:
    text = error_of({"buffer": {"total_bytes": 1000, "ring_bytes": 2000}})
    assert "buffer.total_bytes" in text and "buffer.ring_bytes" in text
    assert from_mapping({"buffer": {"total_bytes": 2000, "ring_bytes": 2000}}).buffer.total_bytes == 2000
