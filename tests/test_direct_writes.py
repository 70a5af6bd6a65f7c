"""Direct writes: the hub writes new events straight to a parked SSE stream's
socket as an HTTP/1.1 chunk (broker/server/direct.py, `Hub.park`).

Against the daemon as a subprocess, with real sockets:

- delivery through the direct path is complete and ordered, and the bytes on
  the wire are strictly valid chunked encoding (checked by a raw-socket
  HTTP/1.1 client), ending with the last chunk when the workflow ends, after
  which the broker closes the connection (announced by `Connection: close`);
- `stream.direct_writes = false` delivers the same, without direct writes;
- an HTTP/1.0 client gets a close-delimited body through the ordinary path;
- a direct write that cannot complete (the client stopped reading) is
  finished by the stream's task (`streams.direct_partial`), and the slow
  consumer is closed while a healthy subscriber gets everything;
- a non-bool `stream.direct_writes` is a config error naming the key;
- `/v1/admin/stats` reports GC pauses under `gc`.
"""

from __future__ import annotations

import re
import socket
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from .builders import ev, tick
from .conftest import ROOT, Daemon
from .e2e import client_for, module_broker, open_sse, poll, stats, uid, wf_path
from .sse_client import SseEvent

daemon = module_broker()  # every default: direct writes on

FRAME_RE = re.compile(rb"id: ([^\n]+)\nevent: ([a-z]+)\ndata: ([^\n]+)")
RETRY_RE = re.compile(rb"retry: \d+")
CHUNK_SIZE_RE = re.compile(rb"[0-9a-fA-F]+")  # chunk-size, no chunk extensions (h11 and direct.py write none)


# ------------------------------------------------------------ raw HTTP client


@dataclass
class Frame:
    id: str
    event: str
    json: dict[str, Any]


class SseBytes:
    """Parses SSE bytes strictly: every block is `retry`, a comment, or an
    `id`/`event`/`data` frame exactly as the broker writes them."""

    def __init__(self) -> None:
        self.buf = b""
        self.frames: list[Frame] = []
        self.retries = 0

    def feed(self, data: bytes) -> None:
        self.buf += data
        while (i := self.buf.find(b"\n\n")) >= 0:
            block, self.buf = self.buf[:i], self.buf[i + 2 :]
            if RETRY_RE.fullmatch(block):
                self.retries += 1
                continue
            if block.startswith(b":"):
                assert block == b": keepalive", block
                continue
            m = FRAME_RE.fullmatch(block)
            assert m, f"not an SSE frame: {block[:200]!r}"
            self.frames.append(Frame(m[1].decode(), m[2].decode(), orjson.loads(m[3])))


class RawResponse:
    """An HTTP response read off a raw socket and parsed strictly."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()

    async def _more(self) -> bool:
        data = await self.sock.recv(65536)
        self.buf += data
        return bool(data)

    async def read_line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            assert await self._more(), f"EOF inside a line: {bytes(self.buf)!r}"
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert await self._more(), f"EOF: wanted {n} bytes, have {len(self.buf)}"
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def head(self) -> tuple[bytes, int, dict[str, str]]:
        """(HTTP version, status, headers with lower-case names)."""
        version, status, _ = (await self.read_line()).split(b" ", 2)
        headers: dict[str, str] = {}
        while line := await self.read_line():
            name, sep, value = line.partition(b":")
            assert sep, line
            headers[name.strip().lower().decode()] = value.strip().decode()
        return version, int(status), headers

    async def chunk(self) -> bytes:
        """One chunk's data, strictly `<hex>\\r\\n<data>\\r\\n`; b"" for the
        last chunk, which must be exactly `0\\r\\n\\r\\n` (no trailers)."""
        size_line = await self.read_line()
        assert CHUNK_SIZE_RE.fullmatch(size_line), f"bad chunk size line {size_line[:100]!r}"
        size = int(size_line, 16)
        data = await self.read_exact(size)
        assert await self.read_exact(2) == b"\r\n", "chunk data not followed by CRLF"
        return data

    async def read_body(self, parser: SseBytes, until: int) -> None:
        """A close-delimited body: feed `parser` until EOF (or `until` frames)."""
        parser.feed(bytes(self.buf))
        self.buf.clear()
        while len(parser.frames) < until:
            data = await self.sock.recv(65536)
            if not data:
                return
            parser.feed(data)


async def raw_get(port: int, path: str, version: str = "HTTP/1.1", rcvbuf: int = 0, extra: bytes = b"") -> RawResponse:
    """A GET on a raw socket; `extra` is sent after the request line and
    Host/Accept headers (more headers, the blank line, a body)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connect, so the advertised window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    head = f"GET {path} {version}\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n".encode()
    await sock.send(head + (extra or b"\r\n"))
    return RawResponse(sock)


