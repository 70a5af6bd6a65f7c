"""A real browser's EventSource against the broker (DESIGN.md §5, SSE).

Headless Chromium (tests/browser.py) loads a plain HTML page from a file://
URL (the broker answers with CORS "*"), which opens
`new EventSource(BROKER + "/v1/workflows/wf-b/stream")` and records every
message. The broker's admin endpoint then closes the stream without `end`;
EventSource must reconnect by itself after `retry:` ms with Last-Event-ID,
and the page must end up with the snapshot, then every event exactly once in
seq order across the reconnect, then `end`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from .browser import Page, open_browser
from .builders import ev

pytestmark = pytest.mark.browser

WF = "wf-b"
STREAM_PATH = f"/v1/workflows/{WF}/stream"
RETRY_MS = 200
POLL = 0.02  # page poll interval, seconds

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>wf-b watcher</title></head>
<body><pre id="log"></pre>
<script>
"use strict";
const BROKER = %(broker)s;
window.seen = [];      // every message: {event, id, data}
window.opens = 0;      // `open` events: 1 + reconnects
window.errors = 0;     // native `error` events (disconnects)
window.readyStates = [];
const es = new EventSource(BROKER + %(path)s);
window.es = es;
function record(kind, e) {
  let data;
  try { data = JSON.parse(e.data); } catch (err) { data = {unparsed: String(e.data)}; }
  window.seen.push({event: kind, type: e.type, id: e.lastEventId, data: data, opens: window.opens});
  document.getElementById("log").textContent += kind + " " + e.lastEventId + "\\n";
}
es.addEventListener("open", () => { window.opens += 1; window.readyStates.push(["open", es.readyState]); });
es.addEventListener("error", (e) => {
  if (e instanceof MessageEvent) { record("error", e); return; }   // a server-sent `event: error`
  window.errors += 1;
  window.readyStates.push(["error", es.readyState]);
});
for (const kind of ["snapshot", "state", "progress", "log", "event", "gap", "resync", "end"]) {
  es.addEventListener(kind, (e) => {
    record(kind, e);
    if (kind === "end") es.close();
  });
}
es.onmessage = (e) => record("message", e);   // an unnamed event: should never happen
window.report = () => ({
  seen: window.seen, opens: window.opens, errors: window.errors,
  readyState: es.readyState, readyStates: window.readyStates,
});
</script></body></html>
"""


# Pushed before the page opens: the snapshot must show them.
BEFORE = [
    ev(WF, "workflow.running", message="started by the browser test"),
    ev(WF, "task.running", task_id="t-1", message="t-1 starting"),
]
# (event, kind the page must see it as). At most one progress per task in each
# group: progress updates of one task inside one write are coalesced (§6).
LIVE = [
    (ev(WF, "task.progress", task_id="t-1", progress=25, message="a quarter"), "progress"),
    (ev(WF, "log", level="info", task_id="t-1", message="hello from t-1"), "log"),
    (ev(WF, "task.running", task_id="t-2", message="t-2 starting"), "state"),
]
WHILE_DISCONNECTED = [
    (ev(WF, "task.progress", task_id="t-1", progress=50, message="half"), "progress"),
    (ev(WF, "log", level="warning", task_id="t-2", message="pushed while the browser was away"), "log"),
    (ev(WF, "task.progress", task_id="t-2", progress=10), "progress"),
    (ev(WF, "task.completed", task_id="t-1", result={"rows": 3}), "state"),
]
AFTER_RECONNECT = [
    (ev(WF, "log", level="info", message="after the reconnect"), "log"),
    (ev(WF, "task.progress", task_id="t-2", progress=80), "progress"),
    (ev(WF, "task.completed", task_id="t-2", result={"rows": 7}), "state"),
    (ev(WF, "workflow.completed", result={"ok": True}), "state"),
]
STREAMED = LIVE + WHILE_DISCONNECTED + AFTER_RECONNECT
FIRST_STREAMED_SEQ = len(BEFORE) + 1
LAST_SEQ = len(BEFORE) + len(STREAMED)

CURSOR_RE = re.compile(r"^([^:]+):(\d+)$")


def cursor(event_id: str) -> tuple[str, int]:
    m = CURSOR_RE.match(event_id)
    assert m, f"SSE id {event_id!r} is not <epoch>:<seq>"
    return m.group(1), int(m.group(2))


async def page_report(page: Page) -> dict[str, Any] | None:
    return await page.evaluate("window.report ? window.report() : null")


