"""A small test client over trio-websocket for the broker's `GET /v1/ws`.

It keeps messages that a caller did not ask for yet (another subscription's,
say) in arrival order, so a test can wait for exactly the message it needs
without losing the others. Server heartbeats (`{"kind":"ping"}`) are answered
with `{"op":"pong"}` and counted, unless `answer_pings=False`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from trio_websocket import WebSocketConnection, open_websocket_url

Msg = dict[str, Any]


def unbatch(msg: Msg) -> list[Msg]:
    """The stream messages one server message carries (a batch carries several)."""
    if msg.get("kind") == "batch":
        return list(msg["events"])
    return [msg]


class WsClient:
    def __init__(self, ws: WebSocketConnection, *, answer_pings: bool = True) -> None:
        self.ws = ws
        self.answer_pings = answer_pings
        self.pings = 0
        self.pending: list[Msg] = []
        self.raw: list[Msg] = []  # every message received, in order (pings included)
        self.frames: list[str | bytes] = []  # … and each as it came, before parsing

    async def send(self, obj: Any) -> None:
        if isinstance(obj, (str, bytes)):
            await self.ws.send_message(obj)
        else:
            await self.ws.send_message(orjson.dumps(obj).decode())

    async def _read_one(self) -> tuple[Msg, bool]:
        """The next message; True with it if it was a server ping already answered."""
        frame = await self.ws.get_message()
        self.frames.append(frame)
        msg = orjson.loads(frame)
        self.raw.append(msg)
        if msg.get("kind") == "ping":
            self.pings += 1
            if self.answer_pings:
                await self.send({"op": "pong"})
                return msg, True
        return msg, False

    async def _read(self) -> Msg:
        while True:
            msg, answered = await self._read_one()
            if not answered:
                return msg

    async def wait_pings(self, count: int) -> None:
        """Read (keeping other messages pending) until `count` server pings were seen."""
        while self.pings < count:
            msg, _ = await self._read_one()
            if msg.get("kind") != "ping":
                self.pending.append(msg)

    async def next(self, pred: Callable[[Msg], bool] = lambda m: True) -> Msg:
        """The first message (pending or new) that matches `pred`."""
        for i, msg in enumerate(self.pending):
            if pred(msg):
                return self.pending.pop(i)
        while True:
            msg = await self._read()
            if pred(msg):
                return msg
            self.pending.append(msg)

    async def next_sub(self, sub: str) -> Msg:
        return await self.next(lambda m: m.get("sub") == sub)

    async def control(self) -> Msg:
        """The next message that belongs to no subscription (pong, error without sub…)."""
        return await self.next(lambda m: "sub" not in m)

    async def events(self, sub: str, count: int) -> tuple[list[Msg], list[Msg]]:
        """At least `count` stream messages of `sub`, unbatched; also the raw messages."""
        events: list[Msg] = []
        raw: list[Msg] = []
        while len(events) < count:
            msg = await self.next_sub(sub)
            raw.append(msg)
            events.extend(unbatch(msg))
        return events, raw

    async def until(self, sub: str, pred: Callable[[Msg], bool]) -> tuple[list[Msg], list[Msg]]:
        """Stream messages of `sub`, unbatched, up to and including the first matching `pred`."""
        events: list[Msg] = []
        raw: list[Msg] = []
        while True:
            msg = await self.next_sub(sub)
            raw.append(msg)
            for ev in unbatch(msg):
                events.append(ev)
                if pred(ev):
                    return events, raw

    async def roundtrip(self) -> None:
        """ping → pong: every client message sent before has been handled."""
        await self.send({"op": "ping"})
        msg = await self.next(lambda m: m.get("kind") == "pong")
        assert msg == {"kind": "pong"}

    def pending_for(self, sub: str) -> list[Msg]:
        return [m for m in self.pending if m.get("sub") == sub]


@asynccontextmanager
async def ws_client(url: str, **kwargs: Any) -> AsyncIterator[WsClient]:
    answer = kwargs.pop("answer_pings", True)
    stream = None
    try:
        async with open_websocket_url(url, **kwargs) as ws:
            stream = ws._stream
            yield WsClient(ws, answer_pings=answer)
    finally:
        # trio-websocket 0.12 leaves the TCP socket open when the server
        # closes first (its aclose() returns at once when a close reason is
        # already set, and a client waits for the server's TCP close without
        # closing its own side), so the socket is left to the GC. Closing it
        # again is harmless when the library did.
        if stream is not None:
            stream.socket.close()
