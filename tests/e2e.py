"""Helpers for the end-to-end tests (test_ingest, test_sse, test_lifecycle).

- `module_broker(**sections)`: a module-scoped daemon fixture (the conftest's
  `Daemon`, real subprocess) for modules whose tests can share one broker;
  tests use unique workflow ids (`uid()`), and compare counters as deltas.
- `open_sse()`: an SSE stream as an object to pull events from one at a time.
- `run_engine()`: tests/engine.py as a separate process.
- `zmq_barrier()`: proves every frame pushed before it on the daemon's PUSH
  socket has been ingested (one PUSH→PULL pipe is FIFO and the broker ingests
  in order): push a marker event and await its stream.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from .conftest import BASE_SECTIONS, ROOT, Daemon, write_config
from .sse_client import SseEvent, iter_sse

RS = b"\x1e"
_ids = itertools.count(1)


def uid(prefix: str = "wf") -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


def module_broker(**sections: dict[str, Any]):
    """A module-scoped fixture running one daemon with these config sections."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory):
        merged = {name: dict(values) for name, values in BASE_SECTIONS.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        cfg = write_config(tmp_path_factory.mktemp("broker") / "broker.toml", merged)
        d = Daemon(cfg)
        yield d
        rc = d.stop()
        assert rc == 0, d.output()

    return fixture


class SseStream:
    """Pull events from an open SSE response one at a time; comments are kept."""

    def __init__(self, resp: httpx.Response) -> None:
        self.resp = resp
        self.status = resp.status_code
        self._it = iter_sse(resp).__aiter__()
        self.events: list[SseEvent] = []
        self.comments: list[str] = []
        self.eof = False

    async def next_item(self) -> SseEvent | str | None:
        """Next event or comment; None once the server closed the stream."""
        if self.eof:
            return None
        try:
            item = await self._it.__anext__()
        except StopAsyncIteration:
            self.eof = True
            return None
        if isinstance(item, str):
            self.comments.append(item)
        else:
            self.events.append(item)
        return item

    async def next(self) -> SseEvent | None:
        """Next event (comments skipped); None at the end of the stream."""
        while True:
            item = await self.next_item()
            if item is None or isinstance(item, SseEvent):
                return item

    async def expect(self) -> SseEvent:
        ev = await self.next()
        assert ev is not None, f"stream closed; events so far: {[e.event for e in self.events]}"
        return ev

    async def take(self, n: int) -> list[SseEvent]:
        return [await self.expect() for _ in range(n)]

    async def until(self, pred: Callable[[SseEvent], bool]) -> list[SseEvent]:
        """Events up to and including the first that satisfies `pred`."""
        out = []
        while True:
            ev = await self.expect()
            out.append(ev)
            if pred(ev):
                return out

    async def rest(self) -> list[SseEvent]:
        """Every event until the server closes the stream."""
        out = []
        while (ev := await self.next()) is not None:
            out.append(ev)
        return out

    async def aclose(self) -> None:
        await self._it.aclose()


@asynccontextmanager
async def open_sse(client: httpx.AsyncClient, path: str, **kwargs: Any) -> AsyncIterator[SseStream]:
    async with client.stream("GET", path, **kwargs) as resp:
        if resp.status_code != 200:
            await resp.aread()
        stream = SseStream(resp)
        try:
            yield stream
        finally:
            await stream.aclose()


def client_for(daemon: Daemon, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=daemon.url, timeout=None, **kwargs)


def wf_path(wid: str, view: str = "") -> str:
    return f"/v1/workflows/{wid}/{view + '/' if view else ''}stream"


def msgs(events: list[SseEvent]) -> list[dict[str, Any]]:
    return [e.json for e in events]


def kinds(events: list[SseEvent]) -> list[str]:
    return [e.event for e in events]


def seqs(events: list[SseEvent]) -> list[int]:
    return [e.json["seq"] for e in events]


async def get_json(client: httpx.AsyncClient, path: str) -> Any:
    r = await client.get(path)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    return await get_json(client, "/v1/admin/stats")


async def rejected(client: httpx.AsyncClient) -> dict[str, Any]:
    return await get_json(client, "/v1/admin/rejected")


async def post_events(client: httpx.AsyncClient, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post("/v1/events", content=content, headers={"Content-Type": "application/json"})


async def zmq_barrier(daemon: Daemon, client: httpx.AsyncClient) -> None:
    """Return once every frame pushed before this call has been ingested."""
    marker = uid("barrier")
    daemon.push({"workflow_id": marker, "type": "workflow.running"})
    async with open_sse(client, wf_path(marker)) as s:
        assert s.status == 200, "barrier workflow did not appear"
        # A snapshot, or the event itself if the stream came first and waited.
        assert (await s.expect()).event in ("snapshot", "state")


async def poll(fn: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Call async `fn` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await trio.sleep(interval)


def broker_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m broker ARGS` as a new user runs it: exit code, stdout, stderr."""
    return subprocess.run([sys.executable, "-m", "broker", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


async def run_engine(endpoint: str, *args: str, frames_file: Path | None = None) -> str:
    """Run tests/engine.py as its own process; assert it exits 0; return stdout."""
    cmd = [sys.executable, "-m", "tests.engine", "--endpoint", endpoint, *args]
    if frames_file is not None:
        cmd += ["--file", str(frames_file)]
    proc = await trio.run_process(cmd, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"engine exited {proc.returncode}: {out}{err}"
    return out


class Multipart(list):
    """One multi-frame ZMQ message: each element is one frame.

    (A plain list given to `write_frames` is one frame holding a JSON array: a batch.)
    """


def write_frames(path: Path, messages: list[Any]) -> Path:
    """Write an engine --file: each item is one message; bytes are sent as they are."""

    def enc(frame: Any) -> bytes:
        out = frame if isinstance(frame, bytes) else orjson.dumps(frame)
        assert b"\n" not in out and RS not in out
        return out

    lines = [RS.join(enc(f) for f in m) if isinstance(m, Multipart) else enc(m) for m in messages]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path
