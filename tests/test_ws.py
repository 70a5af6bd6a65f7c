"""WebSocket `GET /v1/ws` end to end (DESIGN.md §5 "WebSocket", §6, §11;
docs/protocol.md "WebSocket"), against the daemon as a real subprocess with
trio-websocket as the client.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from .builders import ev, log
from .e2e import poll
from .ws_client import Msg, WsClient, unbatch, ws_client

JOURNAL_CURSOR = re.compile(r"^[A-Za-z0-9_-]+\.(\d+)$")


# ----------------------------------------------------------------- helpers


def ws_url(daemon) -> str:
    return daemon.ws_url + "/v1/ws"


async def get_json(daemon, path: str) -> Any:
    async with httpx.AsyncClient(base_url=daemon.url) as client:
        r = await client.get(path)
        assert r.status_code == 200, r.text
        return r.json()


async def wait_stats(daemon, pred) -> dict[str, Any]:
    """Poll /v1/admin/stats until `pred(stats)` (callers hold a fail_after)."""
    async with httpx.AsyncClient(base_url=daemon.url) as client:
        while True:
            stats = (await client.get("/v1/admin/stats")).json()
            if pred(stats):
                return stats
            await trio.sleep(0.02)


async def subscribe(c: WsClient, sub: str, **args: Any) -> None:
    await c.send({"op": "subscribe", "sub": sub, **args})


async def open_sub(c: WsClient, sub: str, **args: Any) -> Msg:
    """Subscribe without a cursor and return the snapshot that opens the stream."""
    await subscribe(c, sub, **args)
    msg = await c.next_sub(sub)
    assert msg["kind"] == "snapshot", msg
    return msg


def seqs(events: list[Msg]) -> list[int]:
    return [e["seq"] for e in events]


def check_cursors(raw: list[Msg], sub: str) -> None:
    """Every message of a single-workflow sub carries sub and the cursor of its last event."""
    for msg in raw:
        assert msg["sub"] == sub, msg
        last = unbatch(msg)[-1]
        assert msg["cursor"] == f"{last['epoch']}:{last['seq']}", msg


async def expect_error(c: WsClient, code: str, sub: str | None = None) -> Msg:
    if sub is None:
        msg = await c.next(lambda m: m.get("kind") == "error")
    else:
        msg = await c.next(lambda m: m.get("kind") == "error" and m.get("sub") == sub)
    assert msg["code"] == code, msg
    assert isinstance(msg["message"], str) and msg["message"], msg
    return msg


async def expect_close(c: WsClient) -> int:
    """Read until the server closes; return the close code."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await c._read()
    return info.value.reason.code


# ------------------------------------------------------ one workflow, live


async def test_snapshot_first_then_live_events_in_order(broker):
    wid = "wf-live"
    broker.push([ev(wid, "workflow.running"), ev(wid, "task.running", task_id="t-1")])
    with trio.fail_after(10):
        await _until_seq(broker, wid, 2)
        async with ws_client(ws_url(broker)) as c:
            snap = await open_sub(c, "s1", workflow=wid)
            epoch = snap["epoch"]
            assert snap["sub"] == "s1" and snap["workflow_id"] == wid
            assert snap["seq"] == 2 and snap["state"] == "running"
            assert snap["tasks"]["t-1"]["state"] == "running"
            assert snap["cursor"] == f"{epoch}:2"

            broker.push(ev(wid, "task.progress", task_id="t-1", progress=40))
            broker.push(log(wid, "hello", task_id="t-1"))
            broker.push(ev(wid, "token", data={"n": 1}))
            broker.push(ev(wid, "task.completed", task_id="t-1", result={"rows": 3}))
            events, raw = await c.events("s1", 4)
    assert [e["kind"] for e in events] == ["progress", "log", "event", "state"]
    assert seqs(events) == [3, 4, 5, 6]
    assert all(e["epoch"] == epoch and e["workflow_id"] == wid for e in events)
    assert events[0]["progress"] == 40
    assert events[1]["message"] == "hello" and events[1]["level"] == "info"
    assert events[2]["type"] == "token" and events[2]["data"] == {"n": 1}
    assert events[3]["state"] == "completed" and events[3]["result"] == {"rows": 3}
    check_cursors(raw, "s1")


# ------------------------------------------------------------------ resume


async def test_resume_with_since_and_cursor_gives_exactly_the_suffix(broker):
    wid = "wf-resume"
    broker.push([ev(wid, "workflow.running")] + [log(wid, f"l{i}") for i in range(2, 7)])
    with trio.fail_after(10):
        await _until_seq(broker, wid, 6)
        async with ws_client(ws_url(broker)) as c:
            snap = await open_sub(c, "live", workflow=wid)
            epoch = snap["epoch"]
            assert snap["seq"] == 6

            await subscribe(c, "since3", workflow=wid, since=3)
            await subscribe(c, "since0", workflow=wid, since=0)
            await subscribe(c, "cur5", workflow=wid, cursor=f"{epoch}:5")
            await subscribe(c, "cur6", workflow=wid, cursor=f"{epoch}:6")
            await c.roundtrip()  # all four are placed before the next event
            broker.push(log(wid, "l7"))

            got = {}
            for sub in ("since3", "since0", "cur5", "cur6", "live"):
                got[sub] = await c.until(sub, lambda e: e["seq"] == 7)
    assert seqs(got["since3"][0]) == [4, 5, 6, 7]
    assert seqs(got["since0"][0]) == [1, 2, 3, 4, 5, 6, 7]
    assert seqs(got["cur5"][0]) == [6, 7]
    assert seqs(got["cur6"][0]) == [7]
    assert seqs(got["live"][0]) == [7]
    for sub, (events, raw) in got.items():
        assert all(e["kind"] in ("state", "log") for e in events), (sub, events)
        check_cursors(raw, sub)
    assert [e["message"] for e in got["since3"][0]] == ["l4", "l5", "l6", "l7"]


