"""Configuration: `broker.toml` → a validated, frozen `Config` (DESIGN.md §13).

Every key has a default; unknown sections/keys and wrong types are errors
that name the key (`ConfigError`, printed as one line by the CLI). Durations
are seconds (int or float in TOML, `float` here), sizes bytes. Keys of later
features (auth, store, cluster, control) are validated now so a config
written for them is checked, even where the feature is not built yet.

Each section is a frozen dataclass; each field declares, next to its type
and default, how its TOML value is checked (`_key(default, kind)`). A new
section is a new dataclass and one more field of `Config`.
"""

from __future__ import annotations

import math
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_type_hints

MAX_NUMBER = 2**31 - 1  # socket options and counts are C ints

_T = TypeVar("_T")

# How a key's TOML value is checked (and converted):
#   "str"        a string (optionally one of `choices`)
#   "count"      int >= 1
#   "nonneg"     number >= 0, as float
#   "duration"   seconds >= 0, as float
#   "positive"   seconds > 0, as float (a zero keepalive would busy-loop)
#   "bool"       true or false
#   "strlist"    list of strings, as a tuple
#   "zmq_bind"   a ZeroMQ endpoint (tcp://host:port, ipc://…, inproc://…)
#   "zmq_opt"    the same, or "" (= feature off)
#   "http_bind"  host:port or [v6]:port
#   "peers"      list of {pub = endpoint, replay = endpoint} tables
# Every number must be finite and at most MAX_NUMBER; tcp ports 0-65535.
Kind = Literal[
    "str", "count", "nonneg", "duration", "positive", "bool", "strlist", "zmq_bind", "zmq_opt", "http_bind", "peers"
]


class ConfigError(Exception):
    """A config problem; str() is one line naming the key."""


def _key(default: _T, kind: Kind, *, toml: str = "", choices: tuple[str, ...] = (), secret: bool = False) -> _T:
    """A config field: its default, its check, (if it differs from the
    field name) its TOML key, and whether it is a secret (shown as ***)."""
    return field(default=default, metadata={"kind": kind, "toml": toml, "choices": choices, "secret": secret})


def _key_factory(factory: Callable[[], _T], kind: Kind) -> _T:
    return field(default_factory=factory, metadata={"kind": kind, "toml": "", "choices": ()})


def _hostname() -> str:
    return socket.gethostname() or "node"


