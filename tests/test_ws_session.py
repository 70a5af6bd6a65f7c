"""The WebSocket session's races, in-process (broker/server/ws.py).

`ws.handle()` is driven by a scripted ASGI peer on trio's MockClock
(autojump; times are virtual): the windows these tests aim at — a drain or
an admin close landing while the session is inside a write, pacing under
a heartbeat — cannot be hit reliably over a real socket. Everything else
about the endpoint is tested end to end against the daemon in test_ws.py.
"""

from __future__ import annotations

import orjson
import pytest
import trio
import trio.testing

from broker.config import from_mapping
from broker.server.hub import Hub
from broker.server.ws import handle

from .builders import ev, log

SCOPE = {"type": "websocket", "path": "/v1/ws", "headers": [], "query_string": b"", "client": ("127.0.0.1", 1)}


class FakeClient:
    def __init__(self) -> None:
        self.to_app_send, self.to_app_recv = trio.open_memory_channel(100)
        self.sent: list[tuple[float, dict]] = []
        self.gate: trio.Event | None = None  # while set (not None), send() blocks
        self.in_send = trio.Event()
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.on_message = None

    async def receive(self):
        return await self.to_app_recv.receive()

    async def send(self, message):
        if self.gate is not None and message["type"] == "websocket.send":
            self.in_send.set()
            await self.gate.wait()
        self.sent.append((trio.current_time(), message))
        if message["type"] == "websocket.close":
            self.closed_at = trio.current_time()
            self.close_code = message["code"]
        if self.on_message is not None and message["type"] == "websocket.send":
            self.on_message(orjson.loads(message["text"]))
        await trio.lowlevel.checkpoint()

    def push(self, obj) -> None:
        self.to_app_send.send_nowait({"type": "websocket.receive", "text": orjson.dumps(obj).decode()})


def make_hub(**sections) -> Hub:
    return Hub(from_mapping(sections))


def ingest(hub: Hub, *events) -> None:
    hub.ingest(orjson.dumps(list(events)), "test")


def run(fn):
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(("how", "code"), [("drain", 1001), ("admin close", 1000)])
def test_close_started_while_the_session_writes_is_not_lost(how, code):
    """A drain (begin_drain) or an admin close (kick) while the session is
    inside a write: hand_back() finds no wait to cut short; the session
    must still close at once, not at its next ping deadline."""

    async def main():
        hub = make_hub()
        c = FakeClient()
        async with trio.open_nursery() as n:
            n.start_soon(hub.serve_flusher)
            n.start_soon(handle, hub, SCOPE, c.receive, c.send)
            c.to_app_send.send_nowait({"type": "websocket.connect"})
            ingest(hub, ev("wf", "workflow.running"))
            c.push({"op": "subscribe", "sub": "s", "workflow": "wf"})
            await trio.sleep(0.01)
            (conn_id,) = hub.connections
            c.gate = trio.Event()
            ingest(hub, log("wf", "x"))
            await c.in_send.wait()  # the session is writing that event (_flush_due)
            t0 = trio.current_time()
            if how == "drain":
                hub.begin_drain()
            else:
                hub.kick(conn_id)
            gate, c.gate = c.gate, None
            gate.set()
            with trio.move_on_after(60):
                while c.closed_at is None:
                    await trio.sleep(0.01)
            n.cancel_scope.cancel()
        assert c.close_code == code
        delay = c.closed_at - t0
        assert delay < 1.0, f"{how} noticed only after {delay:.1f} s (virtual)"

    run(main)