async def _until_seq(daemon, wid: str, seq: int) -> None:
    """Until `wid` is known with at least `seq` events (the ingest is ZMQ: no ack)."""
    async with httpx.AsyncClient(base_url=daemon.url) as client:

        async def known() -> bool:
            r = await client.get(f"/v1/workflows/{wid}")
            return r.status_code == 200 and r.json()["seq"] >= seq

        await poll(known, 5, interval=0.01)


async def test_cursor_of_another_epoch_or_malformed_resyncs(broker):
    wid = "wf-resync"
    broker.push([ev(wid, "workflow.running"), ev(wid, "task.running", task_id="t-1")])
    with trio.fail_after(10):
        # Both events in before the first subscription (else it waits for the
        # workflow and gets its events from the first, not a snapshot).
        await _until_seq(broker, wid, 2)
        async with ws_client(ws_url(broker)) as c:
            snap = await open_sub(c, "live", workflow=wid)
            epoch = snap["epoch"]
            other = "x0x0x0" if epoch != "x0x0x0" else "y0y0y0"
            cases = {
                "other-epoch": f"{other}:1",
                "ahead": f"{epoch}:99",
                "malformed": "not a cursor",
            }
            for sub, cursor in cases.items():
                await subscribe(c, sub, workflow=wid, cursor=cursor)
                msg = await c.next_sub(sub)
                first = unbatch(msg)[0]
                assert first["kind"] == "resync", (sub, msg)
                assert first["seq"] == 2 and first["epoch"] == epoch
                assert first["tasks"]["t-1"]["state"] == "running"
                assert msg["cursor"] == f"{epoch}:2"
            broker.push(log(wid, "after"))
            for sub in cases:
                events, raw = await c.events(sub, 1)
                assert seqs(events) == [3] and events[0]["kind"] == "log", (sub, events)
                check_cursors(raw, sub)


async def test_since_ahead_is_an_error_for_that_sub_only(broker):
    wid = "wf-ahead"
    broker.push([ev(wid, "workflow.running"), log(wid, "x")])
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await open_sub(c, "other", workflow=wid)
            await subscribe(c, "s1", workflow=wid, since=3)
            err = await expect_error(c, "invalid_argument", sub="s1")
            assert "ahead" in err["message"]
            await c.roundtrip()  # still open
            # The failed sub is gone: its id can be used again.
            await subscribe(c, "s1", workflow=wid, since=1)
            broker.push(log(wid, "y"))
            events, raw = await c.events("s1", 2)
            assert seqs(events) == [2, 3]
            check_cursors(raw, "s1")
            events, _ = await c.events("other", 1)
            assert seqs(events) == [3]


async def test_resume_older_than_the_ring(broker_factory):
    b = broker_factory(buffer={"ring_events": 4})
    wid = "wf-small-ring"
    b.push([ev(wid, "workflow.running")] + [log(wid, f"l{i}") for i in range(2, 11)])
    with trio.fail_after(10):
        async with ws_client(ws_url(b)) as c:
            snap = await open_sub(c, "live", workflow=wid)
            epoch = snap["epoch"]
            assert snap["seq"] == 10  # the ring holds 7..10: oldest usable since is 6
            await subscribe(c, "old", workflow=wid, since=5)
            err = await expect_error(c, "invalid_argument", sub="old")
            assert "6" in err["message"]
            await subscribe(c, "zero", workflow=wid, since=0)
            await expect_error(c, "invalid_argument", sub="zero")
            await subscribe(c, "oldest", workflow=wid, since=6)
            events, _ = await c.events("oldest", 4)
            assert seqs(events) == [7, 8, 9, 10]
            await subscribe(c, "oldcur", workflow=wid, cursor=f"{epoch}:2")
            msg = await c.next_sub("oldcur")
            assert unbatch(msg)[0]["kind"] == "resync" and unbatch(msg)[0]["seq"] == 10
            await c.roundtrip()


# ----------------------------------------------- many subs on one connection


async def test_several_subscriptions_each_get_their_own_stream(broker):
    a, b = "wf-a", "wf-b"
    broker.push([ev(a, "workflow.running"), ev(b, "workflow.running")])
    subs = {
        "a-all": dict(workflow=a),
        "b-all": dict(workflow=b),
        "a-logs": dict(workflow=a, filter={"types": ["log"]}),
        "a-t1": dict(workflow=a, filter={"tasks": ["t-1"]}),
        "a-warn": dict(workflow=a, filter={"types": ["log"], "level": "warning"}),
        "a-state": dict(workflow=a, filter={"types": ["state"], "states": ["terminal"]}),
    }
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            for sub, args in subs.items():
                snap = await open_sub(c, sub, **args)
                assert snap["workflow_id"] == args["workflow"] and snap["seq"] == 1
            broker.push(ev(a, "task.running", task_id="t-1"))  # a2
            broker.push(log(b, "b-line"))  # b2
            broker.push(log(a, "a-line"))  # a3
            broker.push(ev(a, "task.running", task_id="t-2"))  # a4
            broker.push(log(a, "t1-warn", "warning", task_id="t-1"))  # a5
            broker.push(ev(b, "workflow.completed"))  # b3
            broker.push(ev(a, "token"))  # a6
            broker.push(ev(a, "task.completed", task_id="t-1"))  # a7
            broker.push(log(a, "t1-err", "error", task_id="t-1"))  # a8: every a-sub
            broker.push(ev(a, "workflow.failed"))  # a9: terminal
            got = {}
            for sub in subs:
                got[sub] = await c.until(sub, lambda e: e["kind"] == "end")
    expected = {
        "a-all": [2, 3, 4, 5, 6, 7, 8, 9, 9],
        "b-all": [2, 3, 3],
        "a-logs": [3, 5, 8, 9],
        "a-t1": [2, 5, 7, 8, 9, 9],
        "a-warn": [5, 8, 9],
        "a-state": [7, 9, 9],
    }
    for sub, want in expected.items():
        events, raw = got[sub]
        assert seqs(events) == want, (sub, events)
        assert events[-1]["kind"] == "end"
        assert all(e["workflow_id"] == subs[sub]["workflow"] for e in events)
        check_cursors(raw, sub)
    assert got["b-all"][0][-1]["state"] == "completed"
    assert got["a-all"][0][-1]["state"] == "failed"


