"""Headless Chromium driven over the Chrome DevTools Protocol, for tests.

No playwright or selenium: Debian's `chromium` is started with a fresh
profile in a temporary directory and `--remote-debugging-port=0`; the
DevTools websocket address is read from its stderr ("DevTools listening on
ws://…"), and the browser is driven with trio-websocket:

    async with open_browser(tmp_path) as browser:
        page = await browser.new_page()          # about:blank, attached
        await page.send("Network.enable")
        await page.navigate(url)
        value = await page.evaluate("1 + 1")

Teardown always kills chromium (its whole process group) and removes the
profile directory. A missing chromium is a test failure with a clear
message, never a skip: `scripts/test` installs it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]
DEVTOOLS_RE = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        pytest.fail(
            "chromium not found (looked for `chromium` on PATH and /usr/bin/chromium): the browser tests need "
            "Debian's chromium; scripts/test installs it (apt-get install chromium)",
            pytrace=False,
        )
    return path


class CdpError(Exception):
    pass


class _Call:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None


class Cdp:
    """One DevTools websocket: numbered commands, replies matched by id,
    protocol events collected in `events` (flattened sessions)."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self.events: list[dict[str, Any]] = []
        self._event_arrived = trio.Event()
        self.closed: str | None = None

    async def reader(self) -> None:
        try:
            while True:
                msg = json.loads(await self._ws.get_message())
                call = self._calls.pop(msg["id"], None) if "id" in msg else None
                if call is not None:
                    call.reply = msg
                    call.done.set()
                elif "method" in msg:
                    self.events.append(msg)
                    self._event_arrived.set()
                    self._event_arrived = trio.Event()
        except ConnectionClosed as exc:
            self.closed = f"DevTools connection closed: {exc.reason}"
        finally:
            self.closed = self.closed or "DevTools reader stopped"
            self._event_arrived.set()
            for call in self._calls.values():
                call.done.set()
            self._calls.clear()

    async def wait_event(self, predicate, start: int = 0) -> dict[str, Any]:
        """The first protocol event from index `start` on that satisfies
        `predicate`, waiting for it (callers bound the wait with a deadline)."""
        index = start
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                if predicate(event):
                    return event
            if self.closed:
                raise CdpError(self.closed)
            await self._event_arrived.wait()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session_id: str | None = None, timeout: float = 10
    ) -> dict[str, Any]:
        if self.closed:
            raise CdpError(f"{method}: {self.closed}")
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        call = self._calls[msg_id] = _Call()
        with trio.fail_after(timeout):
            await self._ws.send_message(json.dumps(msg))
            await call.done.wait()
        if call.reply is None:
            raise CdpError(f"{method}: {self.closed}")
        if "error" in call.reply:
            raise CdpError(f"{method}: {call.reply['error']}")
        return call.reply.get("result", {})


class Page:
    def __init__(self, cdp: Cdp, target_id: str, session_id: str) -> None:
        self.cdp = cdp
        self.target_id = target_id
        self.session_id = session_id

    async def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10) -> dict[str, Any]:
        return await self.cdp.send(method, params, session_id=self.session_id, timeout=timeout)

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")

    async def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": await_promise},
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"page exception evaluating {expression!r}: {text}")
        return result["result"].get("value")

    def events(self, method: str) -> list[dict[str, Any]]:
        """Protocol events of this page named `method` (e.g. "Network.requestWillBeSent")."""
        return [e for e in self.cdp.events if e.get("sessionId") == self.session_id and e["method"] == method]

    async def wait_event(self, method: str, predicate=lambda params: True) -> dict[str, Any]:
        """Params of the first event of this page named `method` matching
        `predicate` (already received or still to come)."""
        event = await self.cdp.wait_event(
            lambda e: e.get("sessionId") == self.session_id and e["method"] == method and predicate(e["params"])
        )
        return event["params"]


class Browser:
    def __init__(self, cdp: Cdp, stderr_tail: list[str]) -> None:
        self.cdp = cdp
        self.stderr_tail = stderr_tail

    async def new_page(self, url: str = "about:blank") -> Page:
        target = await self.cdp.send("Target.createTarget", {"url": url})
        attached = await self.cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        return Page(self.cdp, target["targetId"], attached["sessionId"])

    def stderr(self) -> str:
        return "\n".join(self.stderr_tail)


async def _read_stderr(stream: Any, tail: list[str], found: list[str], ready: trio.Event) -> None:
    buf = b""
    try:
        async for chunk in stream:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                tail.append(line)
                del tail[:-200]
                m = DEVTOOLS_RE.search(line)
                if m and not found:
                    found.append(m.group(1))
                    ready.set()
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    finally:
        ready.set()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # chromium and the renderers it spawned (own session)
    except (ProcessLookupError, PermissionError):
        pass


@asynccontextmanager
async def open_browser(tmp_path: Path, *, start_timeout: float = 15) -> AsyncIterator[Browser]:
    exe = find_chromium()
    profile = tmp_path / "chromium-profile"
    if profile.exists():
        shutil.rmtree(profile)
    profile.mkdir()
    args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    proc = await trio.lowlevel.open_process(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with _drive(proc, start_timeout) as browser:
            yield browser
    except BaseExceptionGroup as group:
        # The caller's block runs inside our nursery: hand a single failure back as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            _kill_group(proc.pid)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.stderr is not None:
                await proc.stderr.aclose()
            for _ in range(20):
                shutil.rmtree(profile, ignore_errors=True)
                if not profile.exists():
                    break
                await trio.sleep(0.05)  # a dying child may still write into the profile


@asynccontextmanager
async def _drive(proc: trio.Process, start_timeout: float) -> AsyncIterator[Browser]:
    tail: list[str] = []
    found: list[str] = []
    ready = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_stderr, proc.stderr, tail, found, ready)
        with trio.move_on_after(start_timeout):
            await ready.wait()
        if not found:
            raise AssertionError(
                f"chromium did not print 'DevTools listening on ws://…' within {start_timeout}s "
                f"(exit code {proc.poll()}); stderr:\n" + "\n".join(tail)
            )
        async with open_websocket_url(found[0], max_message_size=64 * 1024 * 1024) as ws:
            cdp = Cdp(ws)
            nursery.start_soon(cdp.reader)
            yield Browser(cdp, tail)
            nursery.cancel_scope.cancel()