class ChunkedSse:
    """Reads a chunked SSE response to its last chunk, in a task of its own."""

    def __init__(self, resp: RawResponse) -> None:
        self.resp = resp
        self.sse = SseBytes()
        self.chunks: list[bytes] = []
        self.started = trio.Event()  # the first frame (the snapshot) is in
        self.ended = False  # the last chunk arrived

    async def run(self) -> None:
        while data := await self.resp.chunk():
            self.chunks.append(data)
            self.sse.feed(data)
            if self.sse.frames:
                self.started.set()
        self.ended = True


# ----------------------------------------------------------------- helpers


async def streams(client: httpx.AsyncClient) -> dict[str, int]:
    return (await stats(client))["streams"]


def assert_in_order(frames: list[SseEvent] | list[Frame], first_seq: int, count: int) -> None:
    """`count` tick events with data.i 0, 1, …, seqs from `first_seq`, id = epoch:seq."""
    assert [f.event for f in frames] == ["event"] * count
    msgs = [f.json for f in frames]
    assert [m["data"]["i"] for m in msgs] == list(range(count))
    assert [m["seq"] for m in msgs] == list(range(first_seq, first_seq + count))
    assert [f.id for f in frames] == [f"{m['epoch']}:{m['seq']}" for m in msgs]


async def deliver_one_by_one(broker: Daemon, count: int) -> tuple[list[SseEvent], ChunkedSse]:
    """An httpx subscriber and a raw-socket HTTP/1.1 subscriber on one
    workflow; `count` events pushed one at a time, each once the previous one
    arrived (so the streams are idle, i.e. parked, in between); then the end.
    Returns what httpx got after its snapshot, and the raw reader."""
    wid = uid("direct")
    broker.push(ev(wid, "workflow.running"))
    async with client_for(broker) as client, trio.open_nursery() as nursery:
        async with open_sse(client, wf_path(wid)) as s:
            snap = await s.expect()
            assert snap.event == "snapshot" and snap.json["seq"] == 1
            resp = await raw_get(broker.port, wf_path(wid))
            version, status, headers = await resp.head()
            assert (version, status) == (b"HTTP/1.1", 200)
            assert headers["transfer-encoding"] == "chunked"
            assert headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in headers
            # The stream's connection closes when it ends: said up front.
            assert headers["connection"] == "close"
            raw = ChunkedSse(resp)
            nursery.start_soon(raw.run)
            await raw.started.wait()
            assert raw.sse.retries == 1 and raw.sse.frames[0].event == "snapshot"
            for i in range(count):
                broker.push(tick(wid, i))
                got = await s.expect()
                assert got.json["data"]["i"] == i, got
            broker.push(ev(wid, "workflow.completed"))
            rest = await s.rest()
    # The nursery waited for the raw reader: it read the last chunk. Then
    # the broker closes the connection (nothing follows the last chunk).
    assert raw.ended and not resp.buf, bytes(resp.buf)
    assert await resp.sock.recv(1) == b"", "the connection stayed open after the stream ended"
    resp.sock.close()
    assert [e.event for e in rest] == ["state", "end"]
    events = s.events[1 : 1 + count]
    assert_in_order(events, 2, count)
    # The raw subscriber got the very same frames.
    assert [(f.id, f.event, f.json) for f in raw.sse.frames] == [(e.id, e.event, e.json) for e in s.events]
    assert raw.sse.buf == b"", "the stream ended inside a frame"
    # Every chunk holds whole frames: nothing was split or interleaved.
    assert all(c.endswith(b"\n\n") for c in raw.chunks)
    return events, raw


# ------------------------------------------------------------------- tests


async def test_direct_writes_deliver_in_order_as_valid_chunks(daemon):
    count = 500
    with trio.fail_after(20):
        async with client_for(daemon) as client:
            before = await streams(client)
            await deliver_one_by_one(daemon, count)
            after = await streams(client)
    direct = after.get("direct_writes", 0) - before.get("direct_writes", 0)
    print(f"\n{count} events to 2 subscribers: {direct} direct writes")
    # Two subscribers parked between events: nearly every write is direct.
    assert direct >= count, after
    assert after.get("direct_partial", 0) == before.get("direct_partial", 0), after