# ------------------------------------------------------- multi-workflow subs


async def node_epoch(daemon) -> str:
    return (await get_json(daemon, "/v1/admin/stats"))["node_epoch"]


def check_journal_cursors(raw: list[Msg], sub: str, epoch: str) -> None:
    offsets = []
    for msg in raw:
        assert msg["sub"] == sub, msg
        m = JOURNAL_CURSOR.match(msg["cursor"])
        assert m and msg["cursor"].startswith(epoch + "."), msg
        offsets.append(int(m.group(1)))
    assert offsets == sorted(offsets)


async def test_workflows_list_subscription(broker):
    broker.push([ev("m-a", "workflow.running"), ev("m-b", "workflow.running"), ev("m-c", "workflow.running")])
    with trio.fail_after(10):
        epoch = await node_epoch(broker)
        async with ws_client(ws_url(broker)) as c:
            await subscribe(c, "m", workflows=["m-b", "m-a", "m-late"])
            opening, raw0 = await c.events("m", 2)
            assert [(e["kind"], e["workflow_id"]) for e in opening] == [("snapshot", "m-a"), ("snapshot", "m-b")]
            broker.push(log("m-c", "not mine"))
            broker.push(log("m-a", "a1"))
            broker.push(ev("m-late", "workflow.running"))  # a listed workflow that starts later
            broker.push(ev("m-b", "workflow.completed"))
            broker.push(ev("m-a", "workflow.completed"))
            broker.push(log("m-c", "still not mine"))
            broker.push(ev("m-late", "workflow.completed"))
            events, raw = await c.until("m", lambda e: e["kind"] == "end" and e["workflow_id"] == "m-late")
            # Every listed workflow ended: the subscription is finished (and
            # says so), its id free again.
            assert await c.next_sub("m") == {"kind": "unsubscribed", "sub": "m", "reason": "ended"}
            await c.roundtrip()
            assert c.pending_for("m") == []
            await subscribe(c, "m", workflows=["m-c"])
            again = await c.next_sub("m")
            assert unbatch(again)[0]["kind"] == "snapshot" and unbatch(again)[0]["workflow_id"] == "m-c"
    assert [(e["kind"], e["workflow_id"]) for e in events] == [
        ("log", "m-a"),
        ("state", "m-late"),
        ("state", "m-b"),
        ("end", "m-b"),
        ("state", "m-a"),
        ("end", "m-a"),
        ("state", "m-late"),
        ("end", "m-late"),
    ]
    check_journal_cursors(raw0 + raw, "m", epoch)


async def test_a_multi_subscription_whose_scope_had_ended_is_told_so_at_once(broker):
    """SSE answers 204 (nothing more will come); a WebSocket subscription
    gets `unsubscribed` with reason `ended` instead of no answer at all."""
    broker.push([ev("d-a", "workflow.completed"), ev("d-p", "workflow.completed")])
    broker.push(ev("d-c", "workflow.failed", parent_id="d-p"))
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=broker.url) as http:
            for query in ("workflows=d-a", "parent=d-p"):
                assert (await http.get(f"/v1/stream?{query}")).status_code == 204, query
        async with ws_client(ws_url(broker)) as c:
            await subscribe(c, "w", workflows=["d-a"])
            assert await c.next_sub("w") == {"kind": "unsubscribed", "sub": "w", "reason": "ended"}
            await subscribe(c, "p", parent="d-p")
            assert await c.next_sub("p") == {"kind": "unsubscribed", "sub": "p", "reason": "ended"}
            # Asked for, `unsubscribed` has no reason; the ids are free again.
            await subscribe(c, "w", workflows=["d-live"])
            await c.send({"op": "unsubscribe", "sub": "w"})
            assert await c.next_sub("w") == {"kind": "unsubscribed", "sub": "w"}


async def test_tenant_subscription_includes_new_workflows_of_that_tenant(broker):
    broker.push(
        [
            ev("t1-a", "workflow.running", tenant="t1"),
            ev("t2-a", "workflow.running", tenant="t2"),
            ev("t1-done", "workflow.completed", tenant="t1"),
        ]
    )
    with trio.fail_after(10):
        epoch = await node_epoch(broker)
        async with ws_client(ws_url(broker)) as c:
            await subscribe(c, "t", tenant="t1")
            msg = await c.next_sub("t")
            # one snapshot per *active* workflow in scope: t1-done is terminal
            assert [(e["kind"], e["workflow_id"]) for e in unbatch(msg)] == [("snapshot", "t1-a")]
            broker.push(log("t2-a", "other tenant"))
            broker.push(ev("t1-b", "workflow.running", tenant="t1"))
            broker.push(log("t1-b", "b"))
            broker.push(log("t1-a", "a"))
            events, raw = await c.until("t", lambda e: e.get("message") == "a")
    assert [(e["kind"], e["workflow_id"]) for e in events] == [("state", "t1-b"), ("log", "t1-b"), ("log", "t1-a")]
    check_journal_cursors([msg] + raw, "t", epoch)


