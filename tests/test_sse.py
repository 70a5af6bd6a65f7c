"""Server-Sent Events end to end (DESIGN.md §5), against the daemon as a subprocess.

Most tests share one daemon (unique workflow ids; `stream.keepalive` 0.5 s,
`retry_ms` 1500, `unknown_workflow_wait` 1 s); the ring/journal overflow
tests start their own with tiny buffers. Setup events go through
`POST /v1/events` (a 202 means ingested), live ones through POST or ZMQ.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import trio

from .builders import ev, log, task
from .conftest import ROOT
from .e2e import (
    client_for,
    get_json,
    kinds,
    module_broker,
    open_sse,
    post_events,
    seqs,
    stats,
    uid,
    wf_path,
    zmq_barrier,
)
from .sse_client import SseEvent

KEEPALIVE = 0.5
RETRY_MS = 1500
UNKNOWN_WAIT = 1.0

daemon = module_broker(
    stream={"keepalive": KEEPALIVE, "retry_ms": RETRY_MS, "unknown_workflow_wait": UNKNOWN_WAIT},
    order={"reorder_window_ms": 200},
)

FRAME_RE = re.compile(rb"id: ([^\n]+)\nevent: ([a-z]+)\ndata: ([^\n]+)\n\n")
JOURNAL_ID = re.compile(r"^([A-Za-z0-9_-]+)\.(\d+)$")


# ----------------------------------------------------------------- helpers


async def post(client: httpx.AsyncClient, *events: dict[str, Any]) -> None:
    r = await post_events(client, list(events))
    assert r.status_code == 202 and r.json()["accepted"] == len(events), r.text


def label(e: SseEvent) -> str:
    """A short name for an event: its message, task and type, or its kind."""
    m = e.json
    if e.event in ("snapshot", "resync", "end", "gap"):
        return f"{e.event}:{m['workflow_id']}"
    return m.get("message") or f"{m.get('task_id') or m['workflow_id']}:{m['type']}"


async def epoch_of(client: httpx.AsyncClient, wid: str) -> str:
    r = await client.get(f"/v1/workflows/{wid}")
    assert r.status_code == 200
    return r.json()["epoch"]


async def node_epoch(client: httpx.AsyncClient) -> str:
    return (await stats(client))["node_epoch"]


def assert_json_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert err["code"] == code and isinstance(err["message"], str) and err["message"], err
    return err


async def get_status(client: httpx.AsyncClient, path: str, **kw: Any) -> httpx.Response:
    """GET a stream URL that is expected not to stream (an error or a 204)."""
    async with client.stream("GET", path, **kw) as r:
        if r.status_code != 200:  # (a 200 would be an endless stream: the caller's assert fails on it)
            await r.aread()
        return r


# ------------------------------------------------------- framing, snapshot, live


async def test_framing_headers_retry_and_raw_frames(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"))
            epoch = await epoch_of(client, wid)
            async with client.stream("GET", wf_path(wid)) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].split(";")[0].strip() == "text/event-stream"
                assert r.headers["cache-control"] == "no-cache"
                assert r.headers.get("x-accel-buffering") == "no"
                assert "content-length" not in r.headers
                buf = b""
                chunks = r.aiter_bytes()

                async def frames_until(n: int) -> list[tuple[bytes, ...]]:
                    nonlocal buf
                    while len(FRAME_RE.findall(buf)) < n:
                        buf += await chunks.__anext__()
                    return FRAME_RE.findall(buf)

                await frames_until(1)
                await post(client, log(wid, "line one\nline two"))  # a newline inside the data
                frames = await frames_until(2)
    assert buf.startswith(b"retry: %d\n\n" % RETRY_MS)
    body_bytes = buf[len(b"retry: %d\n\n" % RETRY_MS) :].replace(b": keepalive\n\n", b"")
    assert len(frames) == 2, buf
    assert b"".join(b"id: %s\nevent: %s\ndata: %s\n\n" % f for f in frames) == body_bytes
    (id1, kind1, data1), (id2, kind2, data2) = frames
    assert (id1, kind1) == (f"{epoch}:1".encode(), b"snapshot")
    assert orjson.loads(data1)["kind"] == "snapshot"
    assert (id2, kind2) == (f"{epoch}:2".encode(), b"log")
    body = orjson.loads(data2)
    assert body["kind"] == "log" and body["message"] == "line one\nline two"
    assert body["seq"] == 2 and body["epoch"] == epoch and body["workflow_id"] == wid


async def test_snapshot_first_with_task_states_then_live_in_order_then_end(daemon):
    wid = uid()
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(
                client,
                ev(wid, "workflow.created", ts=1000),
                ev(wid, "workflow.running", ts=1001),
                task(wid, "t-1", "running", ts=1002),
                ev(wid, "task.progress", task_id="t-1", progress=40, message="reading", ts=1003),
                task(wid, "t-2", "scheduled", ts=1004),
                task(wid, "t-1", "completed", result={"rows": 3}, ts=1005),
                task(wid, "t-3", "running", ts=1006),
                task(wid, "t-3", "failed", error={"msg": "boom"}, ts=1007),
            )
            async with open_sse(client, wf_path(wid)) as s:
                assert s.status == 200
                snap = await s.expect()
                assert snap.event == "snapshot" and snap.retry == RETRY_MS
                live = [
                    log(wid, "live log", task_id="t-2"),
                    task(wid, "t-2", "running"),
                    ev(wid, "token", data={"text": "hi"}),
                    ev(wid, "task.progress", task_id="t-2", progress=50),
                    task(wid, "t-2", "completed", result=7),
                    ev(wid, "workflow.completed", result={"ok": True}),
                ]
                got = []
                for e in live:  # one at a time: each arrives before the next is sent
                    await post(client, e)
                    got.append(await s.expect())
                end = await s.expect()
                assert await s.next() is None, "the stream must close after `end`"

    m = snap.json
    epoch = m["epoch"]
    assert snap.id == f"{epoch}:8"
    assert m["workflow_id"] == wid and m["seq"] == 8 and m["state"] == "running" and m["tenant"] == "default"
    assert m["created"] == 1000 and m["updated"] == 1007
    tasks = m["tasks"]
    assert sorted(tasks) == ["t-1", "t-2", "t-3"]
    assert tasks["t-1"]["state"] == "completed" and tasks["t-1"]["progress"] == 100
    assert tasks["t-1"]["result"] == {"rows": 3} and tasks["t-1"]["attempt"] == 1
    assert tasks["t-1"]["started"] == 1002 and tasks["t-1"]["finished"] == 1005 and tasks["t-1"]["message"] == "reading"
    assert tasks["t-2"]["state"] == "scheduled" and tasks["t-2"]["attempt"] == 0
    assert tasks["t-3"]["state"] == "failed" and tasks["t-3"]["error"] == {"msg": "boom"}

    assert seqs(got) == list(range(9, 15))
    assert kinds(got) == ["log", "state", "event", "progress", "state", "state"]
    assert [e.id for e in got] == [f"{epoch}:{n}" for n in range(9, 15)]
    assert got[1].json["state"] == "running" and got[1].json["task_id"] == "t-2"
    assert got[2].json["type"] == "token" and got[2].json["data"] == {"text": "hi"}
    assert got[3].json["progress"] == 50
    assert got[5].json["result"] == {"ok": True}
    assert end.event == "end" and end.id == got[-1].id
    assert (
        end.json.items() >= {"kind": "end", "workflow_id": wid, "epoch": epoch, "seq": 14, "state": "completed"}.items()
    )


async def test_burst_over_zmq_arrives_complete_and_in_order(daemon):
    wid = uid()
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"))
            async with open_sse(client, wf_path(wid)) as s:
                assert (await s.expect()).event == "snapshot"
                # (under stream.coalesce_after = 256: a burst beyond it may resync by design)
                daemon.push(*[log(wid, f"line {i}") for i in range(200)], ev(wid, "workflow.failed"))
                rest = await s.rest()
    assert [e.json.get("message") for e in rest[:-2]] == [f"line {i}" for i in range(200)]
    assert seqs(rest[:-1]) == list(range(2, 203))
    assert kinds(rest[-2:]) == ["state", "end"] and rest[-1].json["state"] == "failed"


async def test_terminal_workflow_stream_events_after_terminal_and_204(daemon):
    wid = uid()
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"), log(wid, "a"), log(wid, "b"))
            async with open_sse(client, wf_path(wid)) as live:
                assert (await live.expect()).event == "snapshot"
                await post(client, ev(wid, "workflow.cancelled"), log(wid, "after the end"), ev(wid, "x.late"))
                live_rest = await live.rest()
            epoch = await epoch_of(client, wid)
            terminal_id = f"{epoch}:4"

            # A stream opened on a terminal workflow: the terminal state, `end`, closed.
            async with open_sse(client, wf_path(wid)) as s:
                fresh = await s.rest()
            async with open_sse(client, wf_path(wid), params={"since": "0"}) as s:
                replay = await s.rest()
            async with open_sse(client, wf_path(wid), headers={"Last-Event-ID": f"{epoch}:2"}) as s:
                resumed = await s.rest()
            async with open_sse(client, wf_path(wid, "logs"), params={"since": "1"}) as s:
                logs = await s.rest()

            # Reconnecting at the terminal event: 204, however the cursor is given.
            for kw in (
                {"headers": {"Last-Event-ID": terminal_id}},
                {"params": {"last_event_id": terminal_id}},
                {"params": {"since": "4"}},
                {"headers": {"Last-Event-ID": terminal_id}, "params": {"since": "1"}},
            ):
                for view in ("", "tasks", "logs"):
                    r = await get_status(client, wf_path(wid, view), **kw)
                    assert r.status_code == 204, (kw, view, r.status_code, r.text)
                    assert r.content == b""

    assert [label(e) for e in live_rest] == [f"{wid}:workflow.cancelled", f"end:{wid}"]
    assert live_rest[-1].id == terminal_id
    assert kinds(fresh) == ["snapshot", "end"]
    assert fresh[0].json["state"] == "cancelled" and fresh[0].json["seq"] == 4
    assert fresh[1].id == terminal_id and fresh[1].json["state"] == "cancelled"
    assert [label(e) for e in replay] == [
        f"{wid}:workflow.running",
        "a",
        "b",
        f"{wid}:workflow.cancelled",
        f"end:{wid}",
    ]
    assert [label(e) for e in resumed] == ["b", f"{wid}:workflow.cancelled", f"end:{wid}"]
    assert [label(e) for e in logs] == ["a", "b", f"end:{wid}"]


# ------------------------------------------------------------- views and filters


async def test_tasks_stream_has_task_updates_only(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"), task(wid, "t-1", "running"))
            async with open_sse(client, wf_path(wid, "tasks")) as s:
                snap = await s.expect()
                await post(
                    client,
                    log(wid, "task log", task_id="t-1"),
                    ev(wid, "task.progress", task_id="t-1", progress=30),
                    log(wid, "workflow log"),
                    ev(wid, "timer.fired", task_id="t-1"),
                    ev(wid, "workflow.suspended"),
                    task(wid, "t-2", "running"),
                    task(wid, "t-1", "completed"),
                    ev(wid, "workflow.completed"),
                )
                rest = await s.rest()
    assert snap.event == "snapshot" and sorted(snap.json["tasks"]) == ["t-1"]
    assert [label(e) for e in rest] == ["t-1:task.progress", "t-2:task.running", "t-1:task.completed", f"end:{wid}"]
    assert rest[-1].json["seq"] == 10


async def test_workflow_ids_with_slashes_are_one_path_segment(daemon):
    """An id holding '/' is sent as %2F: it is one segment, even when it
    ends like a view (`…/tasks`), for the stream and the snapshot alike."""
    base = uid()
    a, b = f"{base}/a", f"{base}/a/tasks"
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(a, "workflow.running"), task(a, "t-1", "running"), ev(b, "workflow.running"))
            for wid in (a, b, f"{base}/a/stream"):
                r = await client.get(f"/v1/workflows/{quote(wid, safe='')}")
                if wid.endswith("/stream"):
                    assert r.status_code == 404 and wid in r.json()["error"]["message"]
                else:
                    assert r.status_code == 200 and r.json()["workflow_id"] == wid
            async with open_sse(client, wf_path(quote(a, safe=""), "tasks")) as s:
                first = await s.expect()
            async with open_sse(client, wf_path(quote(b, safe=""))) as s:
                second = await s.expect()
    assert first.event == "snapshot" and first.json["workflow_id"] == a
    assert sorted(first.json["tasks"]) == ["t-1"]
    assert second.event == "snapshot" and second.json["workflow_id"] == b


async def test_an_id_ending_in_history_is_a_snapshot_and_names_with_controls_name_nothing(daemon):
    """`x%2Fhistory` is the workflow "x/history" (its snapshot), not the
    history of "x"; the history of "x/history" is `x%2Fhistory/history`.
    A control character (NUL included) names no workflow, tenant or
    parent: 404 for an id, 400 for a listing argument, never a 5xx."""
    x = uid("x")
    odd = f"{x}/history"
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(x, "workflow.running"), ev(odd, "workflow.failed"))
            r = await client.get(f"/v1/workflows/{quote(odd, safe='')}")
            assert r.status_code == 200 and r.json()["kind"] == "snapshot" and r.json()["workflow_id"] == odd
            r = await client.get(f"/v1/workflows/{quote(odd, safe='')}/history")
            assert r.status_code == 200 and [e["type"] for e in r.json()["events"]] == ["workflow.failed"]
            r = await client.get(f"/v1/workflows/{x}/history")
            assert r.status_code == 200 and [e["type"] for e in r.json()["events"]] == ["workflow.running"]
            for path in ("/v1/workflows/t%00x", "/v1/workflows/t%00x/history", "/v1/workflows/t%01x/history"):
                r = await client.get(path)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
            for arg in ("after=1:%00", "tenant=a%00", "parent=p%00"):
                r = await client.get(f"/v1/workflows?{arg}")
                assert r.status_code == 400 and "control characters" in r.text, (arg, r.text)


async def test_logs_stream_has_log_lines_only(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"), log(wid, "before"))
            async with (
                open_sse(client, wf_path(wid, "logs")) as s,
                open_sse(client, wf_path(wid, "logs"), params={"level": "warning"}) as w,
            ):
                assert (await s.expect()).event == "snapshot"
                assert (await w.expect()).event == "snapshot"
                await post(
                    client,
                    task(wid, "t-1", "running"),
                    log(wid, "task debug", "debug", task_id="t-1"),
                    ev(wid, "task.progress", task_id="t-1", progress=30),
                    log(wid, "wf warning", "warning"),
                    ev(wid, "token"),
                    log(wid, "task critical", "critical", task_id="t-1"),
                    log(wid, "wf info"),
                    ev(wid, "workflow.completed"),
                )
                all_logs = await s.rest()
                warnings = await w.rest()
    assert [label(e) for e in all_logs] == ["task debug", "wf warning", "task critical", "wf info", f"end:{wid}"]
    assert all(e.event == "log" for e in all_logs[:-1])
    assert [label(e) for e in warnings] == ["wf warning", "task critical", f"end:{wid}"]


FILTER_EVENTS = [
    ("workflow.running", {}),  # 1
    ("task.running", {"task_id": "t-1"}),  # 2
    ("task.progress", {"task_id": "t-1", "progress": 50}),  # 3
    ("log", {"task_id": "t-1", "level": "info", "message": "t1 info"}),  # 4
    ("log", {"level": "warning", "message": "wf warning"}),  # 5
    ("task.running", {"task_id": "t-2"}),  # 6
    ("log", {"task_id": "t-2", "level": "error", "message": "t2 error"}),  # 7
    ("token", {"data": "tok"}),  # 8
    ("task.failed", {"task_id": "t-2", "error": "x"}),  # 9
    ("log", {"task_id": "t-1", "level": "debug", "message": "t1 debug"}),  # 10
    ("task.completed", {"task_id": "t-1"}),  # 11
    ("workflow.completed", {}),  # 12
]


@pytest.mark.parametrize(
    "query, expected",
    [
        ({}, list(range(1, 13))),
        ({"types": "state"}, [1, 2, 6, 9, 11, 12]),
        ({"types": "progress,log"}, [3, 4, 5, 7, 10]),
        ({"types": "event"}, [8]),
        ({"tasks": "t-1"}, [1, 2, 3, 4, 10, 11, 12]),
        ({"tasks": "t-2"}, [1, 6, 7, 9, 12]),
        ({"tasks": "t-1,t-2", "types": "log"}, [4, 7, 10]),
        ({"states": "terminal"}, [3, 4, 5, 7, 8, 9, 10, 11, 12]),
        ({"states": "terminal", "types": "state"}, [9, 11, 12]),
        ({"states": "running,failed", "types": "state"}, [1, 2, 6, 9]),
        ({"level": "warning"}, [1, 2, 3, 5, 6, 7, 8, 9, 11, 12]),
        ({"level": "error", "types": "log"}, [7]),
        ({"level": "debug", "types": "log"}, [4, 5, 7, 10]),
        ({"tasks": "t-9"}, [1, 12]),
    ],
    ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
async def test_filters(daemon, query, expected):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, *[ev(wid, t, **f) for t, f in FILTER_EVENTS])
            async with open_sse(client, wf_path(wid), params={"since": "0", **query}) as s:
                replay = await s.rest()
            # Without a cursor: the snapshot (with only the tasks asked for), then `end`.
            async with open_sse(client, wf_path(wid), params=query) as s:
                fresh = await s.rest()
    assert seqs(replay[:-1]) == expected
    assert replay[-1].event == "end" and replay[-1].json["seq"] == 12, "`end` passes every filter"
    assert kinds(fresh) == ["snapshot", "end"]
    want_tasks = ["t-1", "t-2"] if "tasks" not in query else sorted({"t-1", "t-2"} & set(query["tasks"].split(",")))
    assert sorted(fresh[0].json["tasks"]) == want_tasks


async def test_filters_live_and_on_multi_stream(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"))
            q = {"types": "state,log", "level": "error", "states": "terminal"}
            async with (
                open_sse(client, wf_path(wid), params=q) as single,
                open_sse(client, "/v1/stream", params={"workflows": wid, **q}) as multi,
            ):
                assert (await single.expect()).event == "snapshot"
                assert (await multi.expect()).event == "snapshot"
                await post(client, *[ev(wid, t, **f) for t, f in FILTER_EVENTS[1:]])
                got_single = await single.rest()
                got_multi = await multi.rest()
    assert seqs(got_single) == [7, 9, 11, 12, 12]
    assert seqs(got_multi) == [7, 9, 11, 12, 12]
    assert kinds(got_multi) == ["log", "state", "state", "state", "end"]


async def test_coalesce_true_keeps_only_the_latest_state_per_task(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(
                client,
                ev(wid, "workflow.running"),
                task(wid, "t-1", "scheduled"),
                task(wid, "t-1", "running"),
                ev(wid, "task.progress", task_id="t-1", progress=10),
                log(wid, "hello"),
                ev(wid, "task.progress", task_id="t-1", progress=20),
                task(wid, "t-2", "running"),
                task(wid, "t-1", "completed"),
            )
            async with open_sse(client, wf_path(wid), params={"since": "0", "coalesce": "true"}) as s:
                pending = await s.take(5)
                await post(client, task(wid, "t-2", "completed"))
                live = await s.expect()
    # One write: the latest state and the latest progress of each task, in order.
    assert [label(e) for e in pending] == [
        f"{wid}:workflow.running",
        "hello",
        "t-1:task.progress",
        "t-2:task.running",
        "t-1:task.completed",
    ]
    assert pending[2].json["progress"] == 20
    assert label(live) == "t-2:task.completed"


@pytest.mark.parametrize("view", ["", "tasks", "logs", "multi"])
@pytest.mark.parametrize(
    "query",
    [
        {"types": "bogus"},
        {"types": "state,nope"},
        {"types": ""},
        {"types": ","},
        {"tasks": ""},
        {"states": ""},
        {"level": "loud"},
        {"level": ""},
        {"level": "WARNING"},
        {"coalesce": "maybe"},
        {"since": "abc"},
        {"since": "-1"},
        {"since": "1.5"},
        {"since": ""},
    ],
    ids=lambda q: "&".join(f"{k}={v}" for k, v in q.items()),
)
async def test_bad_filter_values_are_400_at_once(daemon, view, query):
    wid = uid("unknown")  # never started: the 400 comes before any wait for it
    path = "/v1/stream" if view == "multi" else wf_path(wid, view)
    params = {"workflows": wid, **query} if view == "multi" else query
    with trio.fail_after(5):
        async with client_for(daemon) as client:
            t0 = time.monotonic()
            r = await get_status(client, path, params=params)
            elapsed = time.monotonic() - t0
    assert_json_error(r, 400, "invalid_argument")
    assert elapsed < UNKNOWN_WAIT * 0.8, f"answered after {elapsed:.2f}s: waited for the workflow first"


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"workflows": "a", "tenant": "t"},
        {"tenant": "t", "parent": "p"},
        {"workflows": ","},
        {"workflows": ""},
        {"tenant": ""},
        {"parent": ""},
    ],
    ids=lambda q: "&".join(f"{k}={v}" for k, v in q.items()) or "none",
)
async def test_multi_stream_scope_errors(daemon, query):
    with trio.fail_after(5):
        async with client_for(daemon) as client:
            r = await get_status(client, "/v1/stream", params=query)
    assert_json_error(r, 400, "invalid_argument")


# ------------------------------------------------------------- resume


@pytest.mark.parametrize("how", ["header", "query", "since"])
async def test_resume_gives_exactly_the_suffix(daemon, how):
    wid = uid()
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"), *[log(wid, f"l{i}") for i in range(2, 6)])
            async with open_sse(client, wf_path(wid), params={"since": "0"}) as s:
                first = await s.take(3)
            cursor = first[-1].id
            # While disconnected.
            await post(client, *[log(wid, f"l{i}") for i in range(6, 9)])
            daemon.push(*[log(wid, f"l{i}") for i in range(9, 11)])
            await zmq_barrier(daemon, client)
            kw: dict[str, Any] = {
                "header": {"headers": {"Last-Event-ID": cursor}},
                "query": {"params": {"last_event_id": cursor}},
                "since": {"params": {"since": cursor.split(":")[1]}},
            }[how]
            async with open_sse(client, wf_path(wid), **kw) as s:
                resumed = await s.take(7)
                await post(client, log(wid, "l11"), ev(wid, "workflow.completed"))
                rest = await s.rest()
    assert seqs(first) == [1, 2, 3]
    assert [e.json["message"] for e in resumed] == [f"l{i}" for i in range(4, 11)]
    assert seqs(resumed) == list(range(4, 11))
    assert "snapshot" not in kinds(resumed)
    assert [label(e) for e in rest] == ["l11", f"{wid}:workflow.completed", f"end:{wid}"]


async def test_last_event_id_wins_over_since(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(
                client,
                ev(wid, "workflow.running"),
                *[log(wid, f"l{i}") for i in range(2, 6)],
                ev(wid, "workflow.completed"),
            )
            epoch = await epoch_of(client, wid)
            async with open_sse(
                client, wf_path(wid), params={"since": "1"}, headers={"Last-Event-ID": f"{epoch}:4"}
            ) as s:
                got = await s.rest()
    assert seqs(got) == [5, 6, 6]


@pytest.mark.parametrize("since", ["6", "7", "1000", "99999999999999999999"])
async def test_since_ahead_of_head_is_400(daemon, since):
    wid = uid()
    with trio.fail_after(5):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"), *[log(wid, f"l{i}") for i in range(2, 6)])
            r = await get_status(client, wf_path(wid), params={"since": since})
            assert_json_error(r, 400, "invalid_argument")
            async with open_sse(client, wf_path(wid), params={"since": "5"}) as s:
                assert s.status == 200  # since = head is fine
                await post(client, log(wid, "l6"))
                assert (await s.expect()).json["seq"] == 6


@pytest.mark.parametrize(
    "cursor",
    ["garbage", ":3", "EPOCH:", "EPOCH:abc", "EPOCH:3:4", "EPOCH.3", "zzzzzz:3", "e:3", "EPOCH:99", "EPOCH:-1"],
)
async def test_bad_last_event_id_resyncs(daemon, cursor):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"), task(wid, "t-1", "running"), log(wid, "x"))
            epoch = await epoch_of(client, wid)
            cursor = cursor.replace("EPOCH", epoch)
            for kw in ({"headers": {"Last-Event-ID": cursor}}, {"params": {"last_event_id": cursor}}):
                async with open_sse(client, wf_path(wid), **kw) as s:
                    assert s.status == 200, (cursor, s.resp.text)
                    first = await s.expect()
                    assert first.event == "resync", (cursor, first)
                    await post(client, log(wid, f"after {kw}"))
                    nxt = await s.expect()
                    assert nxt.event == "log" and nxt.json["message"] == f"after {kw}"
    m = first.json
    assert m["kind"] == "resync" and m["workflow_id"] == wid and m["epoch"] == epoch
    assert m["state"] == "running" and m["tasks"]["t-1"]["state"] == "running"
    assert first.id == f"{epoch}:{m['seq']}"


async def test_resume_older_than_the_ring(broker_factory):
    d = broker_factory(buffer={"ring_events": 8})
    wid = uid()
    with trio.fail_after(15):
        async with client_for(d) as client:
            await post(client, ev(wid, "workflow.running"), *[log(wid, f"l{i}") for i in range(2, 21)])
            epoch = await epoch_of(client, wid)
            # Ring holds seqs 13..20: `since` 12 is the oldest that still resumes.
            for since in ("5", "11", "0"):
                r = await get_status(client, wf_path(wid), params={"since": since})
                err = assert_json_error(r, 400, "invalid_argument")
                named = [int(n) for n in re.findall(r"\d+", err["message"])]
                assert 12 in named or 13 in named, err["message"]
            oldest = int(re.search(r"oldest available \w+ (?:is )?(\d+)", err["message"]).group(1))
            async with open_sse(client, wf_path(wid), params={"since": str(oldest)}) as s:
                from_oldest = await s.take(20 - oldest)
            async with open_sse(client, wf_path(wid), params={"since": "12"}) as s:
                from_12 = await s.take(8)
            # Last-Event-ID too old: resync, then live.
            async with open_sse(client, wf_path(wid), headers={"Last-Event-ID": f"{epoch}:5"}) as s:
                resync = await s.expect()
                await post(client, log(wid, "l21"))
                after = await s.expect()
            async with open_sse(client, wf_path(wid), headers={"Last-Event-ID": f"{epoch}:13"}) as s:
                resumed = await s.take(8)
    assert seqs(from_oldest)[0] == oldest + 1 and seqs(from_oldest)[-1] == 20
    assert seqs(from_12) == list(range(13, 21))
    assert resync.event == "resync" and resync.json["seq"] == 20
    assert after.json["message"] == "l21"
    assert seqs(resumed) == list(range(14, 22))


# ------------------------------------------------------------- unknown workflows


async def test_unknown_workflow_that_starts_within_the_wait_is_streamed(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            async with trio.open_nursery() as nursery:
                got: dict[str, Any] = {}

                async def subscribe(view: str) -> None:
                    async with open_sse(client, wf_path(wid, view)) as s:
                        got[view] = (s.status, await s.expect(), time.monotonic())

                t0 = time.monotonic()
                for view in ("", "tasks", "logs"):
                    nursery.start_soon(subscribe, view)
                await trio.sleep(UNKNOWN_WAIT / 3)  # the engine starts the workflow a little later
                daemon.push(ev(wid, "workflow.running"), task(wid, "t1", "running"), log(wid, "first line"))
    # A stream that was there before the workflow gets every event of its
    # view from the first (not a snapshot of what it missed only by being
    # early): the workflow's start, the task's, the log line.
    for view, seq, kind in (("", 1, "state"), ("tasks", 2, "state"), ("logs", 3, "log")):
        status, first, at = got[view]
        assert status == 200 and first.event == kind and first.json["seq"] == seq, (view, first)
        assert at - t0 >= UNKNOWN_WAIT / 3 * 0.9


@pytest.mark.slow
async def test_unknown_workflow_is_404_after_the_wait(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            for view in ("", "tasks", "logs"):
                t0 = time.monotonic()
                r = await get_status(client, wf_path(wid, view))
                elapsed = time.monotonic() - t0
                assert_json_error(r, 404, "not_found")
                assert wid in r.json()["error"]["message"]
                assert UNKNOWN_WAIT * 0.9 <= elapsed < UNKNOWN_WAIT + 1.5, elapsed
            # A cursor does not change that.
            r = await get_status(client, wf_path(wid), params={"since": "0"})
            assert_json_error(r, 404, "not_found")


# ------------------------------------------------------------- keepalive


async def test_keepalive_comment_on_an_idle_stream(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"))
            async with open_sse(client, wf_path(wid)) as s:
                assert (await s.expect()).event == "snapshot"
                t0 = time.monotonic()
                stamps = []
                while len(stamps) < 3:
                    item = await s.next_item()
                    assert item == ": keepalive", item
                    stamps.append(time.monotonic() - t0)
                await post(client, log(wid, "still alive"))
                assert (await s.expect()).json["message"] == "still alive"
    assert KEEPALIVE * 0.8 <= stamps[0] <= KEEPALIVE * 3, stamps
    assert stamps[2] - stamps[0] >= KEEPALIVE * 1.6, stamps


@pytest.mark.parametrize("stream", ["logs view", "tenant multi"])
async def test_keepalive_on_a_silent_stream_of_a_busy_broker(daemon, stream):
    """`: keepalive` every stream.keepalive of *silence on this stream*: events
    that the stream's filter or scope leaves out must not postpone it forever
    (a proxy would cut a stream that shows no bytes)."""
    wid = uid()
    tenant = uid("tenant")
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"), ev(wid + "-t", "workflow.running", tenant=tenant))
            path, params = (wf_path(wid, "logs"), {}) if stream == "logs view" else ("/v1/stream", {"tenant": tenant})
            async with open_sse(client, path, params=params) as s:
                assert (await s.expect()).event == "snapshot"
                async with trio.open_nursery() as nursery:

                    async def busy() -> None:  # an engine emitting what this stream does not show
                        n = 0
                        while True:
                            n += 1
                            await post(client, ev(wid, "x.tick", data=n))
                            await trio.sleep(KEEPALIVE / 5)

                    nursery.start_soon(busy)
                    item = None
                    with trio.move_on_after(KEEPALIVE * 4):
                        item = await s.next_item()
                    nursery.cancel_scope.cancel()
    assert item == ": keepalive", f"no keepalive within {KEEPALIVE * 4}s of silence on the stream"


# ------------------------------------------------------------- curl


async def test_curl_reads_a_stream_to_end(daemon):
    wid = uid()
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"))
            proc = await trio.lowlevel.open_process(
                ["curl", "-sN", "--max-time", "12", f"{daemon.url}{wf_path(wid)}"],
                stdout=-1,
                stderr=-1,
            )
            out = b""
            assert proc.stdout is not None
            while b"event: snapshot" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, out
                out += chunk
            daemon.push(task(wid, "t-1", "running"), log(wid, "via curl"), ev(wid, "workflow.completed"))
            while chunk := await proc.stdout.receive_some():
                out += chunk
            rc = await proc.wait()
    assert rc == 0
    text = out.decode()
    assert text.startswith(f"retry: {RETRY_MS}\n\n")
    frames = FRAME_RE.findall(out)
    assert [k.decode() for _, k, _ in frames] == ["snapshot", "state", "log", "state", "end"]
    assert [orjson.loads(d)["seq"] for _, _, d in frames] == [1, 2, 3, 4, 4]
    assert text.endswith("\n\n")


# ------------------------------------------------------------- multi-workflow streams


async def test_workflows_list_stream(daemon):
    a, b, other = uid("a"), uid("b"), uid("other")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(a, "workflow.running"), ev(b, "workflow.running"), ev(other, "workflow.running"))
            nep = await node_epoch(client)
            async with open_sse(client, "/v1/stream", params={"workflows": f"{a},{b}"}) as s:
                assert s.status == 200
                snaps = await s.take(2)
                await post(client, log(a, "a1"), log(other, "o1"), log(b, "b1"))
                daemon.push(ev(a, "workflow.completed"), log(b, "b2"), log(a, "a after end"), log(other, "o2"))
                daemon.push(ev(b, "workflow.failed"))
                rest = await s.rest()
    assert kinds(snaps) == ["snapshot", "snapshot"]
    assert {e.json["workflow_id"] for e in snaps} == {a, b}
    assert snaps[0].retry == RETRY_MS
    assert [label(e) for e in rest] == [
        "a1",
        "b1",
        f"{a}:workflow.completed",
        f"end:{a}",
        "b2",
        f"{b}:workflow.failed",
        f"end:{b}",
    ]
    ids = [JOURNAL_ID.match(e.id) for e in snaps + rest]
    assert all(ids), [e.id for e in snaps + rest]
    assert {m.group(1) for m in ids} == {nep}
    offsets = [int(m.group(2)) for m in ids]
    assert offsets[2:] == sorted(offsets[2:]) and len(set(offsets[2:])) == len(offsets[2:]) - 2  # ends share ids
    assert rest[3].id == rest[2].id and rest[6].id == rest[5].id
    assert offsets[0] == offsets[1] < offsets[2]


async def test_tenant_stream_includes_new_workflows_of_that_tenant_only(daemon):
    t, w1, w2, w3 = uid("tenant"), uid("w1"), uid("w2"), uid("w3")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(w1, "workflow.running", tenant=t), ev(w2, "workflow.running", tenant="someone-else"))
            async with open_sse(client, "/v1/stream", params={"tenant": t}) as s:
                snaps = await s.take(1)
                await post(
                    client,
                    log(w2, "not mine"),
                    ev(w3, "workflow.created", tenant=t),  # started after the subscription
                    log(w1, "w1 line"),
                    log(w3, "w3 line"),
                    ev(w1, "workflow.completed"),
                    log(w1, "after w1 ended"),
                    ev(w3, "workflow.running", tenant=t),
                )
                rest = await s.take(6)
                # The stream stays open (a tenant's stream never ends by itself).
                await post(client, log(w3, "still open"))
                more = await s.expect()
    assert [e.json["workflow_id"] for e in snaps] == [w1]
    assert [label(e) for e in rest] == [
        f"{w3}:workflow.created",
        "w1 line",
        "w3 line",
        f"{w1}:workflow.completed",
        f"end:{w1}",
        f"{w3}:workflow.running",
    ]
    assert label(more) == "still open"


async def test_parent_stream_includes_children_and_grandchildren_started_later(daemon):
    p, c1, g1, c2, u = uid("p"), uid("c1"), uid("g1"), uid("c2"), uid("u")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(p, "workflow.running"), ev(u, "workflow.running"))
            async with open_sse(client, "/v1/stream", params={"parent": p}) as s:
                snaps = await s.take(1)
                daemon.push(
                    ev(c1, "workflow.running", parent_id=p),
                    log(u, "unrelated"),
                    ev(g1, "workflow.running", parent_id=c1),
                    log(g1, "grandchild line"),
                    ev(c2, "workflow.running", parent_id=p),
                    ev(p, "workflow.completed"),
                    log(c1, "child line"),
                    ev(c1, "workflow.completed"),
                    ev(c2, "workflow.cancelled"),
                    log(u, "unrelated 2"),
                    ev(g1, "workflow.completed"),
                )
                rest = await s.rest()  # closes once the root and every descendant ended
    assert [e.json["workflow_id"] for e in snaps] == [p]
    assert [label(e) for e in rest] == [
        f"{c1}:workflow.running",
        f"{g1}:workflow.running",
        "grandchild line",
        f"{c2}:workflow.running",
        f"{p}:workflow.completed",
        f"end:{p}",
        "child line",
        f"{c1}:workflow.completed",
        f"end:{c1}",
        f"{c2}:workflow.cancelled",
        f"end:{c2}",
        f"{g1}:workflow.completed",
        f"end:{g1}",
    ]
    assert rest[0].json["parent_id"] == p and rest[1].json["parent_id"] == c1


async def test_parent_stream_snapshot_includes_existing_descendants(daemon):
    p, c1, g1 = uid("p"), uid("c1"), uid("g1")
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(
                client,
                ev(p, "workflow.running"),
                ev(c1, "workflow.running", parent_id=p),
                ev(g1, "workflow.running", parent_id=c1),
            )
            async with open_sse(client, "/v1/stream", params={"parent": c1}) as s:
                snaps = await s.take(2)
                await post(client, log(p, "parent line"), log(g1, "g line"))
                nxt = await s.expect()
    assert sorted(e.json["workflow_id"] for e in snaps) == sorted([c1, g1])
    assert label(nxt) == "g line"


async def test_multi_stream_opens_with_active_workflows_only(daemon):
    a, b, t = uid("a"), uid("b"), uid("tenant")
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(
                client,
                ev(a, "workflow.running", tenant=t),
                ev(a, "workflow.completed"),
                ev(b, "workflow.running", tenant=t),
            )
            async with open_sse(client, "/v1/stream", params={"workflows": f"{a},{b}"}) as s:
                snaps = await s.take(1)
                await post(client, log(a, "a after end"), log(b, "b1"), ev(b, "workflow.completed"))
                rest = await s.rest()
            async with open_sse(client, "/v1/stream", params={"tenant": t}) as s:
                assert s.status == 200
                await post(client, ev(uid("c"), "workflow.running", tenant=t))
                tenant_first = await s.expect()
            # Everything in scope has ended: 204, so EventSource stops reconnecting.
            async with open_sse(client, "/v1/stream", params={"workflows": f"{a},{b}"}) as s:
                assert s.status == 204
                nothing = await s.rest()
    assert [label(e) for e in snaps] == [f"snapshot:{b}"]
    assert [label(e) for e in rest] == ["b1", f"{b}:workflow.completed", f"end:{b}"]
    assert tenant_first.event == "state", "a tenant stream opens with snapshots of active workflows only"
    assert nothing == []


@pytest.mark.parametrize("how", ["header", "query", "since"])
async def test_multi_stream_resumes_from_its_journal_cursor(daemon, how):
    a, b = uid("a"), uid("b")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(a, "workflow.running"), ev(b, "workflow.running"))
            params = {"workflows": f"{a},{b}"}
            async with open_sse(client, "/v1/stream", params=params) as s:
                await s.take(2)
                await post(client, log(a, "a1"), log(b, "b1"), log(a, "a2"))
                seen = await s.take(3)
            cursor = seen[1].id  # resume after b1, as if a2 never arrived
            await post(client, log(b, "b2"), log(a, "a3"))
            kw: dict[str, Any] = {
                "header": {"headers": {"Last-Event-ID": cursor}},
                "query": {"params": {**params, "last_event_id": cursor}},
                "since": {"params": {**params, "since": cursor}},
            }[how]
            kw.setdefault("params", params)
            async with open_sse(client, "/v1/stream", **kw) as s:
                resumed = await s.take(3)
                await post(client, ev(a, "workflow.completed"), ev(b, "workflow.completed"))
                rest = await s.rest()
    assert [label(e) for e in resumed] == ["a2", "b2", "a3"]
    assert resumed[0].id == seen[2].id
    assert [label(e) for e in rest] == [f"{a}:workflow.completed", f"end:{a}", f"{b}:workflow.completed", f"end:{b}"]


@pytest.mark.parametrize("cursor", ["zzzzzz.3", "NODE.999999", "garbage", "NODE:3", "NODE.", "NODE.-1"])
async def test_multi_stream_stale_cursor(daemon, cursor):
    a = uid("a")
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            await post(client, ev(a, "workflow.running"), log(a, "x"))
            cursor = cursor.replace("NODE", await node_epoch(client))
            params = {"workflows": a}
            async with open_sse(client, "/v1/stream", params=params, headers={"Last-Event-ID": cursor}) as s:
                assert s.status == 200
                first = await s.expect()
                await post(client, log(a, "after resync"))
                nxt = await s.expect()
            r = await get_status(client, "/v1/stream", params={**params, "since": cursor})
    assert first.event == "resync" and first.json["workflow_id"] == a and first.json["seq"] == 2
    assert label(nxt) == "after resync"
    assert_json_error(r, 400, "invalid_argument")


async def test_multi_stream_cursor_older_than_the_journal(broker_factory):
    d = broker_factory(buffer={"journal_events": 16})
    a = uid("a")
    with trio.fail_after(15):
        async with client_for(d) as client:
            await post(client, ev(a, "workflow.running"))
            nep = await node_epoch(client)
            params = {"workflows": a}
            async with open_sse(client, "/v1/stream", params=params) as s:
                await s.take(1)
                await post(client, log(a, "l0"))
                old = (await s.expect()).id
            await post(client, *[log(a, f"l{i}") for i in range(1, 40)])
            assert JOURNAL_ID.match(old) and old.startswith(nep + ".")
            async with open_sse(client, "/v1/stream", params=params, headers={"Last-Event-ID": old}) as s:
                first = await s.expect()
            r = await get_status(client, "/v1/stream", params={**params, "since": old})
            # Within reach it still works.
            head = (await stats(client))["journal"]["head"]
            async with open_sse(client, "/v1/stream", params={**params, "since": f"{nep}.{head - 3}"}) as s:
                tail = await s.take(3)
    assert first.event == "resync" and first.json["seq"] == 41
    err = assert_json_error(r, 400, "invalid_argument")
    assert nep in err["message"]
    assert [label(e) for e in tail] == ["l37", "l38", "l39"]


async def test_multi_stream_over_workflows_that_all_ended_answers_204(daemon):
    a, b, c = uid("a"), uid("b"), uid("c")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            r = await post_events(
                client,
                [
                    ev(a, "workflow.running"),
                    ev(a, "workflow.completed"),
                    ev(b, "workflow.running"),
                    ev(b, "workflow.failed"),
                    ev(c, "workflow.running"),
                ],
            )
            assert r.status_code == 202
            done = await client.get("/v1/stream", params={"workflows": f"{a},{b}"})
            async with open_sse(client, "/v1/stream", params={"workflows": f"{a},{c}"}) as s:
                live_status = s.status
                first = await s.expect()
    assert done.status_code == 204, (done.status_code, done.text)
    assert done.content == b""
    assert live_status == 200 and first.event == "snapshot" and first.json["workflow_id"] == c


# ------------------------------------------------------------- admin close


@pytest.mark.parametrize("multi", [False, True], ids=["workflow", "multi"])
async def test_admin_close_ends_stream_without_end_and_resume_loses_nothing(daemon, multi):
    wid = uid()
    path, params = ("/v1/stream", {"workflows": wid}) if multi else (wf_path(wid), {})
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            await post(client, ev(wid, "workflow.running"))
            async with open_sse(client, path, params=params) as s:
                await s.expect()
                await post(client, log(wid, "one"), log(wid, "two"))
                before = await s.take(2)
                conns = (await client.get("/v1/admin/connections")).json()["connections"]
                mine = [c for c in conns if c["path"] == path and c["transport"] == "sse"]
                assert len(mine) == 1, conns
                assert mine[0]["delivered"] >= 3
                r = await client.delete(f"/v1/admin/connections/{mine[0]['id']}")
                assert r.status_code == 202
                after_close = await s.rest()
                await post(client, log(wid, "three"))
            async with open_sse(client, path, params=params, headers={"Last-Event-ID": before[-1].id}) as s:
                resumed = await s.take(1)
                await post(client, ev(wid, "workflow.completed"))
                rest = await s.rest()
            r = await client.delete(f"/v1/admin/connections/{mine[0]['id']}")
            assert_json_error(r, 404, "not_found")
    assert [label(e) for e in before] == ["one", "two"]
    assert after_close == [], "closed by an admin: no `end`, nothing else"
    assert [label(e) for e in resumed + rest] == ["three", f"{wid}:workflow.completed", f"end:{wid}"]


async def test_admin_close_ends_an_sse_stream_while_events_keep_flowing(broker_factory):
    # A paced stream (limits.events_per_second) always has events pending:
    # every pull returns something, so the stream never goes idle while the
    # firehose runs. The close must not wait for a quiet moment.
    d = broker_factory(limits={"events_per_second": 100})
    wid = uid("fire")
    firehose_exited = trio.Event()

    async def firehose(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cmd = [sys.executable, "-m", "tests.firehose", "--endpoint", d.zmq, "--workflow", wid]
        cmd += ["--count", "30000", "--rate", "2000"]
        task_status.started()
        try:
            await trio.run_process(cmd, cwd=ROOT, capture_stdout=True, check=False)
        finally:
            firehose_exited.set()

    with trio.fail_after(20):
        async with client_for(d) as client:
            r = await post_events(client, ev(wid, "workflow.running"))
            assert r.status_code == 202
            async with trio.open_nursery() as nursery:
                async with open_sse(client, wf_path(wid)) as s:
                    assert (await s.expect()).event == "snapshot"
                    await nursery.start(firehose)
                    seen = await s.take(150)  # the firehose is flowing, and paced
                    conns = (await get_json(client, "/v1/admin/connections"))["connections"]
                    mine = [c for c in conns if c["path"] == wf_path(wid)]
                    assert len(mine) == 1, conns
                    r = await client.delete(f"/v1/admin/connections/{mine[0]['id']}")
                    assert r.status_code == 202
                    try:
                        with trio.fail_after(4):
                            rest = await s.rest()
                    except trio.TooSlowError:
                        raise AssertionError("the stream was not closed within 4 s of the admin's DELETE") from None
                    still_flowing = not firehose_exited.is_set()
                nursery.cancel_scope.cancel()
            conns = (await get_json(client, "/v1/admin/connections"))["connections"]
    assert still_flowing, "the firehose ended first: the test proved nothing"
    assert {e.event for e in seen} <= {"event", "resync"} and any(e.event == "event" for e in seen)
    assert "end" not in [e.event for e in rest]
    assert [c for c in conns if c["path"] == wf_path(wid)] == []
