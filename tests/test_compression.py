"""stream.compression against the daemon as a subprocess: SSE in gzip for
a client that accepts it, every write flushed (each event decodes the
moment it arrives, on the direct path and the ordinary one), a complete
gzip body at the end; nothing changes for a client that does not accept
it or with compression off; `curl --compressed` reads it live; the
WebSocket handshake negotiates permessage-deflate when a client offers it.
"""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import httpx
import pytest
import trio

from .browser import open_browser
from .builders import ev, log
from .conftest import Daemon
from .e2e import uid
from .test_client import opened
from .test_dashboard import LOG_LINES, wait_js

GZIP = {"Accept-Encoding": "gzip"}


class GunzipFrames:
    """Raw gzip chunks → the SSE frames they decode to, chunk by chunk."""

    def __init__(self) -> None:
        self.z = zlib.decompressobj(31)
        self.text = ""

    def feed(self, chunk: bytes) -> list[str]:
        self.text += self.z.decompress(chunk).decode()
        *frames, self.text = self.text.split("\n\n")
        return frames


def kinds(frames: list[str]) -> list[str]:
    return [line[len("event: ") :] for f in frames for line in f.split("\n") if line.startswith("event: ")]


async def test_sse_is_gzip_flushed_per_write_and_ends_as_a_whole_body(broker_factory) -> None:
    daemon: Daemon = broker_factory(stream={"compression": True})
    wid = uid("gz")
    daemon.push(ev(wid, "workflow.running"))
    with trio.fail_after(20):
        async with (
            httpx.AsyncClient(base_url=daemon.url, timeout=10) as http,
            http.stream("GET", f"/v1/workflows/{wid}/stream", headers=GZIP) as resp,
        ):
            assert resp.headers["content-encoding"] == "gzip" and resp.headers["vary"] == "accept-encoding"
            gz = GunzipFrames()
            chunks = resp.aiter_raw()
            got: list[str] = []
            while "snapshot" not in kinds(got):
                got += gz.feed(await chunks.__anext__())
            await opened(daemon)
            # One at a time: each decodes as soon as its chunk is read.
            for i in range(5):
                daemon.push(log(wid, f"line {i} " + "x" * 200))
                frames: list[str] = []
                while not frames:
                    frames = gz.feed(await chunks.__anext__())
                assert kinds(frames) == ["log"] and f"line {i} " in frames[0]
            daemon.push(ev(wid, "workflow.completed"))
            rest = b""
            async for chunk in chunks:
                rest += chunk
            tail = gz.feed(rest)
            assert kinds(tail) == ["state", "end"], tail
            assert gz.z.eof and gz.text == ""  # the gzip trailer came: a whole body


async def test_no_gzip_without_accept_encoding_or_with_compression_off(broker_factory) -> None:
    on: Daemon = broker_factory(stream={"compression": True})
    off: Daemon = broker_factory()
    for daemon, headers in ((on, {"Accept-Encoding": "identity"}), (on, {"Accept-Encoding": "gzip;q=0"}), (off, GZIP)):
        wid = uid("plain")
        daemon.push(ev(wid, "workflow.running"), ev(wid, "workflow.completed"))
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as http:
                await _until_known(http, wid)
                r = await http.get(f"/v1/workflows/{wid}/stream", headers=headers)
        assert "content-encoding" not in r.headers, (headers, r.headers)
        assert "event: snapshot" in r.text and "event: end" in r.text


async def _until_known(http: httpx.AsyncClient, wid: str) -> None:
    while (await http.get(f"/v1/workflows/{wid}")).status_code != 200:
        await trio.sleep(0.01)


async def test_curl_compressed_reads_the_stream_live(broker_factory) -> None:
    daemon: Daemon = broker_factory(stream={"compression": True})
    wid = uid("curl")
    daemon.push(ev(wid, "workflow.running"))
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            ["curl", "-sN", "--compressed", f"{daemon.url}/v1/workflows/{wid}/stream"], stdout=-1
        )
        try:
            assert proc.stdout is not None
            seen = b""
            while b"event: snapshot" not in seen:
                seen += await proc.stdout.receive_some()
            daemon.push(log(wid, "live through curl"))
            while b"live through curl" not in seen:  # before the stream ends: live
                seen += await proc.stdout.receive_some()
            daemon.push(ev(wid, "workflow.completed"))
            while chunk := await proc.stdout.receive_some():
                seen += chunk
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()
        assert proc.returncode == 0
    assert b"event: end" in seen, seen[-300:]


async def _ws_handshake(daemon: Daemon) -> bytes:
    """The response head of a WebSocket handshake offering permessage-deflate."""
    request = (
        b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
    )
    with trio.fail_after(10):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            await sock.connect(("127.0.0.1", daemon.port))
            await sock.send(request)
            head = b""
            while b"\r\n\r\n" not in head:
                head += await sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return head.lower()


async def test_websocket_deflate_is_negotiated_only_with_compression_on(broker_factory) -> None:
    on: Daemon = broker_factory(stream={"compression": True})
    off: Daemon = broker_factory()
    assert b"sec-websocket-extensions: permessage-deflate" in await _ws_handshake(on)
    assert b"sec-websocket-extensions" not in await _ws_handshake(off)  # the offer declined


@pytest.mark.browser
async def test_chromium_eventsource_reads_gzip_live(broker_factory, tmp_path: Path) -> None:
    daemon: Daemon = broker_factory(stream={"compression": True})
    wid = uid("gz-browser")
    daemon.push(ev(wid, "workflow.running"))
    with trio.fail_after(30):
        async with open_browser(tmp_path) as browser:
            page = await browser.new_page()
            await page.send("Network.enable")
            await page.send("Runtime.enable")
            await page.navigate(f"{daemon.url}/#/wf/{wid}")
            await wait_js(page, "a live stream", "document.getElementById('status').dataset.state === 'live'")
            for i in range(3):
                daemon.push(log(wid, f"gzip line {i}"))
                await wait_js(page, f"line {i}", f"{LOG_LINES}.some(t => t.includes('gzip line {i}'))")
            response = await page.wait_event(
                "Network.responseReceived", lambda p: p["response"]["url"].endswith(f"/v1/workflows/{wid}/stream")
            )
            headers = {k.lower(): v for k, v in response["response"]["headers"].items()}
            assert headers.get("content-encoding") == "gzip", headers