async def test_parent_subscription_includes_children_started_later(broker):
    broker.push(
        [ev("p", "workflow.running"), ev("p-c1", "workflow.running", parent_id="p"), ev("u", "workflow.running")]
    )
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await subscribe(c, "p", parent="p")
            opening, _ = await c.events("p", 2)
            assert [(e["kind"], e["workflow_id"]) for e in opening] == [("snapshot", "p"), ("snapshot", "p-c1")]
            broker.push(log("u", "unrelated"))
            broker.push(ev("p-c2", "workflow.running", parent_id="p"))
            broker.push(ev("p-c2-g", "workflow.running", parent_id="p-c2"))
            broker.push(log("p-c2-g", "grandchild"))
            broker.push(log("p-c1", "child"))
            broker.push(log("p", "root"))
            events, _ = await c.until("p", lambda e: e.get("message") == "root")
    assert [(e["kind"], e["workflow_id"]) for e in events] == [
        ("state", "p-c2"),
        ("state", "p-c2-g"),
        ("log", "p-c2-g"),
        ("log", "p-c1"),
        ("log", "p"),
    ]


async def test_multi_subscription_resumes_from_its_journal_cursor(broker):
    broker.push(ev("r-a", "workflow.running", tenant="rt"))
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await subscribe(c, "r", tenant="rt")
            await c.next_sub("r")
            broker.push(log("r-a", "1"))
            broker.push(log("r-a", "2"))
            _, raw = await c.until("r", lambda e: e.get("message") == "2")
            cursor = raw[-1]["cursor"]
            await c.send({"op": "unsubscribe", "sub": "r"})
            assert await c.next_sub("r") == {"kind": "unsubscribed", "sub": "r"}
            broker.push(log("r-a", "3"))
            broker.push(ev("r-b", "workflow.running", tenant="rt"))
            broker.push(log("r-a", "4"))
            await subscribe(c, "r2", tenant="rt", cursor=cursor)
            events, _ = await c.until("r2", lambda e: e.get("message") == "4")
            assert [(e["kind"], e["workflow_id"], e.get("message")) for e in events] == [
                ("log", "r-a", "3"),
                ("state", "r-b", None),
                ("log", "r-a", "4"),
            ]
            # `since` is a single-workflow seq: not for multi-workflow subscriptions
            await subscribe(c, "r3", tenant="rt", since=1)
            await expect_error(c, "invalid_argument", sub="r3")


async def test_multi_subscription_with_a_stale_journal_cursor_resyncs(broker):
    """DESIGN §5: `cursor` "resumes like Last-Event-ID", and a multi-workflow
    stream whose cursor is out of reach or of another node epoch gets `resync`
    (fresh snapshots), as SSE does with Last-Event-ID."""
    broker.push(ev("st-a", "workflow.running", tenant="st"))
    with trio.fail_after(10):
        epoch = await node_epoch(broker)
        other = "x0x0x0" if epoch != "x0x0x0" else "y0y0y0"
        async with ws_client(ws_url(broker)) as c:
            await subscribe(c, "s", tenant="st", cursor=f"{other}.1")
            msg = await c.next_sub("s")
            assert msg["kind"] != "error", msg
            assert [(e["kind"], e["workflow_id"]) for e in unbatch(msg)] == [("resync", "st-a")], msg
            assert JOURNAL_CURSOR.match(msg["cursor"]) and msg["cursor"].startswith(epoch + "."), msg
            broker.push(log("st-a", "live"))
            events, _ = await c.events("s", 1)
            assert events[0]["message"] == "live"


# ----------------------------------------------------------------- batches


async def test_pending_events_arrive_as_complete_ordered_batches(broker):
    wid = "wf-batch"
    broker.push(ev(wid, "workflow.running"))
    with trio.fail_after(15):
        async with ws_client(ws_url(broker)) as c:
            snap = await open_sub(c, "s", workflow=wid)
            epoch = snap["epoch"]
            # one ZMQ frame of 100 events: ingested at once, so all are pending together
            broker.push([log(wid, f"m{i}", data={"i": i}) for i in range(100)])
            events, raw = await c.events("s", 100)
            assert any(m["kind"] == "batch" for m in raw), raw
            assert len(raw) < 100
            # then 150 separate frames as fast as ZMQ takes them
            for i in range(100, 250):
                broker.push(log(wid, f"m{i}", data={"i": i}))
            events2, raw2 = await c.events("s", 150)
    events += events2
    raw += raw2
    assert len(events) == 250
    assert seqs(events) == list(range(2, 252))
    assert [e["message"] for e in events] == [f"m{i}" for i in range(250)]
    for e in events:
        assert e["kind"] == "log" and e["workflow_id"] == wid and e["epoch"] == epoch
        assert e["level"] == "info" and e["data"] == {"i": int(e["message"][1:])}
        assert isinstance(e["ts"], int) and isinstance(e["server_ts"], int)
    for m in raw:
        assert m["sub"] == "s"
        if m["kind"] == "batch":
            assert set(m) == {"sub", "cursor", "kind", "events"} and len(m["events"]) >= 2
            assert not any("sub" in e or "cursor" in e for e in m["events"])  # those are on the batch
    check_cursors(raw, "s")
    assert sum(len(unbatch(m)) for m in raw) == 250


