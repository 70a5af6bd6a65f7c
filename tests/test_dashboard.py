"""The dashboard at `/` in headless Chromium (tests/browser.py) against the
daemon as a subprocess: the workflow list fills and updates while
`broker simulate` runs; a workflow view shows task progress moving and
logs arriving, filters them by level; after a broker restart (with the
store: cursors survive it) EventSource resumes and every log line is
shown exactly once. Each view's screenshot is saved (BROKER_ARTIFACTS,
else the test's tmp dir; docs/dashboard*.png are such screenshots).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio

from .browser import Page, open_browser
from .builders import ev, log, task
from .conftest import ROOT, Daemon
from .e2e import uid
from .test_client import free_port

pytestmark = pytest.mark.browser


async def wait_js(page: Page, what: str, expression: str, timeout: float = 10, debug: str = "null") -> Any:
    """Poll `expression` in the page until it is truthy; fail naming `what`."""
    value: Any = None
    with trio.move_on_after(timeout):
        while True:
            # Null until the page has loaded what the expression reads.
            value = await page.evaluate(
                f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
            )
            if value:
                return value
            await trio.sleep(0.05)
    exceptions = [e["params"] for e in page.events("Runtime.exceptionThrown")]
    status = await page.evaluate("document.getElementById('status').textContent")
    seen = await page.evaluate(debug)
    raise AssertionError(
        f"page: no {what} within {timeout} s (last: {value!r}; status {status!r}; exceptions {exceptions}; {seen})"
    )


async def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    out_dir = trio.Path(os.environ.get("BROKER_ARTIFACTS") or tmp_path)
    await out_dir.mkdir(parents=True, exist_ok=True)
    shot = await page.send("Page.captureScreenshot", {"format": "png"})
    path = out_dir / name
    await path.write_bytes(base64.b64decode(shot["data"]))
    print(f"\n[dashboard] screenshot: {path}")
    return Path(path)


async def open_dashboard(browser: Any, url: str) -> Page:
    page = await browser.new_page()
    await page.send("Runtime.enable")
    await page.send(
        "Emulation.setDeviceMetricsOverride", {"width": 1366, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    )
    await page.navigate(url)
    return page


ROWS = "document.querySelectorAll('#workflow-rows tr').length"
LOG_LINES = "[...document.querySelectorAll('#logs li')].map(li => li.textContent)"


def task_cells(tid: str) -> str:
    row = f"document.querySelector('#task-rows tr[data-task=\"{tid}\"]')"
    return f"({row} ? [{row}.dataset.state, {row}.querySelector('.pct').textContent] : null)"


async def test_static_files_and_info(broker: Daemon) -> None:
    async with httpx.AsyncClient(base_url=broker.url) as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/static/dashboard.js">' in page.text
        js = await http.get("/static/dashboard.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        missing = await http.get("/static/nothing.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        info = (await http.get("/v1/info")).json()
        assert info["auth"] == "none" and info["control"] is False and info["node"] == "test-node"


async def test_the_list_fills_and_updates_while_simulate_runs(broker: Daemon, tmp_path: Path) -> None:
    prefix = uid("dash")
    with trio.fail_after(60):
        async with open_browser(tmp_path) as browser:
            page = await open_dashboard(browser, broker.url + "/")
            await wait_js(page, "a live list", "document.getElementById('status').dataset.state === 'live'")
            args = ["--endpoint", broker.zmq, "--workflows", "30", "--concurrent", "12", "--rate", "300"]
            sim: list[subprocess.CompletedProcess[bytes]] = []

            async def simulate() -> None:
                cmd = [sys.executable, "-m", "broker", "simulate", *args, "--prefix", prefix, "--seed", "7"]
                sim.append(await trio.run_process(cmd, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(simulate)
                rows = await wait_js(page, "rows while it runs", f"{ROWS} >= 10 && {ROWS}")
                running = await wait_js(
                    page,
                    "a running workflow",
                    "document.querySelectorAll('#workflow-rows tr[data-state=running]').length",
                )
                assert rows >= 10 and running >= 1
                await screenshot(page, tmp_path, "dashboard.png")
            assert sim[0].returncode == 0, sim[0].stderr.decode()
            # Every simulated workflow (children included) ends: the list
            # shows each in a terminal state, none left running.
            await wait_js(
                page,
                "every workflow ended",
                "[...document.querySelectorAll('#workflow-rows tr')].every(tr => "
                "['completed','failed','cancelled','timed_out'].includes(tr.dataset.state))",
                timeout=20,
            )
            assert await page.evaluate(ROWS) >= 30
            # The state filter and the search narrow it without a reload.
            await page.evaluate(
                "document.getElementById('state-filter').value = 'failed';"
                "document.getElementById('state-filter').dispatchEvent(new Event('change'))"
            )
            visible = await page.evaluate(
                "[...document.querySelectorAll('#workflow-rows tr')].filter(tr => !tr.hidden).map(tr => tr.dataset.state)"
            )
            assert set(visible) <= {"failed"}, visible


async def test_a_workflow_view_shows_progress_logs_and_the_error(broker: Daemon, tmp_path: Path) -> None:
    wid = uid("dash-wf")
    broker.push(ev(wid, "workflow.running"), task(wid, "extract", "running"), task(wid, "load", "running"))
    with trio.fail_after(40):
        async with open_browser(tmp_path) as browser:
            page = await open_dashboard(browser, f"{broker.url}/#/wf/{wid}")
            await wait_js(page, "the tasks of the snapshot", f"{task_cells('extract')} && {task_cells('load')}")
            for p in (20, 55):
                broker.push(task(wid, "extract", "progress", progress=p), log(wid, f"at {p}", task_id="extract"))
                await wait_js(page, f"progress {p}", f"{task_cells('extract')}[1] === '{p}%'")
            broker.push(
                log(wid, "quiet detail", level="debug"), log(wid, "disk is slow", level="warning", task_id="load")
            )
            lines = await wait_js(
                page, "the warning", f"{LOG_LINES}.some(t => t.includes('disk is slow')) && {LOG_LINES}"
            )
            assert any("at 20" in t for t in lines) and any("at 55" in t for t in lines)
            # debug is below the default filter (info+): in the list, hidden.
            hidden = await page.evaluate("[...document.querySelectorAll('#logs li.hidden')].map(li => li.textContent)")
            assert any("quiet detail" in t for t in hidden), hidden
            await page.evaluate(
                "document.getElementById('level-filter').value = 'warning';"
                "document.getElementById('level-filter').dispatchEvent(new Event('change'))"
            )
            shown = await page.evaluate(
                "[...document.querySelectorAll('#logs li:not(.hidden)')].map(li => li.textContent)"
            )
            assert all("warning" in t for t in shown) and shown, shown
            broker.push(task(wid, "load", "failed", error={"reason": "disk full"}))
            error = await wait_js(
                page,
                "the error",
                "!document.getElementById('wf-error').hidden && document.getElementById('wf-error').textContent",
            )
            assert "disk full" in error and "load" in error
            await screenshot(page, tmp_path, "dashboard-workflow.png")
            broker.push(task(wid, "extract", "completed"), ev(wid, "workflow.failed"))
            await wait_js(page, "the end", "document.getElementById('status').dataset.state === 'ended'")
            await wait_js(page, "the final state", "document.getElementById('wf-state').textContent === 'failed'")
            assert await page.evaluate(task_cells("extract")) == ["completed", "100%"]
            timeline = await page.evaluate("[...document.querySelectorAll('#timeline li')].map(li => li.textContent)")
            assert any("task load → failed" in t for t in timeline) and any("workflow → failed" in t for t in timeline)


async def test_a_broker_restart_resumes_the_view_without_duplicates(
    pg_dsn: str, broker_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    sections: dict[str, Any] = {
        "http": {"bind": f"127.0.0.1:{free_port()}"},
        "stream": {"retry_ms": 200},
        "store": {"backend": "postgres", "dsn": pg_dsn, "flush_ms": 20},
    }
    daemon = broker_factory(**sections)
    wid = uid("dash-restart")
    numbered = [log(wid, f"line {i}") for i in range(1, 21)]
    events = [ev(wid, "workflow.running"), *numbered, ev(wid, "workflow.completed")]
    events = [{**e, "seq": i + 1} for i, e in enumerate(events)]
    with trio.fail_after(60):
        async with open_browser(tmp_path) as browser:
            daemon.push(*events[:11])
            page = await open_dashboard(browser, f"{daemon.url}/#/wf/{wid}")
            await wait_js(page, "ten lines", f"{LOG_LINES}.length === 10")
            assert await trio.to_thread.run_sync(daemon.stop, signal.SIGTERM) == 0, daemon.output()
            await wait_js(page, "reconnecting", "document.getElementById('status').dataset.state === 'reconnecting'")
            assert await page.evaluate("document.getElementById('status').textContent") == "reconnecting…"
            daemon = broker_factory(**sections)
            await wait_js(page, "live again", "document.getElementById('status').dataset.state === 'live'")
            daemon.push(*events[11:])
            await wait_js(page, "the end", "document.getElementById('status').dataset.state === 'ended'")
            lines = await page.evaluate(LOG_LINES)
    texts = [t.split("info", 1)[1] for t in lines]
    assert texts == [f"line {i}" for i in range(1, 21)], lines


async def test_the_list_holds_a_thousand_workflows_updating(broker: Daemon, tmp_path: Path) -> None:
    prefix = uid("many")
    ids = [f"{prefix}-{i:04d}" for i in range(1000)]
    broker.push([ev(w, "workflow.running") for w in ids[:500]], [ev(w, "workflow.running") for w in ids[500:]])
    with trio.fail_after(60):
        async with open_browser(tmp_path) as browser:
            page = await open_dashboard(browser, broker.url + "/")
            await wait_js(page, "1,000 rows", f"{ROWS} >= 1000", timeout=20)
            began = trio.current_time()
            for chunk in range(0, 1000, 100):
                broker.push([ev(w, "workflow.completed") for w in ids[chunk : chunk + 100]])
            await wait_js(
                page,
                "every row completed",
                "document.querySelectorAll('#workflow-rows tr[data-state=completed]').length >= 1000",
                timeout=20,
                debug="JSON.stringify([...document.querySelectorAll('#workflow-rows tr')].reduce((a, tr) => (a[tr.dataset.state] = (a[tr.dataset.state] || 0) + 1, a), {}))",
            )
            took = trio.current_time() - began
            print(f"\n[dashboard] 1,000 workflows completed on the page {took:.2f} s after the first push")
            counts = await page.evaluate("document.getElementById('counts').textContent")
            assert counts.startswith("1000 workflows · 0 running"), counts


async def test_with_auth_the_token_field_opens_the_list_and_cancel_is_requested(
    broker_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    secret = "dashboard-test-secret-0123456789abcdef-0123456789"
    daemon = broker_factory(auth={"mode": "jwt", "secret": secret}, control={"bind": "tcp://127.0.0.1:*"})
    claims = {"sub": "ada", "tenant": "acme", "scope": "subscribe control", "exp": int(time.time()) + 300}
    tok = jwt.encode(claims, secret, "HS256")
    wid = uid("dash-auth")
    daemon.push({"workflow_id": wid, "type": "workflow.running", "tenant": "acme"})
    with trio.fail_after(40):
        async with open_browser(tmp_path) as browser:
            page = await open_dashboard(browser, daemon.url + "/")
            await wait_js(page, "the token field", "!document.getElementById('token-form').hidden")
            await wait_js(page, "a refusal", "document.getElementById('status').textContent === 'token needed'")
            await page.evaluate(
                f"document.getElementById('tenant').value = 'acme';"
                f"localStorage.setItem('tenant', 'acme');"
                f"document.getElementById('token').value = {json.dumps(tok)};"
                "document.getElementById('token-form').requestSubmit()"
            )
            await wait_js(
                page, "the tenant's workflow", f"!!document.querySelector('#workflow-rows tr[data-id=\"{wid}\"]')"
            )
            await wait_js(page, "a live stream", "document.getElementById('status').dataset.state === 'live'")
            await page.evaluate(f"location.hash = {json.dumps('#/wf/' + wid)}")
            await wait_js(
                page,
                "the cancel button",
                "!document.getElementById('cancel').hidden && document.getElementById('wf-state').textContent === 'running'",
            )
            await page.evaluate("document.getElementById('cancel').click()")
            result = await wait_js(page, "the cancel's answer", "document.getElementById('cancel-result').textContent")
    assert result.startswith("cancel requested ("), result
