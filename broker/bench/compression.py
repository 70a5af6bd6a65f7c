"""`broker bench --scenarios compression`: what SSE gzip (stream.compression)
and WebSocket permessage-deflate cost the broker and save on the wire, on
the realistic mix.

The same load twice, compression off then on: `broker simulate` (tasks,
retries, progress, logs, child workflows) at a fixed rate into a tenant
that N subscribers follow (`/v1/stream?tenant=…`, each gets every
event), all sending `Accept-Encoding: gzip`. Per run: the events each
subscriber got, the bytes on the wire and decoded per event, and the
broker's CPU seconds (from /proc) over the run; the difference between
the two runs, divided by the deliveries, is what compression costs per
event per subscriber. Subscribers are threads of this process reading
raw sockets (and decompressing what they read), never the broker's CPU.
The same for WebSocket subscribers (wsproto), offering permessage-deflate
or not.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

TENANT = "bench-cmp"
SETTLE = 1.5  # seconds of silence after the engine stops: every subscriber has read everything


class _Sub(threading.Thread):
    """One subscriber: raw HTTP/1.1 GET, chunked body, counting bytes on
    the wire, decoded bytes and SSE frames."""

    def __init__(self, host: str, port: int, path: str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((host, port), timeout=30)
        req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nAccept-Encoding: gzip\r\n\r\n"
        self.sock.sendall(req.encode())
        self.wire = 0
        self.decoded = 0
        self.frames = 0
        self.gzip: bool | None = None
        self.last_rx = time.monotonic()
        self.error = ""

    def run(self) -> None:
        try:
            self._read()
        except OSError as exc:
            self.error = str(exc)

    def _fill(self, buf: bytes, enough: Any) -> bytes | None:
        """`buf` with more read until `enough(buf)`; None at EOF."""
        while not enough(buf):
            data = self.sock.recv(65536)
            if not data:
                return None
            buf += data
        return buf

    def _read(self) -> None:
        buf: bytes | None = self._fill(b"", lambda b: b"\r\n\r\n" in b)
        if buf is None:
            return
        head, buf = buf.split(b"\r\n\r\n", 1)
        self.gzip = b"content-encoding: gzip" in head.lower()
        z = zlib.decompressobj(31) if self.gzip else None
        while True:
            # Chunked: <hex size>\r\n<data>\r\n
            if (buf := self._fill(buf, lambda b: b"\r\n" in b)) is None:
                return
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line, 16)
            if size == 0:
                return
            if (buf := self._fill(buf, lambda b, n=size + 2: len(b) >= n)) is None:
                return
            chunk, buf = buf[:size], buf[size + 2 :]
            self.wire += size
            text = z.decompress(chunk) if z is not None else chunk
            self.decoded += len(text)
            self.frames += text.count(b"\n\n")
            self.last_rx = time.monotonic()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class _WsSub(_Sub):
    """One WebSocket subscriber (wsproto over a raw socket), offering
    permessage-deflate or not; counts bytes on the wire, decoded bytes
    and events (batches are counted by their events)."""

    def __init__(self, host: str, port: int, deflate: bool) -> None:
        threading.Thread.__init__(self, daemon=True)
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request
        from wsproto.extensions import PerMessageDeflate

        self.sock = socket.create_connection((host, port), timeout=30)
        self.ws = WSConnection(ConnectionType.CLIENT)
        offer = [PerMessageDeflate()] if deflate else []
        self.sock.sendall(self.ws.send(Request(host=host, target="/v1/ws", extensions=offer)))
        self.wire = self.decoded = self.frames = 0
        self.gzip = None
        self.last_rx = time.monotonic()
        self.error = ""

    def _read(self) -> None:
        from wsproto.events import AcceptConnection, CloseConnection, TextMessage

        subscribe = b'{"op":"subscribe","sub":"s","tenant":"' + TENANT.encode() + b'"}'
        text = ""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            self.wire += len(data)
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.gzip = bool(event.extensions)
                    self.sock.sendall(self.ws.send(TextMessage(data=subscribe.decode())))
                elif isinstance(event, TextMessage):
                    text += event.data
                    if event.message_finished:
                        self.decoded += len(text.encode())
                        self.frames += text.count('"workflow_id"')
                        if text.startswith('{"kind":"ping"'):
                            self.sock.sendall(self.ws.send(TextMessage(data='{"op":"pong"}')))
                        text = ""
                        self.last_rx = time.monotonic()
                elif isinstance(event, CloseConnection):
                    return


def _run(
    broker_cls: Any, workdir: Path, gzip: bool, subs: int, rate: int, seconds: float, ws: bool = False
) -> dict[str, Any]:
    from .runner import BenchError, cpu_s

    broker = broker_cls(workdir, stream={"compression": gzip, "coalesce_after": 100_000})
    clients: list[_Sub] = []
    try:
        host, port = broker.url.removeprefix("http://").rsplit(":", 1)
        if ws:
            clients = [_WsSub(host, int(port), gzip) for _ in range(subs)]
        else:
            clients = [_Sub(host, int(port), f"/v1/stream?tenant={TENANT}") for _ in range(subs)]
        for c in clients:
            c.start()
        deadline = time.monotonic() + 30
        while broker.stats()["connections"]["total"] < subs or (ws and not all(c.gzip is not None for c in clients)):
            if time.monotonic() > deadline:
                raise BenchError("the subscribers did not connect")
            time.sleep(0.05)
        cpu_before = cpu_s(broker.proc.pid)
        began = time.monotonic()
        sim = subprocess.run(
            [sys.executable, "-m", "broker", "simulate", "--endpoint", broker.zmq, "--workflows", "0",
             "--concurrent", "100", "--rate", str(rate), "--duration", str(seconds), "--tenant", TENANT,
             "--seed", "11"],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
        if sim.returncode != 0:
            raise BenchError(f"simulate exited {sim.returncode}: {sim.stderr.strip()[-300:]}")
        while time.monotonic() - max(c.last_rx for c in clients) < SETTLE:
            time.sleep(0.1)
        cpu = cpu_s(broker.proc.pid) - cpu_before
        elapsed = time.monotonic() - began
        ingested = broker.stats()["counters"]["ingested"]
        frames = sum(c.frames for c in clients)
        wire = sum(c.wire for c in clients)
        decoded = sum(c.decoded for c in clients)
        return {
            "gzip": all(c.gzip for c in clients),
            "subscribers": subs,
            "ingested": ingested,
            "frames": frames,
            "wire_bytes": wire,
            "decoded_bytes": decoded,
            "wire_bytes_per_frame": wire / max(frames, 1),
            "decoded_bytes_per_frame": decoded / max(frames, 1),
            "broker_cpu_s": cpu,
            "elapsed_s": elapsed,
            "cpu_us_per_frame": cpu / max(frames, 1) * 1e6,
            "errors": [c.error for c in clients if c.error],
        }
    finally:
        for c in clients:
            c.close()
        broker.stop()


def scenario_compression(broker_cls: Any, workdir: Path, subs: int, rate: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"rate": rate, "seconds": seconds}
    for transport, ws in (("sse", False), ("ws", True)):
        off = _run(broker_cls, workdir, False, subs, rate, seconds, ws)
        on = _run(broker_cls, workdir, True, subs, rate, seconds, ws)
        r: dict[str, Any] = {"off": off, "gzip": on}
        r["bytes_saved"] = 1 - on["wire_bytes_per_frame"] / off["wire_bytes_per_frame"]
        r["extra_cpu_us_per_frame"] = on["cpu_us_per_frame"] - off["cpu_us_per_frame"]
        # What one more compressed subscriber of this stream costs, in CPU share.
        per_sub_rate = on["frames"] / max(on["subscribers"], 1) / max(on["elapsed_s"], 1e-9)
        r["cpu_share_per_subscriber"] = r["extra_cpu_us_per_frame"] * per_sub_rate / 1e6
        out[transport] = r
    return out


def compression_table(results: dict[str, Any]) -> str:
    parts = []
    for transport, name in (("sse", "SSE gzip"), ("ws", "WebSocket permessage-deflate")):
        if transport in results:
            parts.append(f"{name}:\n" + _table(results[transport]))
    return "\n".join(parts)


def _table(r: dict[str, Any]) -> str:
    rows = [
        ("", "off", "on"),
        ("subscribers", str(r["off"]["subscribers"]), str(r["gzip"]["subscribers"])),
        ("events ingested", str(r["off"]["ingested"]), str(r["gzip"]["ingested"])),
        ("frames delivered", str(r["off"]["frames"]), str(r["gzip"]["frames"])),
        (
            "bytes on the wire / frame",
            f"{r['off']['wire_bytes_per_frame']:.1f}",
            f"{r['gzip']['wire_bytes_per_frame']:.1f}",
        ),
        (
            "decoded bytes / frame",
            f"{r['off']['decoded_bytes_per_frame']:.1f}",
            f"{r['gzip']['decoded_bytes_per_frame']:.1f}",
        ),
        ("broker CPU s", f"{r['off']['broker_cpu_s']:.2f}", f"{r['gzip']['broker_cpu_s']:.2f}"),
        ("broker CPU µs / frame", f"{r['off']['cpu_us_per_frame']:.2f}", f"{r['gzip']['cpu_us_per_frame']:.2f}"),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
    lines.append(
        f"compression saves {r['bytes_saved'] * 100:.0f} % of the bytes for {r['extra_cpu_us_per_frame']:.2f} µs "
        f"of broker CPU per frame per subscriber ({r['cpu_share_per_subscriber'] * 100:.2f} % of a core "
        "per subscriber at this rate)"
    )
    return "\n".join(lines)