async def test_direct_writes_off_delivers_the_same_without_them(broker_factory):
    broker = broker_factory(stream={"direct_writes": False})
    with trio.fail_after(20):
        await deliver_one_by_one(broker, 200)
        async with client_for(broker) as client:
            st = await streams(client)
    assert st.get("direct_writes", 0) == 0, st
    assert st.get("direct_partial", 0) == 0, st


async def test_http10_client_gets_a_close_delimited_body_without_direct_writes(broker_factory):
    broker = broker_factory()
    wid = uid("http10")
    broker.push(ev(wid, "workflow.running"))
    count = 50
    sse = SseBytes()
    with trio.fail_after(15):
        async with client_for(broker) as client:
            resp = await raw_get(broker.port, wf_path(wid), version="HTTP/1.0")
            version, status, headers = await resp.head()
            assert status == 200
            assert "chunked" not in headers.get("transfer-encoding", "").lower(), headers
            assert "content-length" not in headers
            await resp.read_body(sse, until=1)
            assert sse.retries == 1 and sse.frames[0].event == "snapshot"
            st = await stats(client)
            assert st["connections"]["total"] == 1
            for i in range(count):
                broker.push(tick(wid, i))
                await resp.read_body(sse, until=i + 2)
                assert len(sse.frames) == i + 2, "EOF before the event"
            # Idle between every event, yet nothing was written directly.
            assert (await streams(client)).get("direct_writes", 0) == 0
            broker.push(ev(wid, "workflow.completed"))
            await resp.read_body(sse, until=10**9)  # the body ends with the connection
            resp.sock.close()
            st = await poll(lambda: _connections(client, 0), 5)
    assert st["streams"].get("direct_writes", 0) == 0, st
    assert sse.buf == b"", "the body ended inside a frame"
    frames = sse.frames
    assert [f.event for f in frames[-2:]] == ["state", "end"]
    assert_in_order(frames[1:-2], 2, count)


async def test_stream_request_body_is_read_and_an_abandoned_body_opens_no_stream(daemon):
    """A GET to a stream path with a body: the body is read before the
    stream starts; a client that leaves halfway through its body gets no
    stream (before, the disconnect read as the end of the body and the
    stream stayed open with nobody reading)."""
    wid = uid("body")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            # Leaves after 3 of 10 body bytes, before the workflow exists.
            gone = await raw_get(daemon.port, wf_path(wid), extra=b"Content-Length: 10\r\n\r\nabc")
            gone.sock.close()
            # A whole body, in two sends: this one streams.
            resp = await raw_get(daemon.port, wf_path(wid), extra=b"Content-Length: 10\r\n\r\nabcde")
            await resp.sock.send(b"fghij")
            daemon.push(ev(wid, "workflow.running"))
            _, status, _ = await resp.head()
            assert status == 200
            body = ChunkedSse(resp)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(body.run)
                await body.started.wait()
                # Waited for its workflow, the stream gets the first event
                # itself ("state"), or a snapshot if it raced the push.
                assert body.sse.frames[0].event in ("state", "snapshot")
                # The abandoned request, woken by the same workflow, would
                # be a second stream by now.
                st = await stats(client)
                assert st["connections"]["total"] == 1, st["connections"]
                daemon.push(ev(wid, "workflow.completed"))
            assert body.ended and body.sse.frames[-1].event == "end"
            resp.sock.close()
            await poll(lambda: _connections(client, 0), 5)


async def _error_reply(resp: RawResponse) -> tuple[int, dict[str, Any]]:
    """The status and JSON error of a chunked error response."""
    _, status, headers = await resp.head()
    assert headers["content-type"] == "application/json"
    body = b""
    while data := await resp.chunk():
        body += data
    return status, orjson.loads(body)["error"]


async def test_stream_request_body_is_bounded_in_size_and_time(broker_factory):
    """A stream request's body is read and ignored, but a client cannot hold
    a handler with one: over 64 KiB → 400, no progress for
    http.body_idle_timeout → 408 (a body that keeps dripping meets
    http.body_timeout: tests/test_hardening.py)."""
    broker = broker_factory(http={"body_idle_timeout": 1})
    wid = uid("bodybound")
    broker.push(ev(wid, "workflow.running"))
    with trio.fail_after(15):
        async with client_for(broker) as client:
            big = 70_000
            resp = await raw_get(broker.port, wf_path(wid), extra=b"Content-Length: %d\r\n\r\n" % big + b"x" * big)
            status, err = await _error_reply(resp)
            assert (status, err["code"]) == (400, "invalid_argument"), err
            assert "65536" in err["message"]
            resp.sock.close()
            started = trio.current_time()
            resp = await raw_get(broker.port, wf_path(wid), extra=b"Content-Length: 10\r\n\r\nabc")
            status, err = await _error_reply(resp)
            waited = trio.current_time() - started
            assert (status, err["code"]) == (408, "deadline_exceeded"), err
            assert 0.9 <= waited < 5, waited
            resp.sock.close()
            st = await poll(lambda: _connections(client, 0), 5)
    assert st["connections"]["total"] == 0


