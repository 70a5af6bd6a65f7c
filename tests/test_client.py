"""broker.client.subscribe() against the daemon as a subprocess: the sync
iterator and the trio one, over SSE and WebSocket; every event exactly
once across an admin close and a broker restart (with the store, whose
cursors survive it); a `resync` applied to the view; refusals raised.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from broker.client import Message, Subscription, SubscriptionError, subscribe

from .builders import ev, log, task
from .conftest import ROOT, Daemon, wait_until
from .e2e import uid

TRANSPORTS = ["sse", "ws"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lifecycle(wid: str, ticks: int, *, first_seq: int | None = None) -> list[dict[str, Any]]:
    """A workflow's run: running, one task with progress and a log per
    step, completed. With `first_seq`: engine-sequenced from it."""
    events = [ev(wid, "workflow.running"), task(wid, "t-1", "running")]
    for i in range(ticks):
        events.append(task(wid, "t-1", "progress", progress=round(100 * (i + 1) / (ticks + 1), 1)))
        events.append(log(wid, f"step {i}"))
    events += [task(wid, "t-1", "completed", result={"ok": True}), ev(wid, "workflow.completed")]
    if first_seq is not None:
        events = [{**e, "seq": first_seq + i} for i, e in enumerate(events)]
    return events


def event_seqs(messages: list[Message]) -> list[int]:
    return [m.data["seq"] for m in messages if m.is_event]


def reached(seq: int) -> Callable[[list[Message]], bool]:
    """`collect` until an event at or past `seq` came."""
    return lambda got: bool(event_seqs(got)) and event_seqs(got)[-1] >= seq


def assert_once(messages: list[Message], events: list[dict[str, Any]], first: int = 1) -> None:
    """Each event of `events` (seqs from `first`) came exactly once and in
    order, progress excepted: the broker coalesces a task's progress to
    its latest within a write (by design), so of those a subset comes."""
    seqs = event_seqs(messages)
    assert seqs == sorted(set(seqs)), seqs  # in order, none twice
    kept = [first + i for i, e in enumerate(events) if e["type"] != "task.progress"]
    assert [q for q in seqs if q in set(kept)] == kept, seqs
    assert set(seqs) <= set(range(first, first + len(events))), seqs


async def collect(sub: Subscription, until: Callable[[list[Message]], bool] | None = None) -> list[Message]:
    """Every message of `sub` (entered) until it is over (or `until` holds)."""
    got: list[Message] = []
    async for msg in sub:
        got.append(msg)
        if until is not None and until(got):
            break
    return got


async def close_connections(daemon: Daemon) -> int:
    """An admin closes every open stream (the clients resume)."""
    async with httpx.AsyncClient(base_url=daemon.url) as http:
        conns = (await http.get("/v1/admin/connections")).json()["connections"]
        for c in conns:
            assert (await http.delete(f"/v1/admin/connections/{c['id']}")).status_code == 202
        return len(conns)


def open_streams(daemon: Daemon) -> int:
    return len(httpx.get(f"{daemon.url}/v1/admin/connections").json()["connections"])


async def opened(daemon: Daemon) -> None:
    """Until a subscription is placed (waiting for its workflow, so that
    it gets every event from the first): a WebSocket is listed from its
    accept on, its subscription once its `subscribe` was read."""
    async with httpx.AsyncClient(base_url=daemon.url) as http:
        while not any(c["subscriptions"] for c in (await http.get("/v1/admin/connections")).json()["connections"]):
            await trio.sleep(0.01)


# ------------------------------------------------------------------ sync


def test_sync_iterator_waits_for_the_workflow_and_stops_at_its_end(broker: Daemon) -> None:
    wid = uid("client")
    events = lifecycle(wid, 3)
    got: list[Message] = []
    with subscribe(broker.url, workflow=wid) as sub:
        wait_until(lambda: open_streams(broker) == 1)  # it waits for the workflow
        broker.push(*events)
        for msg in sub:
            got.append(msg)
    kinds = [m.kind for m in got]
    assert kinds[-1] == "end" and "snapshot" not in kinds, kinds
    # Opened before the workflow existed: every event, from the first.
    assert_once(got, events)
    snap = sub.view.workflows[wid]
    assert snap.state == "completed" and snap.tasks["t-1"].state == "completed"
    assert snap.tasks["t-1"].progress == 100 and snap.tasks["t-1"].result == {"ok": True}
    assert wid in sub.view.ended and sub.cursor == got[-1].cursor
    assert sub.reconnects == 0


def test_a_slow_sync_consumer_still_gets_every_message(broker: Daemon) -> None:
    wid = uid("slow-sync")
    # More than the client's buffer (256), but few enough that the socket
    # buffers hold them: the broker is not held up (it would degrade a
    # subscriber that stops reading into a resync, by design).
    lines = [log(wid, f"line {i}") for i in range(300)]
    with subscribe(broker.url, workflow=wid) as sub:
        wait_until(lambda: open_streams(broker) == 1)
        broker.push(ev(wid, "workflow.running"), *lines, ev(wid, "workflow.completed"))
        wait_until(lambda: sub._queue is not None and sub._queue.full(), timeout=10)  # the client's buffer is full
        got = list(sub)
    logs = [m.data["message"] for m in got if m.kind == "log"]
    assert logs == [f"line {i}" for i in range(300)] and got[-1].kind == "end"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sync_iterator_raises_what_no_retry_mends(broker: Daemon, transport: Any) -> None:
    with pytest.raises(SubscriptionError) as bad:
        for _ in subscribe(broker.url, workflow=uid("c"), level="loud", transport=transport):
            pass
    assert bad.value.code == "invalid_argument"
    # The daemon's unknown_workflow_wait is 2 s in the tests.
    with pytest.raises(SubscriptionError) as missing:
        for _ in subscribe(broker.url, workflow=uid("never"), transport=transport):
            pass
    assert missing.value.code == "not_found"
    if transport == "sse":
        assert bad.value.status == 400 and missing.value.status == 404
    with pytest.raises(ValueError):
        subscribe(broker.url, workflow="a", tenant="b")


def test_sync_subscription_gives_up_after_its_limit_without_a_broker() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SubscriptionError) as err:
        for _ in subscribe(url, workflow="w", retry_min=0.05, retry_max=0.1, give_up_after=0.5):
            pass
    assert err.value.code == "unavailable"


# ----------------------------------------------------------------- async


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_async_iterator_gets_every_event_once_and_the_state(broker: Daemon, transport: str) -> None:
    wid = uid(f"client-{transport}")
    broker.push(ev(wid, "workflow.running"))
    with trio.fail_after(15):
        async with subscribe(broker.url, workflow=wid, transport=transport) as sub:
            first = await sub.__anext__()
            assert first.kind == "snapshot" and first.data["state"] == "running"
            events = lifecycle(wid, 5)[1:]
            broker.push(*events)
            got = await collect(sub)
    assert_once(got, events, first=2)
    assert got[-1].kind == "end" and sub.view.workflows[wid].state == "completed"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_event_exactly_once_across_admin_closes(broker: Daemon, transport: str) -> None:
    wid = uid(f"closes-{transport}")
    events = lifecycle(wid, 40)
    with trio.fail_after(30):
        async with subscribe(broker.url, workflow=wid, transport=transport, retry_min=0.05, retry_max=0.2) as sub:
            got: list[Message] = []
            await opened(broker)
            broker.push(*events[:30])
            got += await collect(sub, reached(30))
            assert await close_connections(broker) == 1
            broker.push(*events[30:60])
            got += await collect(sub, reached(60))
            assert await close_connections(broker) == 1
            broker.push(*events[60:])
            got += await collect(sub)
    assert_once(got, events)
    assert sub.reconnects >= 2 and got[-1].kind == "end"


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_event_exactly_once_across_a_broker_restart_with_the_store(
    pg_dsn: str, broker_factory: Callable[..., Daemon], transport: str
) -> None:
    sections: dict[str, Any] = {
        "http": {"bind": f"127.0.0.1:{free_port()}"},
        "store": {"backend": "postgres", "dsn": pg_dsn, "flush_ms": 20},
    }
    daemon = broker_factory(**sections)
    wid = uid(f"restart-{transport}")
    events = lifecycle(wid, 20, first_seq=1)
    with trio.fail_after(60):
        async with subscribe(daemon.url, workflow=wid, transport=transport, retry_min=0.05, retry_max=0.3) as sub:
            await opened(daemon)
            daemon.push(*events[:20])
            got = await collect(sub, reached(20))
            # Written before the stop: a graceful stop flushes the store.
            assert await trio.to_thread.run_sync(daemon.stop, signal.SIGTERM) == 0, daemon.output()
            daemon = broker_factory(**sections)
            daemon.push(*events[20:])
            got += await collect(sub)
    assert_once(got, events)
    assert [m.kind for m in got].count("resync") == 0 and sub.reconnects >= 1
    assert sub.view.workflows[wid].state == "completed"


async def test_a_cursor_out_of_reach_gets_a_resync_that_the_view_applies(broker: Daemon) -> None:
    wid = uid("resync")
    broker.push(*lifecycle(wid, 2)[:-1])
    with trio.fail_after(15):
        # A cursor of another incarnation (epoch): the broker answers with
        # a resync, the workflow as it is now.
        async with subscribe(broker.url, workflow=wid, cursor="zzzzzz:3", transport="ws") as sub:
            first = await sub.__anext__()
            assert first.kind == "resync", first
            snap = sub.view.workflows[wid]
            assert snap.tasks["t-1"].state == "completed" and snap.state == "running"
            broker.push(ev(wid, "workflow.failed", error={"why": "test"}))
            got = await collect(sub)
    assert [m.kind for m in got] == ["state", "end"]
    assert sub.view.workflows[wid].state == "failed" and sub.cursor == got[-1].cursor


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_listed_workflows_stop_when_each_has_ended(broker: Daemon, transport: str) -> None:
    a, b = uid("list-a"), uid("list-b")
    with trio.fail_after(15):
        async with subscribe(broker.url, workflows=[a, b], transport=transport) as sub:
            await opened(broker)
            broker.push(*lifecycle(a, 1))
            got = await collect(sub, lambda g: any(m.kind == "end" for m in g))
            assert not sub.state.done
            broker.push(*lifecycle(b, 1))
            got += await collect(sub)
    ends = [m.workflow_id for m in got if m.kind == "end"]
    assert sorted(ends) == sorted([a, b]) and sub.state.done
    assert {sub.view.workflows[w].state for w in (a, b)} == {"completed"}


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_parent_subscription_is_over_once_its_tree_has_ended(broker: Daemon, transport: str) -> None:
    # The client cannot know a tree's end by itself: SSE's stream closes and
    # its resume is answered 204, a WebSocket's gets `unsubscribed` "ended".
    root = uid("tree")
    child = uid("tree-child")
    broker.push(ev(root, "workflow.running"))
    with trio.fail_after(15):
        async with subscribe(broker.url, parent=root, transport=transport) as sub:
            await opened(broker)
            broker.push(ev(child, "workflow.running", parent_id=root))
            broker.push(ev(child, "workflow.completed", parent_id=root))
            broker.push(ev(root, "workflow.completed"))
            got = await collect(sub)
    assert [m.workflow_id for m in got if m.kind == "end"] == [child, root]


@pytest.mark.parametrize("flags", [[], ["--trio", "--ws"]])
async def test_the_example_follows_a_workflow_to_its_end(broker: Daemon, flags: list[str]) -> None:
    wid = uid("example")
    args = [sys.executable, str(ROOT / "examples" / "follow.py"), wid, "--url", broker.url, *flags]
    with trio.fail_after(20):
        done: list[Any] = []

        async def run() -> None:
            done.append(await trio.run_process(args, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await opened(broker)
            broker.push(*lifecycle(wid, 2))
    proc = done[0]
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "end: completed" in out and "t-1: completed (attempt 1)" in out and "log  [info] step 1" in out, out
