"""Configuration: `broker.toml` → a validated, frozen `Config` (DESIGN.md §13).

Every key has a default; unknown sections/keys and wrong types are errors
that name the key (`ConfigError`, printed as one line by the CLI). Durations
are seconds (int or float), sizes bytes. Keys of later features (auth, store,
cluster, control) are validated now so a config written for them is checked,
even where the feature is not built yet.
"""

from __future__ import annotations

import math
import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

MAX_NUMBER = 2**31 - 1  # socket options and counts are C ints


class ConfigError(Exception):
    """A config problem; str() is one line naming the key."""


# (type, default). "count" = int >= 1; "nonneg" = number >= 0; "duration" =
# seconds >= 0; "positive" = seconds > 0 (a zero keepalive would busy-loop).
# Every number must be finite and at most MAX_NUMBER.
_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "node": {"id": ("str", "")},
    "ingest": {
        "zmq_bind": ("str", "tcp://127.0.0.1:5557"),
        "max_frame_bytes": ("count", 1048576),
        "rcvhwm": ("count", 10000),
    },
    "http": {
        "bind": ("str", "127.0.0.1:8080"),
        "cors_origins": ("strlist", []),
        "backlog": ("count", 1024),
    },
    "buffer": {
        "ring_events": ("count", 1024),
        "ring_bytes": ("count", 1048576),
        "journal_events": ("count", 100000),
        "journal_bytes": ("count", 64 * 1048576),
        "max_tasks": ("count", 10000),
        "max_workflows": ("count", 100000),
        "terminal_ttl": ("duration", 600),
    },
    "order": {"reorder_window_ms": ("nonneg", 500), "dedup_window": ("count", 100000)},
    "stream": {
        "keepalive": ("positive", 15),
        "retry_ms": ("nonneg", 2000),
        "unknown_workflow_wait": ("duration", 5),
        "coalesce_after": ("count", 256),
        "slow_consumer_timeout": ("positive", 10),
        "ws_ping_interval": ("positive", 30),
        "ws_pong_timeout": ("positive", 10),
        "direct_writes": ("bool", True),
    },
    "limits": {
        "per_user": ("count", 5),
        "per_tenant": ("count", 1000),
        "global": ("count", 20000),
        "events_per_second": ("nonneg", 0),
    },
    "auth": {"mode": ("str", "none")},
    "store": {"backend": ("str", "memory"), "dsn": ("str", "")},
    "cluster": {"bind": ("str", ""), "replay_bind": ("str", ""), "peers": ("peers", [])},
    "control": {"bind": ("str", "")},
    "log": {"level": ("str", "info"), "format": ("str", "text")},
    "": {"shutdown_timeout": ("duration", 5)},
}

_CHOICES = {
    ("auth", "mode"): ("none",),  # "jwt" arrives with auth (DESIGN §7)
    ("store", "backend"): ("memory",),  # "postgres" arrives with the store (§10)
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("log", "format"): ("text", "json"),
}


class Section:
    """Attribute access to one validated section."""

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        self._name = name
        self.__dict__.update(values)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass(frozen=True)
class Config:
    node: Section
    ingest: Section
    http: Section
    buffer: Section
    order: Section
    stream: Section
    limits: Section
    auth: Section
    store: Section
    cluster: Section
    control: Section
    log: Section
    shutdown_timeout: float
    source: str

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shutdown_timeout": self.shutdown_timeout}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                out[f.name] = value.as_dict()
        return out


def _check(path: str, kind: str, value: Any) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{path}': expected {expected}, got {type(value).__name__} {value!r}")

    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind in ("count", "nonneg", "duration", "positive"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if isinstance(value, float) and kind == "count":
            raise bad("an integer")
        if not math.isfinite(value) or value > MAX_NUMBER:
            raise bad(f"a finite number up to {MAX_NUMBER}")
        if kind == "count" and value < 1:
            raise bad("an integer >= 1")
        if kind == "positive" and value <= 0:
            raise bad("a number of seconds > 0")
        if value < 0:
            raise bad("a non-negative number")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return list(value)
    if kind == "peers":
        if not isinstance(value, list):
            raise bad("a list of {pub = ..., replay = ...} tables")
        for i, peer in enumerate(value):
            if (
                not isinstance(peer, dict)
                or set(peer) - {"pub", "replay"}
                or "pub" not in peer
                or not all(isinstance(v, str) and v for v in peer.values())
            ):
                raise ConfigError(
                    f"config key '{path}[{i}]': expected a table with string 'pub' and optional string 'replay'"
                )
        return value
    raise AssertionError(kind)


def from_mapping(data: dict[str, Any], source: str = "<defaults>") -> Config:
    sections: dict[str, Any] = {}
    for name, spec in _SCHEMA.items():
        if name == "":
            continue
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"config key '{name}': expected a table")
        for key in raw:
            if key not in spec:
                raise ConfigError(f"config key '{name}.{key}': unknown key")
        values = {}
        for key, (kind, default) in spec.items():
            path = f"{name}.{key}"
            value = _check(path, kind, raw[key]) if key in raw else default
            choices = _CHOICES.get((name, key))
            if choices is not None and value not in choices:
                raise ConfigError(f"config key '{path}': must be one of {', '.join(choices)} (got {value!r})")
            values[key] = value
        sections[name] = Section(name, values)
    for key in data:
        if key == "" or (key not in _SCHEMA and key not in _SCHEMA[""]):
            raise ConfigError(f"config key '{key}': unknown key")
    top = {k: (_check(k, kind, data[k]) if k in data else d) for k, (kind, d) in _SCHEMA[""].items()}
    if not sections["node"].id:
        sections["node"].id = socket.gethostname() or "node"
    _check_binds(sections)
    return Config(**sections, shutdown_timeout=top["shutdown_timeout"], source=source)


def _check_binds(sections: dict[str, Any]) -> None:
    zmq_bind = sections["ingest"].zmq_bind
    if not zmq_bind.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(
            f"config key 'ingest.zmq_bind': expected a ZeroMQ endpoint like tcp://127.0.0.1:5557, got {zmq_bind!r}"
        )
    parse_http_bind(sections["http"].bind)


def parse_http_bind(bind: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(f"config key 'http.bind': expected host:port, got {bind!r}")
    return host.strip("[]"), int(port)


def load(path: str | Path | None) -> Config:
    if path is None:
        return from_mapping({})
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {p}: {exc.strerror}") from None
    return from_mapping(data, str(p))