async def _connections(client: httpx.AsyncClient, n: int) -> dict[str, Any] | None:
    st = await stats(client)
    return st if st["connections"]["total"] == n else None


@pytest.mark.slow
async def test_partial_direct_write_is_flushed_then_slow_consumer_closed(broker_factory):
    broker = broker_factory(stream={"slow_consumer_timeout": 1})
    wid = uid("partial")
    broker.push(ev(wid, "workflow.running"))
    payload = 8000
    sent = 0
    with trio.fail_after(25):
        async with client_for(broker) as client:
            async with open_sse(client, wf_path(wid)) as healthy:
                assert (await healthy.expect()).event == "snapshot"
                # A client that reads nothing, not even the response headers.
                stalled = await raw_get(broker.port, wf_path(wid), rcvbuf=4096)

                async def both_parked() -> dict[str, Any] | None:
                    st = await stats(client)
                    return st if st["connections"]["total"] == 2 and st["waiters"] == 2 else None

                await poll(both_parked, 5)

                async def push_one() -> None:
                    nonlocal sent
                    broker.push(tick(wid, sent, payload))
                    got = await healthy.expect()
                    assert got.event == "event" and got.json["data"]["i"] == sent, got.event
                    sent += 1

                # Fill the stalled client's socket until a direct write
                # cannot send everything.
                while (await streams(client)).get("direct_partial", 0) == 0:
                    assert sent < 3000, "no direct write was ever partial"
                    await push_one()
                filled = sent
                # Its task now blocks flushing the rest: the watchdog marks it
                # slow and the kernel aborts the connection (TCP_USER_TIMEOUT),
                # while the healthy subscriber keeps getting every event.
                while True:
                    st = await stats(client)
                    if st["streams"].get("slow_consumer_closed") == 1 and st["connections"]["total"] == 1:
                        break
                    await push_one()
                broker.push(ev(wid, "workflow.completed"))
                rest = await healthy.rest()
            st = await poll(lambda: _connections(client, 0), 5)
            stalled.sock.close()
    assert [e.event for e in rest] == ["state", "end"]
    assert_in_order(healthy.events[1 : 1 + sent], 2, sent)
    assert st["streams"]["direct_partial"] >= 1
    assert st["streams"]["slow_consumer_closed"] == 1
    assert st["streams"]["direct_writes"] >= filled
    print(f"\npartial after {filled} events of {payload} B; {sent} events in all; streams {st['streams']}")


async def run_cli(*args: str) -> tuple[int, str, str]:
    with trio.fail_after(15):
        proc = await trio.run_process(
            [sys.executable, "-m", "broker", *args], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.mark.parametrize(
    "command, value", [("check-config", '"yes"'), ("check-config", "1"), ("run", '"yes"')], ids=str
)
async def test_non_bool_direct_writes_is_a_config_error_naming_the_key(tmp_path: Path, command, value):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[stream]\ndirect_writes = {value}\n")
    rc, out, err = await run_cli(command, "-c", str(cfg))
    assert rc == 2, (rc, out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "stream.direct_writes" in lines[0], err
    assert "Traceback" not in err and out == ""


async def test_direct_writes_false_is_valid_config(tmp_path: Path):
    cfg = tmp_path / "off.toml"
    cfg.write_text("[stream]\ndirect_writes = false\n")
    rc, out, err = await run_cli("check-config", "-c", str(cfg))
    assert rc == 0, err
    assert tomllib.loads(out)["stream"]["direct_writes"] is False


async def test_stats_report_gc_pauses_per_generation(daemon):
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            gc = (await stats(client))["gc"]
    assert set(gc) == {"gen0", "gen1", "gen2"}
    for gen in gc.values():
        assert set(gen) == {"collections", "pause_total_ms", "pause_max_ms", "collected"}
        assert isinstance(gen["collections"], int) and gen["collections"] >= 0
        for key in ("pause_total_ms", "pause_max_ms"):
            assert isinstance(gen[key], (int, float)) and not isinstance(gen[key], bool) and gen[key] >= 0
        assert gen["pause_max_ms"] <= gen["pause_total_ms"]