async def test_progress_of_one_task_inside_one_batch_is_coalesced(broker):
    """DESIGN §6: "Pending events are sent in one write (SSE) or one batch (WS).
    Progress updates of one task inside one write are coalesced to the latest."""
    wid = "wf-progress"
    broker.push(
        [ev(wid, "workflow.running"), ev(wid, "task.running", task_id="t-1"), ev(wid, "task.running", task_id="t-2")]
    )
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await open_sub(c, "s", workflow=wid)
            frame = []
            for p in range(10, 101, 10):
                frame.append(ev(wid, "task.progress", task_id="t-1", progress=p))
                frame.append(ev(wid, "task.progress", task_id="t-2", progress=p / 2))
            frame.append(log(wid, "marker"))  # seq 24
            broker.push(frame)  # one frame: all pending at once, so one batch
            events, raw = await c.until("s", lambda e: e.get("message") == "marker")
    assert len(raw) == 1 and raw[0]["kind"] == "batch", raw
    progress = {
        t: [e["progress"] for e in events if e["kind"] == "progress" and e["task_id"] == t] for t in ("t-1", "t-2")
    }
    assert progress == {"t-1": [100], "t-2": [50]}, progress
    assert seqs(events) == sorted(seqs(events))
    check_cursors(raw, "s")


# ------------------------------------------------------------ filter op


async def test_filter_op_replaces_the_filter_for_what_comes_next(broker):
    wid = "wf-filter"
    broker.push(ev(wid, "workflow.running"))
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await open_sub(c, "logs", workflow=wid, filter={"types": ["log"], "level": "warning"})

            async def push_and_get(*events: dict[str, Any], last: int) -> list[int]:
                for e in events:
                    broker.push(e)
                got, raw = await c.until("logs", lambda e: e["seq"] == last)
                check_cursors(raw, "logs")
                return seqs(got)

            assert await push_and_get(log(wid, "i"), log(wid, "w", "warning"), log(wid, "e", "error"), last=4) == [3, 4]

            await c.send({"op": "filter", "sub": "logs", "filter": {"types": ["log"], "level": "debug"}})
            await c.roundtrip()
            assert await push_and_get(log(wid, "d", "debug"), log(wid, "i"), last=6) == [5, 6]

            # a bad filter is refused and the old one stays
            await c.send({"op": "filter", "sub": "logs", "filter": {"level": "loud"}})
            await expect_error(c, "invalid_argument", sub="logs")
            await c.send({"op": "filter", "sub": "logs"})
            await expect_error(c, "invalid_argument", sub="logs")
            assert await push_and_get(log(wid, "d2", "debug"), last=7) == [7]

            await c.send({"op": "filter", "sub": "logs", "filter": {"types": ["log"], "level": "error"}})
            await c.roundtrip()
            assert await push_and_get(log(wid, "w2", "warning"), log(wid, "c", "critical"), last=9) == [9]

            await c.send({"op": "filter", "sub": "logs", "filter": {"types": ["state"]}})
            await c.roundtrip()
            assert await push_and_get(log(wid, "c2", "critical"), ev(wid, "task.running", task_id="t"), last=11) == [11]


# ------------------------------------------------------ unsubscribe, ping


async def test_unsubscribe_stops_delivery_and_is_acknowledged(broker):
    wid = "wf-unsub"
    broker.push(ev(wid, "workflow.running"))
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await open_sub(c, "s1", workflow=wid)
            await open_sub(c, "s2", workflow=wid)
            await c.send({"op": "unsubscribe", "sub": "s1"})
            assert await c.next_sub("s1") == {"kind": "unsubscribed", "sub": "s1"}
            broker.push(log(wid, "x"))
            events, _ = await c.events("s2", 1)
            assert seqs(events) == [2]
            await trio.sleep(0.3)  # only to show that nothing more comes for s1
            await c.roundtrip()
            assert c.pending_for("s1") == []
            # a second unsubscribe names a sub that no longer exists
            await c.send({"op": "unsubscribe", "sub": "s1"})
            await expect_error(c, "invalid_argument", sub="s1")
            # and the id can be subscribed again
            await subscribe(c, "s1", workflow=wid, since=1)
            events, _ = await c.events("s1", 1)
            assert seqs(events) == [2]


async def test_ping_pong(broker):
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            for _ in range(3):
                await c.send({"op": "ping"})
                assert await c._read() == {"kind": "pong"}


async def test_cancel_is_unavailable_without_control_channel(broker):
    broker.push(ev("wf-cancel", "workflow.running"))
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await c.send({"op": "cancel", "workflow": "wf-cancel", "reason": "test"})
            await expect_error(c, "unavailable")
            await c.roundtrip()


# ------------------------------------------------------ bad client messages


