"""The hub's wake path under load, in-process on trio's MockClock
(broker/server/hub.py with core/wake.py): write passes never overlap or
starve a key, fan-out wakes still go out during a pass, the ingest going
idle ends `behind`, and a stream opened as the drain starts still ends.
These windows cannot be hit reliably over real sockets; the end-to-end
behaviour is in test_sse.py, test_ws.py and the bench's `overload`."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

import orjson
import pytest
import trio
import trio.testing

from broker.config import from_mapping
from broker.server import hub as hub_module
from broker.server import sse
from broker.server.hub import Hub

from .builders import ev


def frame(*events: dict) -> bytes:
    return orjson.dumps(list(events))


@pytest.mark.slow
def test_sustained_overload_wakes_every_key_and_the_pass_list_stays_bounded() -> None:
    n_keys, cost, fan_subs = 200, 0.001, 300

    async def main(clock: trio.testing.MockClock) -> None:
        hub = Hub(from_mapping({}))
        keys = [f"wf-{i}" for i in range(n_keys)]
        hub.ingest(frame(*(ev(k, "workflow.running") for k in [*keys, "fan"])), "test")
        wakes: collections.Counter[str] = collections.Counter()
        tokens = []

        def small(key: str) -> None:
            wakes[key] += 1
            clock.jump(cost)  # a write costs time

        for k in keys:
            tokens.append(t := object())
            hub.listen(k, t, small, subscriber=True)
        fan_times: list[float] = []
        for i in range(fan_subs):
            tokens.append(t := object())
            hub.listen(
                "fan",
                t,
                (lambda _k: fan_times.append(trio.current_time())) if i == 0 else (lambda _k: None),
                subscriber=True,
            )
        frames = [orjson.dumps(ev(k, "tick")) for k in keys]
        longest_pass_list = 0
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(hub.serve_flusher)

                async def ingest() -> None:
                    nonlocal longest_pass_list
                    while True:  # always a full batch: behind all along
                        hub.ingest_batch(frames, "zmq")
                        hub.ingest_turn(True, 0.0)
                        longest_pass_list = max(longest_pass_list, len(hub._queue))
                        clock.jump(0.001)
                        await trio.lowlevel.checkpoint()

                n.start_soon(ingest)
                await trio.sleep(1.0)
                # The fan-out workflow's last two events, 1 ms apart: the
                # second lands inside its interval and waits on a timer.
                hub.ingest_batch([orjson.dumps(ev("fan", "tick"))], "zmq")
                hub.ingest_turn(True, 0.0)
                clock.jump(0.001)
                hub.ingest_batch([orjson.dumps(ev("fan", "workflow.completed"))], "zmq")
                hub.ingest_turn(True, 0.0)
                last = trio.current_time()
                wakes.clear()
                await trio.sleep(2.0)
                assert [t for t in fan_times if t > last], "the fan-out wake due during a pass never went out"
                assert all(wakes[k] for k in keys), sum(1 for k in keys if not wakes[k])
                assert longest_pass_list <= n_keys + 1, longest_pass_list
                n.cancel_scope.cancel()

    clock = trio.testing.MockClock()
    trio.run(main, clock, clock=clock)


def test_the_ingest_going_idle_ends_behind() -> None:
    async def main() -> None:
        hub = Hub(from_mapping({}))
        hub.ingest(frame(ev("wf", "workflow.running")), "test")
        woken: list[float] = []
        token = object()
        hub.listen("wf", token, lambda _k: woken.append(trio.current_time()), subscriber=True)
        async with trio.open_nursery() as n:
            n.start_soon(hub.serve_flusher)
            # The last turn of a burst was late, then the queue was empty.
            hub.ingest_batch([orjson.dumps(ev("wf", "tick"))], "zmq")
            hub.ingest_turn(False, 0.5)
            assert hub.statistics().behind
            hub.ingest_idle()
            await trio.sleep(1.0)
            assert not hub.statistics().behind
            woken.clear()
            t = trio.current_time()
            hub.ingest(frame(ev("wf", "tick")), "http")
            for _ in range(3):  # the flusher's turn: no time passes
                await trio.lowlevel.checkpoint()
            assert woken == [t], "an HTTP event once idle must wake at once"
            n.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_pass_slice_stops_after_pass_slice_even_with_many_subscribers_per_key() -> None:
    async def main(clock: trio.testing.MockClock) -> None:
        hub = Hub(from_mapping({}))
        keys = [f"wf-{i}" for i in range(64)]
        hub.ingest(frame(*(ev(k, "workflow.running") for k in keys)), "test")
        tokens = []
        for k in keys:
            for _ in range(200):  # below the fan-out exemption: these go in passes
                tokens.append(t := object())
                hub.listen(k, t, lambda _k: clock.jump(20e-6), subscriber=True)
        gaps: list[float] = []
        async with trio.open_nursery() as n:
            n.start_soon(hub.serve_flusher)
            hub.ingest_turn(True, 0.0)  # behind from here on
            hub.ingest_batch([orjson.dumps(ev(k, "tick")) for k in keys], "zmq")
            hub.ingest_turn(True, 0.0)
            hub.ingest_turn(False, 0.0)  # caught up: the pass starts
            last = trio.current_time()
            for _ in range(200):
                await trio.lowlevel.checkpoint()
                now = trio.current_time()
                gaps.append(now - last)
                last = now
            n.cancel_scope.cancel()
        # A slice ends at most one key (200 writes of 20 µs = 4 ms) past its
        # 5 ms; trio may run two slices between two turns of this task.
        assert sum(gaps) >= 64 * 0.004 * 0.99, sum(gaps)  # the pass ran meanwhile
        assert max(gaps) <= 2 * 0.0095, max(gaps)

    clock = trio.testing.MockClock()
    trio.run(main, clock, clock=clock)


STREAM_SCOPE = {
    "type": "http",
    "method": "GET",
    "path": "/v1/workflows/wf/stream",
    "headers": [],
    "query_string": b"",
    "client": ("127.0.0.1", 1),
    "http_version": "1.1",
}


def stream_request() -> Callable[[], Awaitable[dict]]:
    """The ASGI `receive` of a GET to a stream: the request, then nothing
    until the end of the test (the client never leaves)."""
    asked = False
    never = trio.Event()

    async def receive() -> dict:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()
        raise AssertionError

    return receive


def test_an_sse_stream_opened_as_the_drain_starts_still_ends() -> None:
    async def main() -> None:
        hub = Hub(from_mapping({}))
        hub.ingest(frame(ev("wf", "workflow.running")), "test")
        scope, receive = STREAM_SCOPE, stream_request()
        bodies: list[bytes] = []

        async def send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                hub.begin_drain()  # SIGTERM lands while the headers go out
            elif msg["type"] == "http.response.body":
                bodies.append(msg["body"])
            await trio.lowlevel.checkpoint()

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(hub.serve_flusher)
                await sse.handle(hub, scope, receive, send, sse.stream_target(scope))
                n.cancel_scope.cancel()
        assert not hub.connections
        assert bodies[-1] == b"" and b"event: snapshot" in bodies[0]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_ended_streams_wait_their_turn_while_wakes_are_queued() -> None:
    """Teardowns are let through at ENDS_BUSY_RATE while the flusher has
    wakes queued, ENDS_IDLE a round once it is quiet, and all at once when
    the drain begins."""

    async def main(clock: trio.testing.MockClock) -> None:
        hub = Hub(from_mapping({}))
        keys = [f"wf-{i}" for i in range(50)]
        hub.ingest(frame(*(ev(k, "workflow.running") for k in keys)), "test")
        tokens = []
        for k in keys:
            tokens.append(t := object())
            hub.listen(k, t, lambda _k: clock.jump(0.001), subscriber=True)  # a 1 ms write
        released: list[float] = []
        async with trio.open_nursery() as n:
            n.start_soon(hub.serve_flusher)

            async def busy() -> None:  # events for every key, all the time
                while True:
                    hub.ingest(frame(*(ev(k, "tick") for k in keys)), "test")
                    await trio.sleep(0.01)

            busy_scope = trio.CancelScope()

            async def run_busy() -> None:
                with busy_scope:
                    await busy()

            n.start_soon(run_busy)
            await trio.sleep(0.1)
            for _ in range(400):
                hub.end_later(lambda: released.append(trio.current_time()))
            began = trio.current_time()
            await trio.sleep(0.5)
            busy_released = len(released)
            # At the busy rate (with its bucket's one round of slack).
            assert 0 < busy_released <= hub_module.ENDS_BUSY_RATE * 0.5 + hub_module.ENDS_IDLE, busy_released
            busy_scope.cancel()
            await trio.sleep(0.5)  # quiet: the rest go a round at a time
            assert len(released) == 400, len(released)
            for _ in range(10):
                hub.end_later(lambda: released.append(trio.current_time()))
            hub.begin_drain()
            assert len(released) == 410, "the drain lets every ended stream go at once"
            hub.end_later(lambda: released.append(trio.current_time()))
            assert len(released) == 411, "while draining, at once"
            assert released[0] >= began
            n.cancel_scope.cancel()

    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(main, clock, clock=clock)


def test_the_zmq_ingest_yields_to_the_loop_every_turn_slice() -> None:
    """However much input is queued, a turn of the ZMQ drain stops after
    TURN_SLICE of work (or TURN_BATCH messages) and lets the other tasks
    run; nothing queued is lost."""
    import zmq

    from broker.server import zmq_ingest

    async def main(clock: trio.testing.MockClock) -> None:
        hub = Hub(from_mapping({}))
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 0)  # no limit: all of it is queued up front
        pull.bind("inproc://slices")
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect("inproc://slices")
        total = 3000
        for i in range(total):
            push.send(orjson.dumps(ev("wf", "tick", seq=i + 1)), zmq.NOBLOCK)
        got = 0
        real_batch = hub.ingest_batch

        def slow_batch(
            frames: list[bytes], source: str, until: float | None = None, tenants: list[str | None] | None = None
        ) -> collections.deque:
            nonlocal got
            got += len(frames)
            left = real_batch(frames, source, until, tenants)
            clock.jump(0.001 * len(frames) / zmq_ingest.CHUNK)  # 1 ms a chunk of work
            return left

        hub.ingest_batch = slow_batch  # type: ignore[method-assign]
        gaps: list[float] = []
        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    n.start_soon(hub.serve_flusher)
                    n.start_soon(zmq_ingest.serve_zmq_ingest, pull, hub)
                    last = trio.current_time()
                    while got < total:
                        await trio.lowlevel.checkpoint()
                        now = trio.current_time()
                        gaps.append(now - last)
                        last = now
                    n.cancel_scope.cancel()
        finally:
            push.close(0)
            ctx.destroy(linger=0)
        assert got == total
        # A turn is TURN_SLICE of work, at most one chunk past it; trio may
        # run two turns between two of this task's (its order in a round varies).
        assert max(gaps) <= 2 * (zmq_ingest.TURN_SLICE + 0.001) + 1e-9, max(gaps)
        assert hub.state.counters["ingested"] == total

    clock = trio.testing.MockClock()
    trio.run(main, clock, clock=clock)


def test_accept_pauses_on_emfile_logs_once_an_interval_and_keeps_the_budget(caplog) -> None:
    """server/listen.py `Acceptor`: a listener failing with EMFILE is
    retried after a pause with one log line per ACCEPT_LOG_EVERY, never a
    traceback; at the socket budget it waits for a socket to close."""
    import errno
    import logging

    from broker.core.limits import SocketBudget
    from broker.server import listen

    class Listener:
        def __init__(self) -> None:
            self.failures = 0
            self.accepted = 0

        async def accept(self) -> tuple[object, None]:
            await trio.lowlevel.checkpoint()
            if self.failures < 500:  # 50 s of EMFILE at one attempt per 0.1 s
                self.failures += 1
                raise OSError(errno.EMFILE, "Too many open files")
            self.accepted += 1
            return object(), None

    async def main() -> None:
        listener = Listener()
        budget = SocketBudget(3)
        taken: list[object] = []
        acceptor = listen.Acceptor(listener, budget, taken.append)
        with caplog.at_level(logging.WARNING, logger="broker.http"):
            async with trio.open_nursery() as n:
                n.start_soon(acceptor.run)
                await trio.sleep(60)
                assert listener.failures == 500
                assert len(taken) == 3 and budget.open == 3  # then it waits at the budget
                accepted = listener.accepted
                await trio.sleep(5)
                assert listener.accepted == accepted
                acceptor.closed()  # one socket ends: one more is taken
                await trio.sleep(0.1)
                assert len(taken) == 4 and budget.open == 3
                n.cancel_scope.cancel()
        lines = [r for r in caplog.records if "accept failed" in r.getMessage()]
        assert 5 <= len(lines) <= 6, [r.getMessage() for r in lines]  # 50 s at one line per 10 s
        assert not any(r.exc_info for r in caplog.records)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_stream_whose_workflow_ends_while_draining_still_ends() -> None:
    """The stream takes its last events itself (not parked: the drain hands
    every stream back), then waits for its turn to end: the drain must not
    leave it waiting (found by review)."""

    async def main() -> None:
        hub = Hub(from_mapping({}))
        hub.ingest(frame(ev("wf", "workflow.running")), "test")
        scope, receive = STREAM_SCOPE, stream_request()
        bodies: list[bytes] = []
        snapshot = trio.Event()

        async def send(msg: dict) -> None:
            if msg["type"] == "http.response.body":
                bodies.append(msg["body"])
                if b"snapshot" in msg["body"]:
                    snapshot.set()
            await trio.lowlevel.checkpoint()

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(hub.serve_flusher)
                async with trio.open_nursery() as stream:
                    stream.start_soon(sse.handle, hub, scope, receive, send, sse.stream_target(scope))
                    await snapshot.wait()
                    hub.ingest(frame(ev("wf", "workflow.completed")), "test")
                    hub.begin_drain()
                n.cancel_scope.cancel()
        assert not hub.connections
        assert bodies[-1] == b""

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
