"""Benchmark worker processes: engines, reference receivers, subscribers.

Run as `python -m broker.bench.worker ROLE [options]`; each role writes its
result as JSON to `--out` and, where the runner must wait for it to be in
place, prints `ready` on stdout first. Subscribers and engines run in their
own processes so that their cost is not counted as the broker's.

Roles:
  pull-ref   bare pyzmq PULL loop: the ingest reference
  push       ZMQ PUSH engine: N events at a rate (or flat out), timestamped
  http-push  HTTP POST publisher (for nginx + nchan), one keep-alive connection
  sse        K raw-socket SSE subscribers: counts, order, publish→receive delay
  idle       K idle SSE or WebSocket connections, held until stdin closes

Subscribers count and parse over whole reads (bytes.count, the last event of
each read), not JSON per event, so the client stays cheap: every event of the bench carries `"i": <index>` and
`"t": <send time>` (in `data` for the broker, as the body for nchan).
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import socket
import sys
import time
from typing import Any

import orjson


def _write(path: str, result: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        f.write(orjson.dumps(result))


def _ready() -> None:
    print("ready", flush=True)


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ----------------------------------------------------------------- engines


def role_pull_ref(args: argparse.Namespace) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10000)
    sock.bind(args.bind)
    _ready()
    sock.recv()
    start = time.perf_counter()
    for _ in range(args.count - 1):
        sock.recv()
    elapsed = time.perf_counter() - start
    _write(args.out, {"count": args.count, "elapsed": elapsed, "rate": (args.count - 1) / elapsed})
    sock.close()
    ctx.term()


def _event(args: argparse.Namespace, i: int, t: float) -> dict[str, Any]:
    wf = f"{args.workflow}-{i % args.workflows}" if args.workflows > 1 else args.workflow
    index = i // args.workflows if args.workflows > 1 else i
    data: dict[str, Any] = {"i": args.first_i + index, "t": t}
    if args.payload:
        data["f"] = "x" * args.payload
    return {"workflow_id": wf, "type": "tick", "data": data}


def role_push(args: argparse.Namespace) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 30000)
    sock.setsockopt(zmq.SNDHWM, 100000)
    sock.connect(args.endpoint)
    time.sleep(0.2)  # let the connection come up before the clock starts
    max_send = 0.0
    start_wall = time.time()
    if args.rate or args.stamp:
        start = time.monotonic()
        for i in range(args.count):
            if args.rate:
                pause = start + i / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            frame = orjson.dumps(_event(args, i, time.time()))
            t0 = time.perf_counter()
            sock.send(frame)
            max_send = max(max_send, time.perf_counter() - t0)
    else:
        frames = [orjson.dumps(_event(args, i, 0.0)) for i in range(args.count)]
        start = time.monotonic()
        for frame in frames:
            sock.send(frame)
    elapsed = time.monotonic() - start
    if args.end:
        for w in range(args.workflows):
            wf = f"{args.workflow}-{w}" if args.workflows > 1 else args.workflow
            sock.send(orjson.dumps({"workflow_id": wf, "type": "workflow.completed"}))
    sock.close()
    ctx.term()
    _write(
        args.out, {"count": args.count, "elapsed": elapsed, "max_send_ms": max_send * 1000, "start_wall": start_wall}
    )


def role_http_push(args: argparse.Namespace) -> None:
    """POST each event to `url` over one keep-alive connection (raw HTTP/1.1)."""
    host, port, path = _split_url(args.url)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    start = time.monotonic()
    start_wall = time.time()
    for i in range(args.count):
        if args.rate:
            pause = start + i / args.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        body = orjson.dumps({"i": i, "t": time.time()})
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), host.encode(), len(body), body)
        )
        _read_http_response(reader)
    elapsed = time.monotonic() - start
    sock.close()
    _write(args.out, {"count": args.count, "elapsed": elapsed, "start_wall": start_wall})


def _read_http_response(reader: Any) -> int:
    status = int(reader.readline().split()[1])
    length = 0
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        reader.read(length)
    return status


def _split_url(url: str) -> tuple[str, int, str]:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), "/" + path


# -------------------------------------------------------------- subscribers


class SubResult:
    __slots__ = ("got", "last_i", "dups", "lost", "ended", "status", "first_i", "last_rx")

    def __init__(self) -> None:
        self.got = 0
        self.last_i = -1
        self.first_i = -1
        self.dups = 0
        self.lost = 0
        self.ended = False
        self.status = 0
        self.last_rx = 0.0


async def _sse_client(
    host: str,
    port: int,
    path: str,
    headers: str,
    res: SubResult,
    lat: list[float],
    lat_at: list[int],
    expect: int,
    expect_end: bool,
    sample_every: int,
    linger: float,
) -> None:
    import trio

    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect((host, port))
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{headers}\r\n"
    await sock.send(request.encode())
    buf = b""
    head_done = False
    samples = 0
    try:
        # With an `end` to come, read on until it arrives: it may come in a
        # later write than the last event.
        while not res.ended and (res.got < expect or expect_end):
            data = await sock.recv(262144)
            if not data:
                break
            now = time.time()
            if not head_done:
                buf += data
                if b"\r\n\r\n" not in buf:
                    continue
                head, _, data = buf.partition(b"\r\n\r\n")
                buf = b""
                res.status = int(head.split(b" ", 2)[1])
                head_done = True
                if res.status != 200:
                    break
            # Only whole events: a read may end inside one.
            buf = buf + data if buf else data
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                continue
            data, buf = buf[: cut + 2], buf[cut + 2 :]
            # Every event carries "i" and "t". Count them with bytes.count
            # (C speed) and parse only the last of each read: a jump between
            # consecutive reads' last indexes that differs from the count in
            # between is a loss (or a duplicate). One delay sample per read:
            # the client must cost far less than the server it measures.
            n = data.count(b'"i":')
            if n:
                pos = data.rfind(b'"i":') + 4
                li = int(data[pos : data.index(b",", pos)])
                if res.first_i < 0:
                    fpos = data.find(b'"i":') + 4
                    res.first_i = int(data[fpos : data.index(b",", fpos)])
                    res.last_i = res.first_i - 1
                expected = res.last_i + n
                if li > expected:
                    res.lost += li - expected
                elif li < expected:
                    res.dups += expected - li
                res.got += n
                res.last_i = li
                res.last_rx = now
                tpos = data.rfind(b'"t":') + 4
                end = tpos
                while data[end] in b"0123456789.eE+-":
                    end += 1
                samples += 1
                if samples % sample_every == 0:
                    lat.append(now - float(data[tpos:end]))
                    lat_at.append(int(now))  # the second it arrived in
            if b"event: end" in data:
                res.ended = True
        if linger:
            # Stay connected until the worker is done: the subscribers still
            # receiving must not share the broker with 1,000s of closes.
            await trio.sleep_forever()
    finally:
        sock.close()


def _sub_done(r: SubResult, args: argparse.Namespace) -> bool:
    if r.status and r.status != 200:
        return True
    return r.ended or (r.got >= args.expect and not args.expect_end)


def role_sse(args: argparse.Namespace) -> None:
    import trio

    _raise_nofile()
    host, port, _ = _split_url(args.url_base + "/")
    paths = [args.path] * args.conns if args.path else open(args.paths_file).read().split()
    headers = ""
    if args.last_event_id:
        headers = f"Last-Event-ID: {args.last_event_id}\r\n"
    results = [SubResult() for _ in paths]
    lat: list[float] = []
    lat_at: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for path, res in zip(paths, results, strict=True):
                nursery.start_soon(
                    _sse_client,
                    host,
                    port,
                    path,
                    headers,
                    res,
                    lat,
                    lat_at,
                    args.expect,
                    args.expect_end,
                    args.sample_every,
                    args.linger,
                )
                await trio.sleep(args.stagger)
            # A measuring client must not pause on its own: its garbage
            # collections (1,000+ connections' objects) would show as delay.
            gc.collect()
            gc.freeze()
            gc.disable()
            _ready()
            with trio.move_on_after(args.duration):
                # A cheap poll of this process's own counters (no event per read).
                while not all(_sub_done(r, args) for r in results):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            if args.linger:
                await trio.sleep(args.linger)
            nursery.cancel_scope.cancel()

    trio.run(main)
    got = [r.got for r in results]
    _write(
        args.out,
        {
            "conns": len(results),
            "delivered": sum(got),
            "min_per_conn": min(got) if got else 0,
            "complete": sum(1 for r in results if r.got >= args.expect),
            "ended": sum(1 for r in results if r.ended),
            "dups": sum(r.dups for r in results),
            "lost": sum(r.lost for r in results),
            "bad_status": sum(1 for r in results if r.status != 200),
            "first_i": [r.first_i for r in results] if args.report_first else [],
            "last_rx": max((r.last_rx for r in results), default=0.0),
            "latency": lat,
            "latency_at": lat_at,
        },
    )


def role_idle(args: argparse.Namespace) -> None:
    """Open K idle connections (SSE streams or WebSocket subscriptions), hold them."""
    import trio

    _raise_nofile()
    host, port, _ = _split_url(args.url_base + "/")
    opened = 0

    async def sse(nursery_ready: trio.Event) -> None:
        nonlocal opened
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect((host, port))
        await sock.send(f"GET {args.path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await sock.recv(65536)  # headers + snapshot: the stream is open
        opened += 1
        await trio.sleep_forever()

    async def ws(nursery_ready: trio.Event) -> None:
        nonlocal opened
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        await sock.send(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await sock.recv(65536)
        sub = orjson.dumps({"op": "subscribe", "sub": "s", "workflow": args.workflow})
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(sub))
        await sock.send(bytes([0x81, 0x80 | len(payload)]) + mask + payload)
        await sock.recv(65536)  # the snapshot
        opened += 1
        await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            for k in range(args.conns):
                nursery.start_soon(ws if (args.kind == "ws" or (args.kind == "mixed" and k % 2)) else sse, done)
                if k % 100 == 99:
                    await trio.sleep(0.01)
            with trio.fail_after(120):
                while opened < args.conns:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            _ready()
            # Hold until the runner closes our stdin.
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(main)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker.bench.worker")
    sub = p.add_subparsers(dest="role", required=True)

    r = sub.add_parser("pull-ref")
    r.add_argument("--bind", required=True)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--out", required=True)

    r = sub.add_parser("push")
    r.add_argument("--endpoint", required=True)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--rate", type=float, default=0)
    r.add_argument("--workflow", default="bench")
    r.add_argument("--workflows", type=int, default=1)
    r.add_argument("--payload", type=int, default=0)
    r.add_argument("--end", action="store_true")
    r.add_argument("--first-i", type=int, default=0, help="index of the first event")
    r.add_argument("--stamp", action="store_true", help="flat out, but stamp each event's send time")
    r.add_argument("--out", required=True)

    r = sub.add_parser("http-push")
    r.add_argument("--url", required=True)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--rate", type=float, default=0)
    r.add_argument("--out", required=True)

    r = sub.add_parser("sse")
    r.add_argument("--url-base", required=True)
    r.add_argument("--path")
    r.add_argument("--paths-file")
    r.add_argument("--conns", type=int, default=1)
    r.add_argument("--expect", type=int, required=True, help="events each connection should get")
    r.add_argument("--duration", type=float, default=60)
    r.add_argument("--last-event-id")
    r.add_argument("--sample-every", type=int, default=1)
    r.add_argument("--stagger", type=float, default=0.0)
    r.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="seconds to hold the connections after every one has what it expects",
    )
    r.add_argument("--report-first", action="store_true")
    r.add_argument("--expect-end", action="store_true", help="each stream also ends with `end`: wait for it")
    r.add_argument("--out", required=True)

    r = sub.add_parser("idle")
    r.add_argument("--url-base", required=True)
    r.add_argument("--path", default="")
    r.add_argument("--workflow", default="")
    r.add_argument("--kind", choices=("sse", "ws", "mixed"), default="mixed")
    r.add_argument("--conns", type=int, required=True)

    args = p.parse_args(argv)
    {
        "pull-ref": role_pull_ref,
        "push": role_push,
        "http-push": role_http_push,
        "sse": role_sse,
        "idle": role_idle,
    }[args.role](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
