"""`Publisher`: an engine pushes events to the broker over ZMQ PUSH.

Sane defaults from FIELD-NOTES: `IMMEDIATE=1` (never queue into a pipe to a
broker that is not there), a bounded `LINGER` so `close()` never hangs, and
a send high-water mark. Synchronous on purpose: engines are often not trio.
"""

from __future__ import annotations

from typing import Any

import orjson
import zmq
import zmq.auth


class Publisher:
    """`curve_secret_file` (the engine's `.key_secret`, from `broker keygen`)
    and `curve_server_key_file` (the broker's public `.key`): connect with
    CURVE, as a broker with `ingest.curve_clients_dir` requires.
    `send_timeout_ms`: a send waits at most this long (None: as long as it
    takes, the ZeroMQ default)."""

    def __init__(
        self,
        endpoint: str,
        *,
        linger_ms: int = 2000,
        sndhwm: int = 10000,
        curve_secret_file: str | None = None,
        curve_server_key_file: str | None = None,
        send_timeout_ms: int | None = None,
    ) -> None:
        keys: tuple[bytes, bytes, bytes] | None = None
        if curve_secret_file or curve_server_key_file:
            if not (curve_secret_file and curve_server_key_file):
                raise ValueError("CURVE needs both curve_secret_file and curve_server_key_file")
            public, secret = zmq.auth.load_certificate(curve_secret_file)
            if not secret:
                raise ValueError(f"{curve_secret_file} holds no secret key (a .key_secret file is needed)")
            keys = (public, secret, zmq.auth.load_certificate(curve_server_key_file)[0])
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        if keys is not None:
            self._sock.curve_publickey, self._sock.curve_secretkey, self._sock.curve_serverkey = keys
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        if send_timeout_ms is not None:
            # A send that cannot go out (no broker connected, or one that
            # refused this engine's key) raises zmq.Again after this long.
            self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.connect(endpoint)

    def publish(self, event: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Send one event (or a batch as one frame). Blocks only at the HWM."""
        self._sock.send(orjson.dumps(event))

    def send_raw(self, frame: bytes) -> None:
        self._sock.send(frame)

    def close(self, linger_ms: int | None = None) -> None:
        """Close (waiting up to the linger time for what is queued, or
        `linger_ms` instead)."""
        self._sock.close(linger_ms)
        self._ctx.term()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
