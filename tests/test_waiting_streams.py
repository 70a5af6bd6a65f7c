"""Streams opened before their workflow exists (the README's quick start:
curl first, then the engine): they get every event from the first, then
`end` — not a snapshot of what they missed only by being early. SSE and
WebSocket, the events in one ZMQ message or in many, and a multi-workflow
stream that sees a workflow begin. The daemon is a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
import trio

from .builders import ev, log, task
from .conftest import ROOT
from .e2e import client_for, module_broker, open_sse, poll, uid, wf_path
from .ws_client import ws_client

WAIT = 10  # stream.unknown_workflow_wait of this module's broker

daemon = module_broker(stream={"unknown_workflow_wait": WAIT})


def lifecycle(wid: str) -> list[dict[str, Any]]:
    """A whole workflow, as the README's `broker push` example sends it."""
    return [
        ev(wid, "workflow.running"),
        task(wid, "extract", "running"),
        ev(wid, "task.progress", task_id="extract", progress=50),
        log(wid, "half way", task_id="extract"),
        task(wid, "extract", "completed", result={"rows": 3}),
        ev(wid, "workflow.completed"),
    ]


TYPES = ["workflow.running", "task.running", "task.progress", "log", "task.completed", "workflow.completed"]


async def waiting(client: httpx.AsyncClient, wid: str, count: int = 1) -> None:
    """Until `count` connections wait for `wid` (so the events come after)."""

    async def check() -> bool:
        r = await client.get("/v1/admin/connections")
        conns = r.json()["connections"]
        return sum(1 for c in conns if wid in c.get("path", "") or wid in str(c.get("subscriptions", ""))) >= count

    await poll(check, 5)


async def sse_whole(client: httpx.AsyncClient, wid: str, out: dict[str, Any]) -> None:
    async with open_sse(client, wf_path(wid)) as s:
        out["status"] = s.status
        out["events"] = await s.rest()


async def test_sse_waiting_gets_every_event_sent_in_one_message(daemon) -> None:
    wid = uid()
    got: dict[str, Any] = {}
    with trio.fail_after(15):
        async with client_for(daemon) as client, trio.open_nursery() as nursery:
            nursery.start_soon(sse_whole, client, wid, got)
            await waiting(client, wid)
            daemon.push(lifecycle(wid))  # one frame: a JSON array of six events
    events = got["events"]
    assert got["status"] == 200
    assert [e.event for e in events] == ["state", "state", "progress", "log", "state", "state", "end"]
    assert [e.json["seq"] for e in events[:-1]] == [1, 2, 3, 4, 5, 6]
    assert [e.json["type"] for e in events[:-1]] == TYPES
    assert events[-1].json["state"] == "completed"
    # Each id is the resume cursor of its event.
    assert [e.id.split(":")[1] for e in events] == ["1", "2", "3", "4", "5", "6", "6"]


async def test_sse_waiting_gets_every_event_sent_one_by_one(daemon) -> None:
    wid = uid()
    got: dict[str, Any] = {}
    with trio.fail_after(15):
        async with client_for(daemon) as client, trio.open_nursery() as nursery:
            nursery.start_soon(sse_whole, client, wid, got)
            await waiting(client, wid)
            daemon.push(*lifecycle(wid))
    events = got["events"]
    assert [e.json.get("type") for e in events[:-1]] == TYPES
    assert events[-1].event == "end"


async def test_the_readme_quick_start_curl_then_push(daemon) -> None:
    """curl first, then `broker push` of the README's lines, as a new user."""
    wid = uid("readme")
    lines = "\n".join(
        line.replace("wf-1", wid).strip()
        for line in (
            '{"workflow_id": "wf-1", "type": "workflow.running"}',
            '{"workflow_id": "wf-1", "type": "task.running", "task_id": "extract"}',
            '{"workflow_id": "wf-1", "type": "task.progress", "task_id": "extract", "progress": 50}',
            '{"workflow_id": "wf-1", "type": "log", "level": "info", "task_id": "extract", "message": "half way"}',
            '{"workflow_id": "wf-1", "type": "task.completed", "task_id": "extract", "result": {"rows": 3}}',
            '{"workflow_id": "wf-1", "type": "workflow.completed"}',
        )
    )
    got: dict[str, Any] = {}
    with trio.fail_after(30):
        async with client_for(daemon) as client, trio.open_nursery() as nursery:
            nursery.start_soon(sse_whole, client, wid, got)
            await waiting(client, wid)
            pushed = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "broker", "push", "--endpoint", daemon.zmq],
                    input=lines + "\n",
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    timeout=20,
                )
            )
            assert pushed.returncode == 0, pushed.stderr
    assert [e.json.get("type") for e in got["events"][:-1]] == TYPES
    assert got["events"][-1].event == "end"


async def test_ws_waiting_gets_every_event(daemon) -> None:
    wid = uid()
    with trio.fail_after(15):
        async with ws_client(daemon.ws_url + "/v1/ws") as ws:
            await ws.send({"op": "subscribe", "sub": "s", "workflow": wid})
            await ws.roundtrip()  # the subscribe was handled: it waits
            daemon.push(lifecycle(wid))
            events, _ = await ws.until("s", lambda m: m.get("kind") == "end")
    assert [m.get("type") for m in events[:-1]] == TYPES
    assert [m["seq"] for m in events[:-1]] == [1, 2, 3, 4, 5, 6]
    assert events[-1]["kind"] == "end"


async def test_a_cursor_given_while_waiting_still_decides(daemon) -> None:
    """`since=` on a stream that waited is the client's, and it wins."""
    wid = uid()
    got: dict[str, Any] = {}

    async def from_2() -> None:
        async with open_sse(client, wf_path(wid), params={"since": "2"}) as s:
            got["events"] = await s.rest()

    with trio.fail_after(15):
        async with client_for(daemon) as client, trio.open_nursery() as nursery:
            nursery.start_soon(from_2)
            await waiting(client, wid)
            daemon.push(lifecycle(wid))
    assert [e.json["seq"] for e in got["events"][:-1]] == [3, 4, 5, 6]
    assert got["events"][-1].event == "end"


async def test_a_tenant_stream_sees_a_new_workflow_from_its_first_event(daemon) -> None:
    wid = uid("tenant")
    seen: list[dict[str, Any]] = []
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            async with open_sse(client, "/v1/stream", params={"tenant": "default"}) as s:
                assert s.status == 200  # placed: what comes next reaches it
                daemon.push(lifecycle(wid))
                while len(seen) < 6:
                    e = await s.expect()
                    if e.json.get("workflow_id") == wid and e.event != "snapshot":
                        seen.append(e.json)
    assert [m["type"] for m in seen] == TYPES
    assert [m["seq"] for m in seen] == [1, 2, 3, 4, 5, 6]
