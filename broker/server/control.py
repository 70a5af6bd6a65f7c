"""The control channel's PUB socket (DESIGN.md §8), owned by one task.

`bind_control()` creates and binds the socket at start (a CURVE server when
`control.curve_*` is set, its authenticator already running), so a bad
endpoint fails startup like the ingest's. `ControlChannel.serve()` is the
socket's only user: request handlers hand it (topic, body) through a
bounded channel and wait for the send (`publish()`), so an `ack` or a 202
means the message left the broker. A PUB socket never blocks: at its
high-water mark (a subscriber not reading) ZeroMQ drops for that
subscriber, as PUB/SUB does.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import trio
import zmq

from ..core.errors import Unavailable
from .curve import CurveServer, bind_server

log = logging.getLogger("broker.control")

QUEUE = 1000  # requests waiting for the socket's task
SEND_WAIT = 1.0  # seconds a request waits for the send before 503


def bind_control(ctx: zmq.Context[Any], endpoint: str, curve: CurveServer | None) -> tuple[zmq.Socket[Any], str]:
    return bind_server(ctx, zmq.PUB, endpoint, curve, {zmq.SNDHWM: 10000})


class ControlChannel:
    def __init__(self, sock: zmq.Socket[Any], endpoint: str) -> None:
        self.endpoint = endpoint
        self._sock = sock
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, bytes, trio.Event]](QUEUE)
        self.published = 0

    async def publish(self, topic: str, body: dict[str, Any]) -> None:
        """Publish `body` under `topic` (a workflow id); returns once sent.
        Unavailable when the socket's task cannot take it in time."""
        done = trio.Event()
        try:
            self._send.send_nowait((topic.encode(), orjson.dumps(body), done))
        except trio.WouldBlock:
            raise Unavailable("the control channel is busy: retry later") from None
        with trio.move_on_after(SEND_WAIT):
            await done.wait()
        if not done.is_set():
            raise Unavailable("the control channel did not send in time: retry later")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async for topic, body, done in self._receive:
                try:
                    self._sock.send_multipart([topic, body], zmq.NOBLOCK)
                except zmq.Again:
                    pass  # no subscriber can take it (PUB drops at the HWM): it is still published
                self.published += 1
                done.set()
        finally:
            self._sock.close(0)