async def wait_page(page: Page, what: str, predicate, timeout: float = 8) -> dict[str, Any]:
    """Poll the page until `predicate(report)`; fail naming `what` otherwise."""
    report: dict[str, Any] | None = None
    with trio.move_on_after(timeout):
        while True:
            report = await page_report(page)
            if report is not None and predicate(report):
                return report
            await trio.sleep(POLL)
    exceptions = [e["params"] for e in page.events("Runtime.exceptionThrown")]
    raise AssertionError(f"page: no {what} within {timeout}s; page state: {report}; page exceptions: {exceptions}")


def seqs_seen(report: dict[str, Any]) -> list[int]:
    return [m["data"].get("seq") for m in report["seen"] if m["event"] != "snapshot"]


async def sse_connections(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await client.get("/v1/admin/connections")
    assert r.status_code == 200, r.text
    return [c for c in r.json()["connections"] if c["transport"] == "sse"]


def request_headers(page: Page, request_id: str, base: dict[str, str]) -> dict[str, str]:
    """Request headers as the network stack sent them (extra info has the final set)."""
    headers = {k.lower(): v for k, v in base.items()}
    for e in page.events("Network.requestWillBeSentExtraInfo"):
        if e["params"]["requestId"] == request_id:
            headers.update({k.lower(): v for k, v in e["params"]["headers"].items()})
    return headers


async def test_eventsource_resumes_after_admin_kick(broker_factory, tmp_path: Path):
    broker = broker_factory(http={"cors_origins": ["*"]}, stream={"retry_ms": RETRY_MS})
    page_file = tmp_path / "watch.html"
    page_file.write_text(PAGE % {"broker": json.dumps(broker.url), "path": json.dumps(STREAM_PATH)})

    with trio.fail_after(25):
        async with httpx.AsyncClient(base_url=broker.url, timeout=5) as client, open_browser(tmp_path) as browser:
            # The workflow exists, with a task running, before the page opens.
            broker.push(*BEFORE)
            page = await browser.new_page()
            await page.send("Runtime.enable")
            await page.send("Network.enable")
            await page.navigate(page_file.as_uri())

            # 1. The snapshot arrives first.
            report = await wait_page(page, "snapshot", lambda r: r["seen"])
            first = report["seen"][0]
            assert first["event"] == "snapshot", report

            # 2. Live events on the first connection.
            broker.push(*(e for e, _ in LIVE))
            last_live = len(BEFORE) + len(LIVE)
            await wait_page(page, f"live events up to seq {last_live}", lambda r: last_live in seqs_seen(r))

            # 3. From now on the browser holds any new request for the stream at
            # the network layer until the test lets it go, so "disconnected" lasts
            # exactly as long as the test needs, whatever the machine's load.
            await page.send("Fetch.enable", {"patterns": [{"urlPattern": broker.url + STREAM_PATH + "*"}]})

            # 4. Kick the stream: the broker closes it without `end`.
            conns = await sse_connections(client)
            assert [c["path"] for c in conns] == [STREAM_PATH], conns
            r = await client.delete(f"/v1/admin/connections/{conns[0]['id']}")
            assert r.status_code == 202, r.text
            await wait_page(page, "disconnect (native error event)", lambda r: r["errors"] >= 1)

            # 5. Events while the browser is disconnected.
            broker.push(*(e for e, _ in WHILE_DISCONNECTED))
            last_offline = last_live + len(WHILE_DISCONNECTED)
            with trio.fail_after(5):
                while (await client.get(f"/v1/workflows/{WF}")).json()["seq"] < last_offline:
                    await trio.sleep(POLL)

            # 6. EventSource reconnects by itself (after `retry:` ms) with Last-Event-ID.
            with trio.fail_after(5):
                paused = await page.wait_event("Fetch.requestPaused")
            assert await sse_connections(client) == [], "broker: the kicked SSE connection is still listed"
            report = await page_report(page)
            assert report["opens"] == 1 and report["readyState"] == 0, report  # CONNECTING, nothing new yet
            assert max(seqs_seen(report)) == last_live, report
            await page.send("Fetch.continueRequest", {"requestId": paused["requestId"]})
            await page.send("Fetch.disable")
            report = await wait_page(
                page,
                f"reconnect and catch-up to seq {last_offline}",
                lambda r: r["opens"] >= 2 and last_offline in seqs_seen(r),
            )

            # 7. More live events, then the end.
            broker.push(*(e for e, _ in AFTER_RECONNECT))
            report = await wait_page(
                page,
                "`end` and es.close()",
                lambda r: r["seen"] and r["seen"][-1]["event"] == "end" and r["readyState"] == 2,
            )
            # Let anything stray (a late message, a reconnect) show up before judging.
            await trio.sleep(0.3)
            report = await page_report(page)

            stream_requests = [
                e["params"]
                for e in page.events("Network.requestWillBeSent")
                if e["params"]["request"]["url"] == broker.url + STREAM_PATH
            ]

            # Broker side: the stream closed after `end`, nothing rejected, dropped or duplicated.
            with trio.fail_after(5):
                while await sse_connections(client):
                    await trio.sleep(POLL)
            stats = (await client.get("/v1/admin/stats")).json()
            rejected = (await client.get("/v1/admin/rejected")).json()

    seen = report["seen"]
    summary = [(m["event"], m["id"]) for m in seen]

    # The page: snapshot first, with the workflow and the task as pushed before it opened.
    snap = seen[0]
    assert snap["event"] == "snapshot" and snap["data"]["kind"] == "snapshot", summary
    assert snap["opens"] == 1
    epoch, snap_seq = cursor(snap["id"])
    assert snap["data"]["epoch"] == epoch and snap["data"]["seq"] == snap_seq == len(BEFORE), snap
    assert snap["data"]["workflow_id"] == WF and snap["data"]["state"] == "running", snap
    assert snap["data"]["tasks"]["t-1"]["state"] == "running", snap
    assert list(snap["data"]["tasks"]) == ["t-1"], snap

    # Then every pushed event exactly once, in seq order, with its kind and content, then `end`.
    body, end = seen[1:-1], seen[-1]
    assert [m["event"] for m in body] == [kind for _, kind in STREAMED], summary
    assert [m["data"]["seq"] for m in body] == list(range(FIRST_STREAMED_SEQ, LAST_SEQ + 1)), summary
    for msg, (pushed, kind) in zip(body, STREAMED, strict=True):
        data = msg["data"]
        assert data["kind"] == kind and data["type"] == pushed["type"], (msg, pushed)
        assert data["workflow_id"] == WF and data["epoch"] == epoch, msg
        for key in ("task_id", "progress", "level", "message", "result"):
            if key in pushed:
                assert data.get(key) == pushed[key], (key, msg, pushed)
        assert cursor(msg["id"]) == (epoch, data["seq"]), msg
    assert end["event"] == "end" and end["data"]["kind"] == "end", summary
    assert end["id"] == body[-1]["id"] == f"{epoch}:{LAST_SEQ}", summary  # `end` carries the terminal event's id

    # lastEventId values: <epoch>:<seq>, one epoch, strictly increasing up to the terminal event.
    ids = [cursor(m["id"]) for m in seen[:-1]]
    assert {e for e, _ in ids} == {epoch}, summary
    assert all(a[1] < b[1] for a, b in zip(ids, ids[1:])), summary

    # Exactly one disconnect and one automatic reconnect; the resumed stream had no second snapshot.
    assert report["opens"] == 2 and report["errors"] == 1, report
    assert report["readyState"] == 2, report
    assert [m["event"] for m in seen].count("snapshot") == 1, summary
    resumed = [m for m in seen if m["opens"] == 2]
    assert resumed and resumed[0]["data"]["seq"] == len(BEFORE) + len(LIVE) + 1, summary

    # The reconnect was a new request carrying Last-Event-ID = the last id the page had seen
    # (as sent on the wire: Fetch.requestPaused does not list it, the ExtraInfo event does).
    assert len(stream_requests) == 2, stream_requests
    first_headers = request_headers(page, stream_requests[0]["requestId"], stream_requests[0]["request"]["headers"])
    second_headers = request_headers(page, stream_requests[1]["requestId"], stream_requests[1]["request"]["headers"])
    assert "last-event-id" not in first_headers, first_headers
    assert second_headers.get("last-event-id") == f"{epoch}:{len(BEFORE) + len(LIVE)}", second_headers

    # Broker side: all accepted, none rejected or duplicated, no gaps, everything delivered once.
    counters = stats["counters"]
    assert counters.get("ingested") == len(BEFORE) + len(STREAMED), stats
    assert counters.get("rejected", 0) == 0 and counters.get("duplicates", 0) == 0, stats
    assert counters.get("gaps", 0) == 0, stats
    assert stats["rejected_by_reason"] == {} and rejected["total"] == 0, (stats, rejected)
    assert stats["workflows"] == 1 and stats["terminal_workflows"] == 1, stats
    assert stats["delivered"].get("sse") == len(seen), (stats, summary)
    assert stats["connections"]["total"] == 0, stats
    bad = [line for line in broker.lines if re.search(r"Traceback|ERROR|CRITICAL|WARNING|Exception", line)]
    assert not bad, "\n".join(broker.lines)