class _Section:
    """Base of the section dataclasses (no state of its own)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        """The section as TOML would spell it (TOML key names, lists);
        a secret that is set shows as "***"."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[_toml_name(f)] = "***" if f.metadata.get("secret") and value else _plain(value)
        return out


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One `cluster.peers` entry; `replay = ""` when the table has none."""

    pub: str
    replay: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"pub": self.pub, "replay": self.replay} if self.replay else {"pub": self.pub}


@dataclass(frozen=True, slots=True)
class NodeConfig(_Section):
    id: str = _key_factory(_hostname, "str")  # "" in TOML also means the hostname


@dataclass(frozen=True, slots=True)
class IngestConfig(_Section):
    zmq_bind: str = _key("tcp://127.0.0.1:5557", "zmq_bind")
    max_frame_bytes: int = _key(1048576, "count")
    max_parts: int = _key(1000, "count")  # parts of one ZMQ multipart message; the rest: too_large
    rcvhwm: int = _key(10000, "count")
    # CURVE (DESIGN §7): the broker's .key_secret, and the engines' public .key files.
    curve_secret_file: str = _key("", "str")
    curve_clients_dir: str = _key("", "str")


@dataclass(frozen=True, slots=True)
class HttpConfig(_Section):
    bind: str = _key("127.0.0.1:8080", "http_bind")
    cors_origins: tuple[str, ...] = _key((), "strlist")
    backlog: int = _key(1024, "count")
    # A connection with no request in progress (and one still sending its
    # request's head) is closed after this long.
    idle_timeout: float = _key(10.0, "positive")
    body_timeout: float = _key(30.0, "positive")  # a request body, from its head to its last byte
    body_idle_timeout: float = _key(10.0, "positive")  # a request body that sends nothing for this long
    max_pending_body_bytes: int = _key(64 * 1048576, "count")  # bodies being read, all requests together


@dataclass(frozen=True, slots=True)
class BufferConfig(_Section):
    ring_events: int = _key(1024, "count")
    ring_bytes: int = _key(1048576, "count")
    total_bytes: int = _key(512 * 1048576, "count")  # every ring together (DESIGN §13)
    journal_events: int = _key(100000, "count")
    journal_bytes: int = _key(64 * 1048576, "count")
    max_tasks: int = _key(10000, "count")
    max_workflows: int = _key(100000, "count")
    terminal_ttl: float = _key(600.0, "duration")


@dataclass(frozen=True, slots=True)
class OrderConfig(_Section):
    reorder_window_ms: float = _key(500.0, "nonneg")
    dedup_window: int = _key(100000, "count")


@dataclass(frozen=True, slots=True)
class StreamConfig(_Section):
    keepalive: float = _key(15.0, "positive")
    retry_ms: float = _key(2000.0, "nonneg")
    unknown_workflow_wait: float = _key(5.0, "duration")
    coalesce_after: int = _key(256, "count")
    slow_consumer_timeout: float = _key(10.0, "positive")
    ws_ping_interval: float = _key(30.0, "positive")
    ws_pong_timeout: float = _key(10.0, "positive")
    direct_writes: bool = _key(True, "bool")
    # gzip for SSE clients that send Accept-Encoding: gzip (server/sse.py),
    # permessage-deflate for WebSocket clients that offer it (server/listen.py).
    compression: bool = _key(False, "bool")


@dataclass(frozen=True, slots=True)
class LimitsConfig(_Section):
    per_user: int = _key(5, "count")
    per_tenant: int = _key(1000, "count")
    global_: int = _key(20000, "count", toml="global")  # `global` is a Python keyword
    events_per_second: float = _key(0.0, "nonneg")


@dataclass(frozen=True, slots=True)
class AuthConfig(_Section):
    """DESIGN §7. With mode "jwt", the keys for `algorithms` are loaded and
    checked at start (server/tokens.py `load_verifier`): a missing or
    unreadable key file is a config error, like a bad key."""

    mode: str = _key("none", "str", choices=("none", "jwt"))
    algorithms: tuple[str, ...] = _key(("HS256",), "strlist")
    secret: str = _key("", "str", secret=True)  # HS*: the shared secret (or secret_file)
    secret_file: str = _key("", "str")  # a file holding the secret (trailing newline dropped)
    public_key_file: str = _key("", "str")  # RS*/PS*/ES*/EdDSA: a PEM public key
    jwks_file: str = _key("", "str")  # a JWKS document; a token's `kid` picks the key
    audience: str = _key("", "str")  # checked when set
    issuer: str = _key("", "str")  # checked when set
    leeway: float = _key(30.0, "duration")  # seconds of clock skew for exp / nbf / iat


@dataclass(frozen=True, slots=True)
class AuditConfig(_Section):
    ring_events: int = _key(10000, "count")  # audit facts kept for resuming admin streams (DESIGN §7)


@dataclass(frozen=True, slots=True)
class ServiceConfig(_Section):
    """Running as a service (docs/operations.md): the data-path probe
    behind systemd's watchdog and /readyz (server/probe.py); 0 = off."""

    probe_interval: float = _key(5.0, "duration")


@dataclass(frozen=True, slots=True)
class StoreConfig(_Section):
    """DESIGN §10 (docs/store.md): with "postgres", every accepted event is
    written in batches off the hot path, and a restart restores the state."""

    backend: str = _key("memory", "str", choices=("memory", "postgres"))
    dsn: str = _key("", "str", secret=True)  # a libpq conninfo or URI; may hold a password
    batch_events: int = _key(1000, "count")  # a batch goes at this many events …
    flush_ms: float = _key(50.0, "nonneg")  # … or this long after its first
    spill_events: int = _key(1000000, "count")  # queued while PostgreSQL is slow or down
    spill_bytes: int = _key(256 * 1048576, "count")
    durable_timeout: float = _key(5.0, "positive")  # POST /v1/events?durable=true: 503 past this
    retention: float = _key(604800.0, "positive")  # events older than this are pruned (7 days)
    pool_size: int = _key(4, "count")
    statement_timeout: float = _key(10.0, "positive")  # every statement's bound, and each call's deadline
    restore_events: int = _key(100000, "count")  # ring entries read back at start, all workflows together


