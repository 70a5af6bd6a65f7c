"""A small client for engines: `Publisher` pushes events over ZMQ PUSH.

Sane defaults from FIELD-NOTES: `IMMEDIATE=1` (never queue into a pipe to a
broker that is not there), a bounded `LINGER` so `close()` never hangs, and
a send high-water mark. Synchronous on purpose: engines are often not trio.
"""

from __future__ import annotations

from typing import Any

import orjson
import zmq


class Publisher:
    def __init__(self, endpoint: str, *, linger_ms: int = 2000, sndhwm: int = 10000) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.connect(endpoint)

    def publish(self, event: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Send one event (or a batch as one frame). Blocks only at the HWM."""
        self._sock.send(orjson.dumps(event))

    def send_raw(self, frame: bytes) -> None:
        self._sock.send(frame)

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
