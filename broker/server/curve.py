"""ZeroMQ CURVE for the broker's sockets (DESIGN.md §7), with pyzmq's
`zmq.auth` certificates: a `.key_secret` file holding a socket's own key
pair, and a directory of `.key` files, one public certificate per peer
allowed in.

- `CurveServer.start()` runs pyzmq's ThreadAuthenticator (the ZAP handler,
  its own thread) *before* a socket binds: without it a CURVE server
  accepts any key (FIELD-NOTES). A connection with an unknown key is
  refused in the handshake, before any of its messages is read; each
  refusal is counted (`failures`) and logged (at most once per 10 s, with
  the count since).
- libzmq has one ZAP endpoint per context (`inproc://zeromq.zap.01`), so
  the groups of one context (ingest, control) share one authenticator:
  each group is a ZAP domain (its section name, set on its sockets) with
  its own clients directory, refusal count and callback.
- An engine's public certificate may say `tenant = "…"` in its `metadata`
  section; pyzmq's loader ignores metadata, so `read_metadata` reads it.
  The authenticator gives every message of an authenticated connection its
  peer's public key (z85) as the ZMQ `User-Id` property; `tenants` maps
  it to the tenant its events are forced into.
- `reload()` (SIGHUP) reads the directory again; a directory that cannot
  be read keeps the keys in force and says why.
- `write_certificates` is `broker keygen`: pyzmq writes the key pair, and
  the tenant goes into the public certificate's metadata too (pyzmq puts
  metadata only into the secret one), since that is the file an operator
  copies into the broker's clients directory.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..config import ConfigError

log = logging.getLogger("broker.curve")

_META_LINE = re.compile(r'^\s+([A-Za-z0-9_.-]+)\s*=\s*"?([^"]*)"?\s*$')


def read_metadata(path: Path) -> dict[str, str]:
    """The `metadata` section of a zmq.auth certificate file."""
    out: dict[str, str] = {}
    section = ""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        if section == "metadata" and (m := _META_LINE.match(line)):
            out[m.group(1)] = m.group(2)
    return out


def load_keypair(key: str, path: str) -> tuple[bytes, bytes]:
    """A socket's own (public, secret) key pair from its `.key_secret` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config key '{key}': cannot load {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"config key '{key}': {path} holds no secret key (a .key_secret file is needed)")
    return public, secret