BAD_MESSAGES: list[tuple[str, Any, str | None]] = [
    ("not JSON", "{nope", None),
    ("binary not JSON", b"\xff\x00\x01", None),
    ("JSON array", "[1, 2]", None),
    ("JSON number", "42", None),
    ("JSON string", '"subscribe"', None),
    ("JSON null", "null", None),
    ("missing op", {"sub": "x", "workflow": "wf-ok"}, "x"),
    ("unknown op", {"op": "frobnicate"}, None),
    ("op not a string", {"op": 7}, None),
    ("subscribe without sub", {"op": "subscribe", "workflow": "wf-ok"}, None),
    ("empty sub", {"op": "subscribe", "sub": "", "workflow": "wf-ok"}, ""),
    ("sub not a string", {"op": "subscribe", "sub": 5, "workflow": "wf-ok"}, None),
    ("sub too long", {"op": "subscribe", "sub": "s" * 129, "workflow": "wf-ok"}, "s" * 129),
    ("duplicate sub id", {"op": "subscribe", "sub": "live", "workflow": "wf-ok"}, "live"),
    ("two scopes", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "tenant": "default"}, "x"),
    ("no scope", {"op": "subscribe", "sub": "x"}, "x"),
    ("unknown subscribe key", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "colour": 1}, "x"),
    ("workflow not a string", {"op": "subscribe", "sub": "x", "workflow": 3}, "x"),
    ("empty workflow", {"op": "subscribe", "sub": "x", "workflow": ""}, "x"),
    ("empty workflows", {"op": "subscribe", "sub": "x", "workflows": []}, "x"),
    ("workflows not a list", {"op": "subscribe", "sub": "x", "workflows": "wf-ok"}, "x"),
    ("empty tenant", {"op": "subscribe", "sub": "x", "tenant": ""}, "x"),
    ("bad filter key", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "filter": {"colour": ["red"]}}, "x"),
    ("bad filter type", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "filter": {"types": ["bogus"]}}, "x"),
    ("filter types a string", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "filter": {"types": "log"}}, "x"),
    ("empty filter list", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "filter": {"tasks": []}}, "x"),
    ("bad level", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "filter": {"level": "loud"}}, "x"),
    ("coalesce not bool", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "filter": {"coalesce": "yes"}}, "x"),
    ("filter not an object", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "filter": ["log"]}, "x"),
    ("since negative", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "since": -1}, "x"),
    ("since bool", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "since": True}, "x"),
    ("since string", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "since": "1"}, "x"),
    ("since float", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "since": 1.5}, "x"),
    ("cursor not a string", {"op": "subscribe", "sub": "x", "workflow": "wf-ok", "cursor": 5}, "x"),
    ("since on multi", {"op": "subscribe", "sub": "x", "workflows": ["wf-ok"], "since": 1}, "x"),
    ("filter op for unknown sub", {"op": "filter", "sub": "nope", "filter": {}}, "nope"),
    ("filter op without sub", {"op": "filter", "filter": {}}, None),
    ("filter op bad filter", {"op": "filter", "sub": "live", "filter": {"types": ["nope"]}}, "live"),
    ("unsubscribe unknown sub", {"op": "unsubscribe", "sub": "nope"}, "nope"),
    ("unsubscribe without sub", {"op": "unsubscribe"}, None),
]


async def test_every_bad_client_message_is_an_error_and_the_connection_stays_usable(broker):
    wid = "wf-ok"
    broker.push(ev(wid, "workflow.running"))
    with trio.fail_after(20):
        async with ws_client(ws_url(broker)) as c:
            await open_sub(c, "live", workflow=wid)
            for name, message, sub in BAD_MESSAGES:
                await c.send(message)
                err = await c.next(lambda m: m.get("kind") == "error")
                assert err["code"] == "invalid_argument", (name, err)
                assert isinstance(err["message"], str) and err["message"], (name, err)
                if sub is None:
                    assert "sub" not in err, (name, err)
                else:
                    assert err.get("sub") == sub, (name, err)
                await c.roundtrip()
            # none of it created a subscription or disturbed the live one
            broker.push(log(wid, "still here"))
            events, raw = await c.events("live", 1)
            assert seqs(events) == [2] and events[0]["message"] == "still here"
            check_cursors(raw, "live")
            await c.roundtrip()
            assert [m for m in c.pending if m.get("kind") != "pong"] == []


# --------------------------------------------------------- unknown workflow


async def test_unknown_workflow_is_not_found_after_the_wait(broker_factory):
    b = broker_factory(stream={"unknown_workflow_wait": 0.5})
    with trio.fail_after(10):
        async with ws_client(ws_url(b)) as c:
            start = trio.current_time()
            await subscribe(c, "ghost", workflow="wf-ghost")
            await subscribe(c, "late", workflow="wf-late")
            await c.roundtrip()  # the connection answers while both wait
            assert not any(m.get("kind") == "error" for m in c.pending)
            b.push(ev("wf-late", "workflow.running"))  # starts within the wait
            # It was there first: it gets the workflow's first event, not a snapshot.
            first, _ = await c.events("late", 1)
            assert first[0]["kind"] == "state" and first[0]["workflow_id"] == "wf-late" and first[0]["seq"] == 1
            err = await expect_error(c, "not_found", sub="ghost")
            elapsed = trio.current_time() - start
            assert 0.4 <= elapsed < 3, elapsed
            assert "wf-ghost" in err["message"]
            await c.roundtrip()
            # the failed sub is gone: the same id may subscribe again
            await subscribe(c, "ghost", workflow="wf-late", since=0)
            events, _ = await c.events("ghost", 1)
            assert seqs(events) == [1]


async def test_unsubscribe_while_waiting_for_the_workflow(broker_factory):
    b = broker_factory(stream={"unknown_workflow_wait": 5})
    with trio.fail_after(10):
        async with ws_client(ws_url(b)) as c:
            await subscribe(c, "p", workflow="wf-later")
            await subscribe(c, "q", workflow="wf-later")
            await c.roundtrip()
            await c.send({"op": "unsubscribe", "sub": "p"})
            assert await c.next_sub("p") == {"kind": "unsubscribed", "sub": "p"}
            b.push(ev("wf-later", "workflow.running"))
            first, _ = await c.events("q", 1)  # the other one opens, from the first event
            assert first[0]["kind"] == "state" and first[0]["seq"] == 1
            await c.roundtrip()
            assert c.pending_for("p") == []
        stats = await wait_stats(b, lambda s: s["connections"]["total"] == 0)
        assert stats["waiters"] == 0, stats


# ---------------------------------------------------------------- the end