@dataclass(frozen=True, slots=True)
class ClusterConfig(_Section):
    bind: str = _key("", "zmq_opt")
    replay_bind: str = _key("", "zmq_opt")
    peers: tuple[PeerConfig, ...] = _key((), "peers")
    announce_interval: float = _key(1.0, "positive")  # DESIGN §13: head-offset announcements (seconds)
    curve_secret_file: str = _key("", "str")  # not built yet: validated, unused
    curve_peers_dir: str = _key("", "str")


@dataclass(frozen=True, slots=True)
class ControlConfig(_Section):
    bind: str = _key("", "zmq_opt")
    curve_secret_file: str = _key("", "str")
    curve_clients_dir: str = _key("", "str")


@dataclass(frozen=True, slots=True)
class LogConfig(_Section):
    level: str = _key("info", "str", choices=("debug", "info", "warning", "error"))
    format: str = _key("text", "str", choices=("text", "json"))


@dataclass(frozen=True, slots=True)
class Config:
    """The validated config. Fields typed as a section are TOML tables; the
    others with a `kind` are top-level keys; `source` is where it came from."""

    node: NodeConfig = field(default_factory=NodeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    order: OrderConfig = field(default_factory=OrderConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    shutdown_timeout: float = _key(5.0, "duration")
    source: str = "<defaults>"

    def as_dict(self) -> dict[str, Any]:
        """Top-level keys, then one dict per section (what check-config prints)."""
        out: dict[str, Any] = {_toml_name(f): _plain(getattr(self, f.name)) for f in _TOP_LEVEL}
        for name in _SECTIONS:
            section: _Section = getattr(self, name)
            out[name] = section.as_dict()
        return out


def _toml_name(f: Any) -> str:
    name: str = f.metadata.get("toml") or f.name
    return name


def _plain(value: Any) -> Any:
    """A field value as TOML/JSON would hold it (tuples → lists)."""
    if isinstance(value, tuple):
        return [v.as_dict() if isinstance(v, PeerConfig) else v for v in value]
    return value


_HINTS = get_type_hints(Config)
# section name → its dataclass, in Config's field order
_SECTIONS: dict[str, type[Any]] = {
    f.name: _HINTS[f.name]
    for f in fields(Config)
    if isinstance(_HINTS[f.name], type) and issubclass(_HINTS[f.name], _Section)
}
_TOP_LEVEL = tuple(f for f in fields(Config) if "kind" in f.metadata)


# ------------------------------------------------------------------ checks


def _check(path: str, kind: str, value: Any) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{path}': expected {expected}, got {type(value).__name__} {value!r}")

    if kind in ("str", "zmq_bind", "zmq_opt", "http_bind"):
        if not isinstance(value, str):
            raise bad("a string")
        if kind == "zmq_bind" or (kind == "zmq_opt" and value):
            _check_zmq_endpoint(path, value)
        elif kind == "http_bind":
            _parse_host_port(path, value)
        return value
    if kind in ("count", "nonneg", "duration", "positive"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if isinstance(value, float) and kind == "count":
            raise bad("an integer")
        # (an int is compared, never converted: a huge one would overflow a float)
        if (isinstance(value, float) and not math.isfinite(value)) or value > MAX_NUMBER:
            raise bad(f"a finite number up to {MAX_NUMBER}")
        if kind == "count" and value < 1:
            raise bad("an integer >= 1")
        if kind == "positive" and value <= 0:
            raise bad("a number of seconds > 0")
        if value < 0:
            raise bad("a non-negative number")
        return value if kind == "count" else float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if kind == "peers":
        if not isinstance(value, list):
            raise bad("a list of {pub = ..., replay = ...} tables")
        peers = []
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
            for key in ("pub", "replay"):
                if key in peer:
                    _check_zmq_endpoint(f"{path}[{i}].{key}", peer[key], connect=True)
            peers.append(PeerConfig(pub=peer["pub"], replay=peer.get("replay", "")))
        return tuple(peers)
    raise AssertionError(kind)


_PORT_RE = re.compile(r"[+-]?[0-9]+")


def _port_in_range(port: str) -> bool:
    """`port` (matching _PORT_RE) is 0-65535."""
    digits = port.lstrip("+-").lstrip("0")
    return not port.startswith("-") and len(digits) <= 5 and int(digits or "0") <= 65535


def _check_zmq_endpoint(path: str, endpoint: str, *, connect: bool = False) -> None:
    """tcp://host:port (port `*` or 0-65535 to bind, 1-65535 to connect),
    ipc://… or inproc://…"""
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(
            f"config key '{path}': expected a ZeroMQ endpoint like tcp://127.0.0.1:5557, got {endpoint!r}"
        )
    if not endpoint.startswith("tcp://"):
        return
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if _PORT_RE.fullmatch(port) and not _port_in_range(port):
        raise ConfigError(f"config key '{path}': port out of range (0-65535) in {endpoint!r}")
    if not sep or not host or not (port == "*" or (port.isascii() and port.isdigit())):
        raise ConfigError(f"config key '{path}': expected tcp://host:port, got {endpoint!r}")
    if connect and (port == "*" or int(port) == 0):
        raise ConfigError(f"config key '{path}': a peer endpoint needs a port number 1-65535, got {endpoint!r}")


def _parse_host_port(path: str, bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if sep and host and _PORT_RE.fullmatch(port) and not _port_in_range(port):
        raise ConfigError(f"config key '{path}': port out of range (0-65535) in {bind!r}")
    if not sep or not port.isascii() or not port.isdigit() or not host:
        raise ConfigError(f"config key '{path}': expected host:port, got {bind!r}")
    return host.strip("[]"), int(port)


def parse_http_bind(bind: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' → (host, port); ConfigError naming http.bind."""
    return _parse_host_port("http.bind", bind)


# ------------------------------------------------------------------ loading


def _build(cls: type[Any], name: str, raw: dict[str, Any]) -> Any:
    """One section's dataclass from its TOML table (missing keys: defaults)."""
    spec = {_toml_name(f): f for f in fields(cls)}
    for key in raw:
        if key not in spec:
            raise ConfigError(f"config key '{name}.{key}': unknown key")
    values: dict[str, Any] = {}
    for key, f in spec.items():
        if key not in raw:
            continue
        path = f"{name}.{key}"
        value = _check(path, f.metadata["kind"], raw[key])
        choices: tuple[str, ...] = f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"config key '{path}': must be one of {', '.join(choices)} (got {value!r})")
        values[f.name] = value
    return cls(**values)


def from_mapping(data: dict[str, Any], source: str = "<defaults>") -> Config:
    """A validated Config from parsed TOML; ConfigError names the first bad key."""
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"config key '{name}': expected a table")
        if name == "node" and raw.get("id") == "":
            raw = {k: v for k, v in raw.items() if k != "id"}  # "" = the hostname (the default)
        sections[name] = _build(cls, name, raw)
    top_names = {_toml_name(f) for f in _TOP_LEVEL}
    for key in data:
        if key == "" or (key not in _SECTIONS and key not in top_names):
            raise ConfigError(f"config key '{key}': unknown key")
    top = {
        f.name: _check(_toml_name(f), f.metadata["kind"], data[_toml_name(f)])
        for f in _TOP_LEVEL
        if _toml_name(f) in data
    }
    buffer = sections["buffer"]
    if buffer.total_bytes < buffer.ring_bytes:
        raise ConfigError(
            f"config key 'buffer.total_bytes': {buffer.total_bytes} is less than buffer.ring_bytes "
            f"({buffer.ring_bytes}): every ring together must hold at least one full ring"
        )
    auth = sections["auth"]
    if auth.secret and auth.secret_file:
        raise ConfigError("config key 'auth.secret_file': set auth.secret or auth.secret_file, not both")
    if auth.mode == "jwt" and not auth.algorithms:
        raise ConfigError("config key 'auth.algorithms': list at least one algorithm for auth.mode = \"jwt\"")
    store = sections["store"]
    if store.backend == "postgres" and not store.dsn:
        raise ConfigError("config key 'store.dsn': store.backend = \"postgres\" needs a dsn")
    return Config(**sections, **top, source=source)


def load(path: str | Path | None) -> Config:
    """The Config of a TOML file (None: the defaults); ConfigError if bad."""
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