def load_clients(key: str, directory: str) -> dict[str, str | None]:
    """The z85 public keys of a clients directory's `.key` files → the
    `tenant` of each certificate's metadata (None if it names none)."""
    base = Path(directory)
    if not base.is_dir():
        raise ConfigError(f"config key '{key}': {directory} is not a directory")
    out: dict[str, str | None] = {}
    for cert in sorted(base.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(cert)
            tenant = read_metadata(cert).get("tenant") or None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config key '{key}': {cert}: {exc}") from None
        if tenant is not None and not (len(tenant) <= 128 and tenant.isprintable()):
            raise ConfigError(f"config key '{key}': {cert}: its tenant must be 1-128 printable characters")
        out[public.decode("ascii")] = tenant
    return out


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler for one context, counting the connections it
    refuses per ZAP domain (a `CurveServer`'s section)."""

    def __init__(self, context: zmq.Context[Any]) -> None:
        super().__init__(context)
        # Called in this thread: they must hand over to the loop themselves.
        self.on_refused: dict[str, Callable[[str], None]] = {}
        self.lock = threading.Lock()
        self.failures: Counter[str] = Counter()
        self.groups = 0  # CurveServers started on it
        self._domain = ""  # of the request being answered (one at a time, in this thread)
        self._logged_at = 0.0
        self._since_log = 0

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._domain = msg[2].decode("utf-8", "replace") if len(msg) > 2 else ""
        await super().handle_zap_message(msg)

    def _send_zap_reply(
        self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous"
    ) -> None:
        if status_code != b"200":
            domain = self._domain
            with self.lock:
                self.failures[domain] += 1
                self._since_log += 1
                now = time.monotonic()
                if now - self._logged_at >= 10.0:
                    log.warning(
                        "zmq: refused %d connection(s) with an unknown CURVE key (%s: %s)",
                        self._since_log,
                        domain,
                        status_text.decode("utf-8", "replace"),
                    )
                    self._logged_at, self._since_log = now, 0
            on_refused = self.on_refused.get(domain)
            if on_refused is not None:
                on_refused(status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


# The running authenticator of each context (by the context's id), while
# a CurveServer of that context uses it.
_authenticators: dict[int, _Authenticator] = {}


class CurveServer:
    """CURVE for one group of server sockets: its key pair, the clients
    directory and the authenticator that checks connecting keys."""

    def __init__(self, section: str, secret_file: str, clients_dir: str) -> None:
        self.section = section
        self.secret_file = secret_file
        self.clients_dir = clients_dir
        self.public, self.secret = load_keypair(f"{section}.curve_secret_file", secret_file)
        self.clients = load_clients(f"{section}.curve_clients_dir", clients_dir)
        self.tenants = self._tenants()
        self._auth: _Authenticator | None = None
        self._internal: set[bytes] = set()  # the broker's own clients' keys (its probe), z85

    @classmethod
    def from_config(cls, section: str, secret_file: str, clients_dir: str) -> CurveServer | None:
        if not secret_file and not clients_dir:
            return None
        if not (secret_file and clients_dir):
            raise ConfigError(
                f"config key '{section}.curve_clients_dir': CURVE needs both {section}.curve_secret_file "
                f"and {section}.curve_clients_dir"
            )
        return cls(section, secret_file, clients_dir)

    @property
    def failures(self) -> int:
        return 0 if self._auth is None else self._auth.failures[self.section]

    def _tenants(self) -> dict[str, str]:
        """z85 public key → tenant, for the certificates that name one."""
        return {k: t for k, t in self.clients.items() if t is not None}

    def start(self, ctx: zmq.Context[Any], on_refused: Callable[[str], None] | None = None) -> None:
        """Run the context's authenticator, or join it, with this group's
        clients as its domain (before any socket of the group binds);
        `on_refused(reason)` is called from its thread for each refusal."""
        auth = _authenticators.get(id(ctx))
        if auth is None:
            auth = _authenticators[id(ctx)] = _Authenticator(ctx)
            auth.start()
        auth.groups += 1
        if on_refused is not None:
            auth.on_refused[self.section] = on_refused
        auth.configure_curve(domain=self.section, location=self.clients_dir)
        self._auth = auth
        self._allow_internal()

    def allow(self, public_z85: bytes) -> None:
        """Let a key of the broker's own in (its data-path probe), beside
        the clients directory's, across reloads."""
        self._internal.add(public_z85)
        self._allow_internal()

    def _allow_internal(self) -> None:
        certs = self._auth.certs.get(self.section) if self._auth is not None else None
        if certs is not None:
            for key in self._internal:
                certs[key] = True

    def stop(self) -> None:
        auth = self._auth
        if auth is None:
            return
        self._auth = None
        auth.on_refused.pop(self.section, None)
        auth.groups -= 1
        if not auth.groups:
            auth.stop()
            if _authenticators.get(id(auth.context)) is auth:
                del _authenticators[id(auth.context)]

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` a CURVE server with this group's keys, in this
        group's ZAP domain (before bind)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = self.section.encode()
        sock.curve_server = True

    def reload(self) -> bool:
        """Read the clients directory again (SIGHUP); on a failure keep the
        keys in force, log why, and return False."""
        try:
            clients = load_clients(f"{self.section}.curve_clients_dir", self.clients_dir)
        except ConfigError as exc:
            log.error("reload: %s; the CURVE keys in force stay", exc)
            return False
        self.clients = clients
        self.tenants = self._tenants()
        if self._auth is not None:
            self._auth.configure_curve(domain=self.section, location=self.clients_dir)
            self._allow_internal()
        return True


def write_certificates(name: str, directory: str, tenant: str | None = None) -> tuple[Path, Path]:
    """`broker keygen NAME DIR`: NAME.key (public) and NAME.key_secret in DIR."""
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    metadata = {"tenant": tenant} if tenant else None
    public_file, secret_file = zmq.auth.create_certificates(base, name, metadata)
    if tenant:
        public, _ = zmq.auth.load_certificate(public_file)
        lines = Path(public_file).read_text(encoding="utf-8").splitlines()
        at = lines.index("metadata") + 1
        lines.insert(at, f'    tenant = "{tenant}"')
        Path(public_file).write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert zmq.auth.load_certificate(public_file)[0] == public
    Path(secret_file).chmod(0o600)
    return Path(public_file), Path(secret_file)


def bind_server(
    ctx: zmq.Context[Any], kind: int, endpoint: str, curve: CurveServer | None, options: dict[int, int]
) -> tuple[zmq.Socket[Any], str]:
    """A server socket of `kind` with `options`, a CURVE server with
    `curve` (its authenticator running), bound; it and its actual endpoint.
    A failed bind closes it and raises zmq.ZMQError."""
    sock = ctx.socket(kind)
    if curve is not None:
        curve.secure(sock)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in options.items():
        sock.setsockopt(option, value)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        sock.close(0)
        raise
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)