async def test_end_after_the_terminal_event_then_the_sub_is_finished(broker):
    wid = "wf-end"
    broker.push([ev(wid, "workflow.running"), ev(wid, "task.running", task_id="t-1")])
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            snap = await open_sub(c, "s", workflow=wid)
            epoch = snap["epoch"]
            broker.push(ev(wid, "task.completed", task_id="t-1"))
            broker.push(ev(wid, "workflow.completed", result={"ok": True}))
            broker.push(log(wid, "after the end"))  # kept for history, not streamed
            events, raw = await c.until("s", lambda e: e["kind"] == "end")
            assert [(e["kind"], e["seq"]) for e in events] == [("state", 3), ("state", 4), ("end", 4)]
            end = events[-1]
            assert end["workflow_id"] == wid and end["epoch"] == epoch and end["state"] == "completed"
            assert raw[-1]["cursor"] == f"{epoch}:4"
            check_cursors(raw, "s")
            # the subscription is finished: unknown to the filter op, its id free again
            await c.send({"op": "filter", "sub": "s", "filter": {}})
            await expect_error(c, "invalid_argument", sub="s")
            await c.roundtrip()
            assert c.pending_for("s") == []
            await subscribe(c, "s", workflow=wid, since=2)
            events, raw = await c.until("s", lambda e: e["kind"] == "end")
            assert [(e["kind"], e["seq"]) for e in events] == [("state", 3), ("state", 4), ("end", 4)]


async def test_subscribing_to_a_terminal_workflow(broker):
    wid = "wf-done"
    broker.push([ev(wid, "workflow.running"), ev(wid, "workflow.failed", error="boom"), log(wid, "late")])
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            # no cursor: the final snapshot, then end
            await subscribe(c, "snap", workflow=wid)
            events, raw = await c.until("snap", lambda e: e["kind"] == "end")
            assert [e["kind"] for e in events] == ["snapshot", "end"]
            assert events[0]["state"] == "failed" and events[0]["error"] == "boom"
            epoch = events[0]["epoch"]
            assert events[1]["seq"] == 2 and events[1]["state"] == "failed"
            assert raw[-1]["cursor"] == f"{epoch}:2"

            # since / cursor already at the terminal event: only an `end`
            for sub, args in (("at-since", {"since": 2}), ("at-cursor", {"cursor": f"{epoch}:2"})):
                await subscribe(c, sub, workflow=wid, **args)
                msg = await c.next_sub(sub)
                assert msg["kind"] == "end", (sub, msg)
                assert msg["workflow_id"] == wid and msg["seq"] == 2 and msg["state"] == "failed", msg
                assert msg["epoch"] == epoch
            # a cursor past what was streamed (seq 3 came after the end) is "ahead": resync, then end
            await subscribe(c, "past", workflow=wid, cursor=f"{epoch}:3")
            events, _ = await c.until("past", lambda e: e["kind"] == "end")
            assert [(e["kind"], e["seq"]) for e in events] == [("resync", 2), ("end", 2)]
            assert events[0]["state"] == "failed"
            await c.roundtrip()
            for sub in ("snap", "at-since", "at-cursor", "past"):
                assert c.pending_for(sub) == [], sub


async def test_end_message_for_a_cursor_at_the_end_carries_its_cursor(broker):
    """docs/protocol.md: every message of a subscription carries `sub` and `cursor`."""
    wid = "wf-done-cursor"
    broker.push([ev(wid, "workflow.running"), ev(wid, "workflow.completed")])
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await subscribe(c, "a", workflow=wid, since=2)
            msg = await c.next_sub("a")
            assert msg["kind"] == "end"
            assert msg.get("cursor") == f"{msg['epoch']}:2", msg


# --------------------------------------------------------------- heartbeat


HEARTBEAT = {"ws_ping_interval": 0.5, "ws_pong_timeout": 0.5}


@pytest.mark.slow
async def test_client_answering_pings_stays_connected(broker_factory):
    b = broker_factory(stream=HEARTBEAT)
    b.push(ev("wf-hb", "workflow.running"))
    with trio.fail_after(15):
        async with ws_client(ws_url(b)) as c:
            await open_sub(c, "s", workflow="wf-hb")
            await c.wait_pings(4)  # ≈ 4 ping/pong-timeout cycles
            assert all(m == {"kind": "ping"} for m in c.raw if m.get("kind") == "ping")
            await c.roundtrip()
            b.push(log("wf-hb", "still connected"))
            events, _ = await c.events("s", 1)
            assert events[0]["message"] == "still connected"


@pytest.mark.slow
async def test_pongs_are_read_while_events_stream_without_pause(broker_factory):
    """One task serves the connection: between writes it must still read
    the client's pongs, or a busy subscription would be closed as silent."""
    b = broker_factory(stream=HEARTBEAT)
    wid = "wf-busy"
    b.push(ev(wid, "workflow.running"))
    with trio.fail_after(20):
        async with ws_client(ws_url(b)) as c:
            await open_sub(c, "s", workflow=wid)
            pushed = 0

            async def engine() -> None:
                nonlocal pushed
                while True:  # an event every 2 ms until cancelled
                    pushed += 1
                    b.push(log(wid, f"m{pushed}"))
                    await trio.sleep(0.002)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine)
                await c.wait_pings(5)  # ≈ 5 ping/pong-timeout cycles under load
                nursery.cancel_scope.cancel()
            await c.roundtrip()  # still open (a close would have raised)
            events, _ = await c.until("s", lambda m: m.get("message") == f"m{pushed}")
    assert pushed > 300, pushed
    assert seqs(events) == list(range(2, 2 + len(events))), "gap or reorder"


async def test_silent_client_is_closed_with_1001(broker_factory):
    b = broker_factory(stream=HEARTBEAT)
    with trio.fail_after(10):
        async with ws_client(ws_url(b), answer_pings=False) as c:
            start = trio.current_time()
            assert await c._read() == {"kind": "ping"}
            code = await expect_close(c)
            elapsed = trio.current_time() - start
        assert code == 1001
        assert elapsed < 3, elapsed
        await wait_stats(b, lambda s: s["connections"]["total"] == 0)