def test_paced_flush_does_not_close_a_client_that_answers_pings():
    """limits.events_per_second with several busy subscriptions: the
    pacing pause must not stop the session reading the client's pongs (it
    used to sleep per subscription, longer than ws_pong_timeout, and then
    closed the connection 1001 with the pong unread in the queue)."""

    async def main():
        hub = make_hub(limits={"events_per_second": 1}, stream={"ws_ping_interval": 10, "ws_pong_timeout": 2})
        c = FakeClient()
        wids = [f"wf-{i}" for i in range(3)]
        for w in wids:
            ingest(hub, ev(w, "workflow.running"))

        async def answer(n):
            await trio.sleep(0.005)  # the client's round trip
            c.push({"op": "pong"})

        async with trio.open_nursery() as n:
            c.on_message = lambda m: n.start_soon(answer, n) if m.get("kind") == "ping" else None
            n.start_soon(hub.serve_flusher)
            n.start_soon(handle, hub, SCOPE, c.receive, c.send)
            c.to_app_send.send_nowait({"type": "websocket.connect"})
            for w in wids:
                c.push({"op": "subscribe", "sub": w, "workflow": w})

            async def engine():
                i = 0
                while True:
                    i += 1
                    for w in wids:
                        ingest(hub, log(w, f"m{i}"))
                    await trio.sleep(0.05)

            n.start_soon(engine)
            with trio.move_on_after(30):
                while c.closed_at is None:
                    await trio.sleep(0.1)
            n.cancel_scope.cancel()
        sent = [orjson.loads(m["text"]) for _, m in c.sent if m["type"] == "websocket.send"]
        assert c.closed_at is None, f"closed {c.close_code} at t={c.closed_at:.1f} although every ping was answered"

        # Paced (1 event/s for the connection) yet every subscription got its share.
        assert {m.get("sub") for m in sent if m.get("kind") not in ("snapshot", "ping")} == set(wids)

    run(main)


@pytest.mark.parametrize("exit_path", ["disconnect", "slow", "drain", "kick", "unsubscribe"])
def test_no_listener_or_watcher_left_behind(exit_path):
    async def main():
        hub = make_hub()
        c = FakeClient()
        ingest(hub, ev("wf", "workflow.running"))
        async with trio.open_nursery() as n:
            n.start_soon(hub.serve_flusher)
            n.start_soon(handle, hub, SCOPE, c.receive, c.send)
            c.to_app_send.send_nowait({"type": "websocket.connect"})
            c.push({"op": "subscribe", "sub": "a", "workflow": "wf"})
            c.push({"op": "subscribe", "sub": "b", "tenant": "default"})
            c.push({"op": "subscribe", "sub": "p", "workflow": "not-yet"})
            await trio.sleep(0.05)
            st = hub.statistics()
            assert st.listeners and st.watched_keys
            (conn_id,) = hub.connections
            if exit_path == "disconnect":
                c.to_app_send.send_nowait({"type": "websocket.disconnect", "code": 1000})
            elif exit_path == "slow":
                hub.connections[conn_id].slow = True
                ingest(hub, log("wf", "x"))
            elif exit_path == "drain":
                hub.begin_drain()
            elif exit_path == "kick":
                hub.kick(conn_id)
            else:
                for s in "abp":
                    c.push({"op": "unsubscribe", "sub": s})
            await trio.sleep(0.5)
            st = hub.statistics()
            assert st.listeners == 0 and st.listened_keys == 0, st
            assert st.watched_keys == 0, st
            n.cancel_scope.cancel()

    run(main)


def test_wake_times_are_forgotten_with_the_last_subscriber():
    """The hub remembers when it last woke each watched key (wake batching);
    keys of workflows nobody watches any more must not pile up."""

    async def main():
        hub = make_hub()
        c = FakeClient()
        wids = [f"wf-{i}" for i in range(20)]
        async with trio.open_nursery() as n:
            n.start_soon(hub.serve_flusher)
            n.start_soon(handle, hub, SCOPE, c.receive, c.send)
            c.to_app_send.send_nowait({"type": "websocket.connect"})
            for w in wids:
                ingest(hub, ev(w, "workflow.running"))
                c.push({"op": "subscribe", "sub": w, "workflow": w})
            await trio.sleep(0.1)
            for w in wids:
                ingest(hub, log(w, "x"))
            await trio.sleep(0.1)
            assert hub.statistics().wake_times >= len(wids)
            for w in wids:
                c.push({"op": "unsubscribe", "sub": w})
            await trio.sleep(0.1)
            assert hub.statistics().wake_times == 0, hub.statistics()
            n.cancel_scope.cancel()

    run(main)
