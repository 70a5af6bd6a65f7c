"""Slow consumers degrade instead of breaking anything (DESIGN.md §6).

Real sockets throughout: an engine process pushing thousands of events/s,
a healthy SSE subscriber (httpx), a client that stops reading (a raw socket
with a 4 KiB receive buffer), and slow readers that read a little at a time.
Figures (delays, RSS) are printed for the record (`pytest -s`); the asserted
bounds are deliberately generous — `broker bench` measures, tests check
behaviour.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from .builders import ev, log, task
from .conftest import ROOT
from .e2e import client_for, open_sse, poll, post_events, stats, wf_path

SLOW_TIMEOUT = 2.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def start_firehose(nursery: trio.Nursery, endpoint: str, *args: str) -> trio.Process:
    cmd = [sys.executable, "-m", "tests.firehose", "--endpoint", endpoint, *args]
    return await nursery.start(partial(trio.run_process, cmd, cwd=ROOT, stdout=subprocess.DEVNULL, check=True))


async def raw_sse_client(port: int, path: str, rcvbuf: int = 4096) -> trio.socket.SocketType:
    """A GET over a raw socket with a small receive buffer (set before connect,
    so the advertised window stays small)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    await sock.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


class SlowReader:
    """Reads a chunked SSE response a little at a time and parses its events."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = b""
        self.events: list[dict[str, Any]] = []

    async def run(self, chunk: int, pause: float, until_kind: str = "end") -> None:
        while True:
            data = await self.sock.recv(chunk)
            if not data:
                return
            self.buf += data
            # Chunked framing: event blocks never contain "\r\n", and every
            # block ends with "\n\n", so scanning for data lines is enough.
            while b"\n\n" in self.buf:
                block, self.buf = self.buf.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        self.events.append(orjson.loads(line[6:].split(b"\r\n")[0]))
                if self.events and self.events[-1]["kind"] == until_kind:
                    return
            await trio.sleep(pause)


@pytest.mark.slow
async def test_stalled_client_is_closed_while_healthy_subscriber_gets_everything(broker_factory, tmp_path):
    # Room for ~0.6 s of lag before a resync: on a loaded 2-core CI machine a
    # healthy reader can be held up for ~100 ms (the default 256 events at
    # 3,000/s); what this test shows is that the stalled client never adds to it.
    broker = broker_factory(
        stream={"slow_consumer_timeout": SLOW_TIMEOUT, "keepalive": 15, "coalesce_after": 2000},
        buffer={"ring_events": 4096, "ring_bytes": 8 * 1048576},
    )
    count, rate = 15000, 3000
    wid = "firehose"
    broker.push(ev(wid, "workflow.running"))
    delays: list[float] = []
    got: list[int] = []
    with trio.fail_after(60):
        async with client_for(broker) as client, trio.open_nursery() as nursery:
            async with open_sse(client, wf_path(wid)) as healthy:
                assert (await healthy.expect()).event == "snapshot"
                stalled = await raw_sse_client(broker.port, wf_path(wid))
                await poll(lambda: _conn_total(client, 2), 5)
                rss_before = rss_kb(broker.proc.pid)
                engine = await start_firehose(
                    nursery,
                    broker.zmq,
                    "--workflow",
                    wid,
                    "--count",
                    str(count),
                    "--rate",
                    str(rate),
                    "--payload",
                    "400",
                    "--summary",
                    str(tmp_path / "engine.json"),
                )
                while len(got) < count:
                    sse = await healthy.expect()
                    assert sse.event == "event", sse  # no resync, no gap, nothing else
                    msg = sse.json
                    delays.append(time.time() - msg["data"]["t"])
                    got.append(msg["data"]["i"])
                rss_after = rss_kb(broker.proc.pid)
            # The stalled client is marked slow and its connection aborted.
            st = await poll(lambda: _slow_closed(client), SLOW_TIMEOUT * 2 + 5)
            await engine.wait()
            summary = orjson.loads((tmp_path / "engine.json").read_bytes())
            stalled.close()
            assert st["connections"]["total"] == 0
    assert got == list(range(count))
    delays.sort()
    p50, p99, worst = delays[len(delays) // 2], delays[int(len(delays) * 0.99)], delays[-1]
    print(
        f"\nhealthy subscriber: {count} events at {rate}/s, delay p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms; engine max send {summary['max_send_ms']:.2f} ms, "
        f"elapsed {summary['elapsed']:.2f} s; broker RSS {rss_before} kB -> {rss_after} kB"
    )
    assert p99 < 1.0, "the healthy subscriber must not be held up by the stalled one"
    # The engine is never slowed: its sends return at once and it keeps its pace.
    assert summary["max_send_ms"] < 500
    assert summary["elapsed"] < count / rate + 3
    # Memory is bounded by configuration (rings), not by what the stalled
    # client failed to read (~7 MB of events were pushed past it).
    assert rss_after - rss_before < 100_000


async def _conn_total(client, n: int):
    st = await stats(client)
    return st if st["connections"]["total"] == n else None


async def _slow_closed(client):
    st = await stats(client)
    if st["streams"].get("slow_consumer_closed") == 1 and st["connections"]["total"] == 0:
        return st
    return None


async def _run_slow_reader(broker_factory, wid: str, view: str, kind: str, count: int, rate: int) -> SlowReader:
    """A raw-socket reader taking 2 KiB every 10 ms while an engine process
    pushes `count` events of 1.5 KB payload at `rate`/s, then ends the workflow."""
    broker = broker_factory(stream={"coalesce_after": 50})
    broker.push(ev(wid, "workflow.running"))
    with trio.fail_after(60):
        async with client_for(broker) as client, trio.open_nursery() as nursery:
            async with open_sse(client, wf_path(wid, view)) as probe:
                assert (await probe.expect()).event == "snapshot"
            with await raw_sse_client(broker.port, wf_path(wid, view)) as sock:
                reader = SlowReader(sock)
                await poll(lambda: _conn_total(client, 1), 5)
                await start_firehose(
                    nursery, broker.zmq, "--workflow", wid, "--count", str(count), "--rate", str(rate),
                    "--kind", kind, "--payload", "1500", "--end",
                )  # fmt: skip
                await reader.run(chunk=2048, pause=0.01)
    return reader


@pytest.mark.slow
async def test_slow_state_reader_gets_resync_and_ends_in_the_right_state(broker_factory):
    tasks = 2000
    reader = await _run_slow_reader(broker_factory, "slow-state", "", "task", tasks * 2, 4000)
    kinds = [m["kind"] for m in reader.events]
    assert kinds[0] == "snapshot" and kinds[-1] == "end"
    assert "resync" in kinds, "a reader this slow must have been resynced"
    # Replaying what the reader got gives the workflow's real final state.
    view: dict[str, str] = {}
    wf_state = None
    last_seq = 0
    for m in reader.events:
        if m["kind"] in ("snapshot", "resync"):
            view = {tid: t["state"] for tid, t in m["tasks"].items()}
            wf_state = m["state"]
        elif m["kind"] == "state":
            if "task_id" in m:
                view[m["task_id"]] = m["state"]
            else:
                wf_state = m["state"]
        if m["kind"] != "end":
            assert m["seq"] >= last_seq, "cursors never go backwards"
            last_seq = m["seq"]
    assert wf_state == "completed"
    assert len(view) == tasks and set(view.values()) == {"completed"}
    print(
        f"\nslow state reader: {len(reader.events)} messages for {tasks * 2 + 2} events, "
        f"{kinds.count('resync')} resyncs"
    )


async def test_slow_log_reader_gets_gaps_that_add_up(broker_factory):
    lines = 5000
    reader = await _run_slow_reader(broker_factory, "slow-logs", "logs", "log", lines, 5000)
    logs = [m for m in reader.events if m["kind"] == "log"]
    gaps = [m for m in reader.events if m["kind"] == "gap"]
    assert gaps, "a reader this slow must have skipped lines"
    assert len(logs) + sum(g["dropped"] for g in gaps) == lines
    # The lines it did get are in order and each is the line it claims to be.
    numbers = [int(m["message"].split()[0]) for m in logs]
    assert numbers == sorted(set(numbers))
    assert reader.events[-1]["kind"] == "end"
    print(
        f"\nslow log reader: {len(logs)} lines delivered, {len(gaps)} gaps, {sum(g['dropped'] for g in gaps)} dropped"
    )


async def test_events_per_second_paces_and_coalesces(broker_factory):
    broker = broker_factory(limits={"events_per_second": 50})
    wid = "paced"
    broker.push(ev(wid, "workflow.running"), task(wid, "t", "running"))
    with trio.fail_after(30):
        async with client_for(broker) as client:
            async with open_sse(client, wf_path(wid)) as s:
                assert (await s.expect()).event == "snapshot"
                for i in range(1, 101):
                    broker.push(task(wid, "t", "progress", progress=i))
                broker.push(
                    task(wid, "t", "completed"),
                    ev(wid, "workflow.completed"),
                )
                rest = await s.rest()
    progress = [e.json["progress"] for e in rest if e.event == "progress"]
    # Fewer writes than events: progress piled up while paced and was merged,
    # never queued; the last value always arrives, and the end.
    assert progress and progress[-1] == 100 and len(progress) < 100
    assert progress == sorted(progress)
    assert [e.event for e in rest[-3:]] == ["state", "state", "end"]


async def _stall_then_read(sock: trio.socket.SocketType, stall: float, done) -> None:
    """Read nothing for `stall` seconds, then read until done(chunk) says so."""
    await trio.sleep(stall)  # the client is not reading: that is the scenario
    while True:
        chunk = await sock.recv(65536)
        if not chunk or done(chunk):
            return


@pytest.mark.slow
async def test_sse_write_completing_late_ends_with_error_event(broker_factory):
    # Writes blocked past slow_consumer_timeout (1 s) mark the stream slow; the
    # client reads again inside the grace (the kernel would abort at 2 s), so
    # the stream can still say why it closes.
    broker = broker_factory(stream={"slow_consumer_timeout": 1})
    wid = "late-sse"
    broker.push(ev(wid, "workflow.running"))
    with trio.fail_after(30):
        async with client_for(broker) as client, trio.open_nursery() as nursery:
            with await raw_sse_client(broker.port, wf_path(wid)) as sock:
                await poll(lambda: _conn_total(client, 1), 5)
                await start_firehose(
                    nursery, broker.zmq, "--workflow", wid, "--count", "3000", "--rate", "3000", "--payload", "4000"
                )
                received = bytearray()

                def response_ended(chunk: bytes) -> bool:
                    received.extend(chunk)
                    return received.endswith(b"\r\n0\r\n\r\n")  # the last chunk

                await _stall_then_read(sock, 1.5, response_ended)
                data = bytes(received)
                st = await poll(lambda: _slow_closed(client), 5)
    tail = data.rstrip(b"\r\n0").rsplit(b"event: ", 1)[-1]
    assert tail.startswith(b"error\ndata: ")
    err = orjson.loads(tail.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert err["kind"] == "error" and err["code"] == "resource_exhausted"
    assert st["streams"]["slow_consumer_closed"] == 1


@pytest.mark.slow
async def test_ws_write_completing_late_closes_4008(broker_factory):
    import wsproto
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    broker = broker_factory(stream={"slow_consumer_timeout": 1})
    wid = "late-ws"
    broker.push(ev(wid, "workflow.running"))
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with sock, trio.fail_after(30):
        async with client_for(broker) as client, trio.open_nursery() as nursery:
            await sock.connect(("127.0.0.1", broker.port))
            await sock.send(ws.send(Request(host="127.0.0.1", target="/v1/ws")))
            accepted = False
            while not accepted:
                ws.receive_data(await sock.recv(4096))
                accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
            sub = {"op": "subscribe", "sub": "s", "workflow": wid}
            await sock.send(ws.send(TextMessage(orjson.dumps(sub).decode())))
            await poll(lambda: _conn_total(client, 1), 5)
            await start_firehose(
                nursery, broker.zmq, "--workflow", wid, "--count", "3000", "--rate", "3000", "--payload", "4000"
            )
            closes: list[CloseConnection] = []

            def closed(chunk: bytes) -> bool:
                ws.receive_data(chunk)
                closes.extend(e for e in ws.events() if isinstance(e, CloseConnection))
                return bool(closes)

            await _stall_then_read(sock, 1.5, closed)
            st = await poll(lambda: _slow_closed(client), 5)
    assert [c.code for c in closes] == [4008]
    assert st["streams"]["slow_consumer_closed"] == 1


async def test_a_caught_up_subscriber_gets_a_whole_burst(broker):
    """protocol.md, "Slow consumers": a subscriber that was caught up gets
    the whole burst that woke it; `stream.coalesce_after` (256) is for a
    burst that piles up while a write is still going on. After one line
    was delivered (a direct write, done when it returns) and the stream
    sat idle, a batch of 300 lines comes whole: no `gap`, on the
    single-workflow log stream, the multi-workflow one and WebSocket."""
    from .ws_client import ws_client

    wid, lines = "burst-1", 300
    async with client_for(broker) as client:
        await post_events(client, ev(wid, "workflow.running"))
        with trio.fail_after(20):
            async with (
                open_sse(client, wf_path(wid, "logs")) as single,
                open_sse(client, f"/v1/stream?workflows={wid}&types=log") as multi,
                ws_client(broker.ws_url + "/v1/ws") as ws,
            ):
                await ws.send({"op": "subscribe", "sub": "s", "workflow": wid, "filter": {"types": ["log"]}})
                assert (await ws.next_sub("s"))["kind"] == "snapshot"
                for s in (single, multi):
                    assert (await s.expect()).event == "snapshot"
                await post_events(client, log(wid, "one"))
                for s in (single, multi):
                    assert (await s.expect()).json["message"] == "one"
                assert (await ws.next_sub("s"))["message"] == "one"
                await trio.sleep(0.3)  # idle: every write long done
                await post_events(client, [log(wid, f"m{i}") for i in range(lines)])
                for s in (single, multi):
                    got = [(await s.expect()) for _ in range(lines)]
                    assert [e.event for e in got] == ["log"] * lines
                    assert [e.json["message"] for e in got] == [f"m{i}" for i in range(lines)]
                events, _ = await ws.events("s", lines)
                assert [e["kind"] for e in events] == ["log"] * lines