# ------------------------------------------------------------------ limits


async def test_global_limit_refuses_third_connection(broker_factory):
    b = broker_factory(limits={"global": 2})
    b.push(ev("wf-lim", "workflow.running"))
    with trio.fail_after(15):
        async with ws_client(ws_url(b)) as c1:
            await c1.roundtrip()
            async with ws_client(ws_url(b)) as c2:
                await c2.roundtrip()
                await wait_stats(b, lambda s: s["connections"]["total"] == 2)

                async with ws_client(ws_url(b)) as c3:
                    err = await c3._read()
                    assert err["kind"] == "error" and err["code"] == "unavailable", err
                    assert await expect_close(c3) == 4029

                async with httpx.AsyncClient(base_url=b.url) as http:
                    for path in ("/v1/workflows/wf-lim/stream", "/v1/stream?tenant=default"):
                        r = await http.get(path)
                        assert r.status_code == 503, (path, r.status_code, r.text)
                        assert r.headers["content-type"].startswith("application/json")
                        assert r.json()["error"]["code"] == "unavailable"
                        assert r.json()["error"]["message"]

                # the refused ones left nothing behind; the two still work
                await c1.roundtrip()
                await c2.roundtrip()
                stats = await wait_stats(b, lambda s: True)
                assert stats["connections"]["total"] == 2
            # one closed: there is room again
            await wait_stats(b, lambda s: s["connections"]["total"] == 1)
            async with ws_client(ws_url(b)) as c4:
                await open_sub(c4, "s", workflow="wf-lim")
        stats = await wait_stats(b, lambda s: s["connections"]["total"] == 0)
        assert stats["connections"].get("ws", 0) == 0


async def test_closed_clients_leave_no_connections_or_waiters(broker):
    broker.push(ev("wf-stats", "workflow.running"))
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c1, ws_client(ws_url(broker)) as c2:
            await open_sub(c1, "one", workflow="wf-stats")
            await open_sub(c1, "many", tenant="default")
            await subscribe(c1, "pending", workflow="wf-not-yet")  # waits for the workflow
            await c1.roundtrip()
            await open_sub(c2, "one", workflow="wf-stats", filter={"types": ["log"]})
            stats = await wait_stats(broker, lambda s: s["connections"]["total"] == 2)
            assert stats["connections"]["ws"] == 2
        stats = await wait_stats(broker, lambda s: s["connections"]["total"] == 0)
        assert stats["waiters"] == 0, stats
        assert (await get_json(broker, "/v1/admin/connections"))["connections"] == []


# ------------------------------------------------------------------- admin


async def ws_connections(daemon) -> list[dict[str, Any]]:
    conns = (await get_json(daemon, "/v1/admin/connections"))["connections"]
    return [x for x in conns if x["transport"] == "ws"]


async def test_admin_delete_closes_a_websocket_with_1000(broker):
    broker.push(ev("wf-admin", "workflow.running"))
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await open_sub(c, "s", workflow="wf-admin")
            conns = await ws_connections(broker)
            assert len(conns) == 1 and conns[0]["path"] == "/v1/ws"
            conn_id = conns[0]["id"]
            async with httpx.AsyncClient(base_url=broker.url) as http:
                r = await http.delete(f"/v1/admin/connections/{conn_id}")
                assert r.status_code == 202 and r.json() == {"closing": conn_id}
                assert await expect_close(c) == 1000
                await wait_stats(broker, lambda s: s["connections"]["total"] == 0)
                r = await http.delete(f"/v1/admin/connections/{conn_id}")
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_admin_connection_listing_counts_ws_subscriptions_and_deliveries(broker):
    broker.push(ev("wf-count", "workflow.running"))
    with trio.fail_after(10):
        async with ws_client(ws_url(broker)) as c:
            await open_sub(c, "a", workflow="wf-count")
            await open_sub(c, "b", workflow="wf-count", filter={"types": ["log"]})
            conns = await ws_connections(broker)
            assert len(conns) == 1
            assert conns[0]["delivered"] == 2, conns
            assert sorted(s["id"] for s in conns[0]["subscriptions"]) == ["a", "b"], conns


# ---------------------------------------------------------------- shutdown


async def test_sigterm_delivers_pending_events_then_closes_with_1001(broker_factory):
    b = broker_factory()
    wid = "wf-term"
    b.push(ev(wid, "workflow.running"))
    with trio.fail_after(25):
        async with ws_client(ws_url(b), message_queue_size=1000) as c, ws_client(ws_url(b)) as idle:
            await idle.roundtrip()
            await open_sub(c, "s", workflow=wid)
            b.push([log(wid, f"m{i}") for i in range(50)])
            await wait_stats(b, lambda s: s["counters"].get("ingested", 0) >= 51)

            codes: dict[str, int] = {}
            result: dict[str, int] = {}
            collected: list[Msg] = []

            async def stop() -> None:
                result["rc"] = await trio.to_thread.run_sync(b.stop)

            async def read_all() -> None:
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        collected.append(await c.next_sub("s"))
                codes["c"] = info.value.reason.code

            async def read_idle() -> None:
                codes["idle"] = await expect_close(idle)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                nursery.start_soon(read_idle)
                nursery.start_soon(stop)
    events = [e for m in collected for e in unbatch(m)]
    assert seqs(events) == list(range(2, 52))
    assert [e["message"] for e in events] == [f"m{i}" for i in range(50)]
    assert not any(e["kind"] == "end" for e in events)  # the workflow did not end
    check_cursors(collected, "s")
    assert codes == {"c": 1001, "idle": 1001}
    assert result["rc"] == 0, b.output()
