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
  ovl-push   the overload engine: W workflows, each a realistic script of
             state, progress and log events, round-robin at a total rate
  ovl-sse    raw-socket SSE subscribers of the overload scenario: loss,
             duplicates and order of state/log events (resyncs allowed),
             final state in `end`, latency split into ingest and delivery

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


def _self_kb(key: str) -> int:
    """A `kB` line of this process's /proc status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    t = os.times()
    return t.user + t.system


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
    _write(
        args.out,
        {
            "count": args.count,
            "elapsed": elapsed,
            "rate": (args.count - 1) / elapsed,
            "rss_kb": _self_kb("VmRSS"),
            "hwm_kb": _self_kb("VmHWM"),
        },
    )
    sock.close()
    ctx.term()


def role_send_ref(args: argparse.Namespace) -> None:
    """The write path's reference: non-blocking `send()`s of 200 bytes
    round-robin to `conns` loopback TCP sockets, `rate` a second, while a
    forked reader drains them all. A broker's direct write is one such
    call plus its Python; its CPU per send (user + system, from rusage)
    is the floor of a write pass today."""
    import resource
    import selectors

    _raise_nofile()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(min(args.conns, 4096))
    port = lst.getsockname()[1]
    size = 200
    pid = os.fork()
    if pid == 0:  # the reader
        try:
            lst.close()
            conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.conns)]
            sel = selectors.DefaultSelector()
            for c in conns:
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
            left = args.sends * size
            while left > 0 and sel.get_map():
                ready = sel.select(5)
                if not ready:
                    break  # the sender stopped: nothing came for 5 s
                for key, _ in ready:
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:  # the sender closed it (or died)
                        sel.unregister(sock)
                    left -= len(data)
        finally:
            os._exit(0)
    socks = []
    for _ in range(args.conns):
        s, _ = lst.accept()
        s.setblocking(False)
        socks.append(s)
    lst.close()
    _ready()
    data = b"x" * size
    burst = 25  # sends between two looks at the clock
    blocked = 0
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    n = len(socks)
    for i in range(args.sends):
        try:
            socks[i % n].send(data)
        except BlockingIOError:
            blocked += 1
        if i % burst == burst - 1:
            time.sleep(max(0.0, start + (i + 1) / args.rate - time.perf_counter()))
    elapsed = time.perf_counter() - start
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    for s in socks:
        s.close()
    sends = args.sends
    _write(
        args.out,
        {
            "conns": n,
            "sends": sends,
            "bytes": size,
            "rate": sends / elapsed,
            "blocked": blocked,
            "user_us": 1e6 * (r1.ru_utime - r0.ru_utime) / sends,
            "sys_us": 1e6 * (r1.ru_stime - r0.ru_stime) / sends,
        },
    )


def _event(args: argparse.Namespace, i: int, t: float) -> dict[str, Any]:
    wf = f"{args.workflow}-{i % args.workflows}" if args.workflows > 1 else args.workflow
    index = i // args.workflows if args.workflows > 1 else i
    data: dict[str, Any] = {"i": args.first_i + index, "t": t}
    if args.payload:
        data["f"] = "x" * args.payload
    return {"workflow_id": wf, "type": "tick", "data": data}


def _push_socket(endpoint: str) -> tuple[Any, Any]:
    """An engine's PUSH socket, connected (and given a moment to be)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 30000)
    sock.setsockopt(zmq.SNDHWM, 100000)
    sock.connect(endpoint)
    time.sleep(0.2)  # let the connection come up before the clock starts
    return ctx, sock


def role_push(args: argparse.Namespace) -> None:

    ctx, sock = _push_socket(args.endpoint)
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


def index_jump(last_i: int, n: int, li: int) -> tuple[int, int]:
    """(lost, duplicated) for a read of `n` indexed events ending at index
    `li`, after one that ended at `last_i`: a jump that differs from the
    count in between is a loss (or a repeat)."""
    expected = last_i + n
    return max(0, li - expected), max(0, expected - li)


class SubResult:
    __slots__ = ("got", "last_i", "dups", "lost", "ended", "status", "first_i", "last_rx", "first_delay")

    def __init__(self) -> None:
        self.got = 0
        self.last_i = -1
        self.first_i = -1
        self.dups = 0
        self.lost = 0
        self.ended = False
        self.status = 0
        self.last_rx = 0.0
        self.first_delay = -1.0  # request sent → first event received (s)


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
    asked = time.time()
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
                    res.first_delay = now - asked
                lost, dups = index_jump(res.last_i, n, li)
                res.lost += lost
                res.dups += dups
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
    started_wall = time.time()

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
            "first_delay": [r.first_delay for r in results if r.first_delay >= 0] if args.report_first else [],
            "started_wall": started_wall,
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


# ----------------------------------------------------------------- overload

# One task of the overload script: task.running, PROGRESS_STEPS task.progress
# (10 → 100 %), LOGS_PER_TASK log lines between them, task.completed.
PROGRESS_STEPS = 5
LOGS_PER_TASK = 2
EVENTS_PER_TASK = 2 + PROGRESS_STEPS + LOGS_PER_TASK
TASK_NAMES = ("extract", "validate", "transform", "enrich", "score", "load", "notify", "archive")


def overload_script(tasks: int) -> list[tuple[dict[str, Any], int]]:
    """One workflow's events after its `workflow.created` (seq 1, sent at setup).

    Each item is (fields, i): i counts the workflow's state and log events
    (0 = `workflow.running`); -1 for progress, which the broker may coalesce.
    Every workflow of a step runs the same script, so the last i is known.
    """
    out: list[tuple[dict[str, Any], int]] = []
    i = 0

    def add(fields: dict[str, Any], counted: bool = True) -> None:
        nonlocal i
        out.append((fields, i if counted else -1))
        if counted:
            i += 1

    add({"type": "workflow.running"})
    for n in range(tasks):
        name = f"{TASK_NAMES[n % len(TASK_NAMES)]}-{n}"
        add({"type": "task.running", "task_id": name})
        log_after = {1, PROGRESS_STEPS - 2}  # a log line after the 2nd and the 4th progress step
        for step in range(PROGRESS_STEPS):
            pct = round(10 + 90 * step / (PROGRESS_STEPS - 1), 1)
            add({"type": "task.progress", "task_id": name, "progress": pct, "message": f"{name}: {pct}%"}, False)
            if step in log_after:
                warn = step != 1 and n % 3 == 2
                add(
                    {
                        "type": "log",
                        "task_id": name,
                        "level": "warning" if warn else "info",
                        "message": f"{name}: slow upstream, retrying" if warn else f"{name}: {step * 1000} rows read",
                    }
                )
        add({"type": "task.completed", "task_id": name, "result": {"rows": 1000 + n}})
    add({"type": "workflow.completed", "result": {"tasks": tasks}})
    assert len(out) == 2 + tasks * EVENTS_PER_TASK
    return out


def role_mix_push(args: argparse.Namespace) -> None:
    """The realistic mix (`overload_script`: task transitions, progress,
    logs) of W workflows, interleaved round-robin, flat out: `count`
    events in all, engine-sequenced from seq 1. What the store scenario
    writes."""

    script = overload_script(args.tasks)
    ctx, sock = _push_socket(args.endpoint)
    dumps = orjson.dumps
    start_wall = time.time()
    sent = 0
    rounds = -(-args.count // args.workflows)
    for k in range(min(rounds, len(script))):
        fields = script[k][0]
        for w in range(args.workflows):
            if sent >= args.count:
                break
            ev = {"workflow_id": f"{args.prefix}-{w}", "seq": k + 1, **fields}
            sock.send(dumps(ev))
            sent += 1
    sock.close()
    ctx.term()
    _write(args.out, {"sent": sent, "start_wall": start_wall, "end_wall": time.time()})


def role_ovl_push(args: argparse.Namespace) -> None:
    """W workflows run the script interleaved (round-robin), `rate` events/s in all,
    from the "go" line on stdin.

    Engine-sequenced (`seq`, like `broker simulate`); every event's `data`
    carries its send time `t`, state and log events also `i`. The PUSH
    socket's high-water mark can make a send wait (the broker not keeping
    up): the event keeps its stamp, the wait counts as ingest delay, and past
    `--deadline` the engine gives up and reports what it sent.
    """
    import zmq

    script = overload_script(args.tasks)
    wids = [f"{args.prefix}-{w}" for w in range(args.workflows)]
    total = len(script) * len(wids)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 100000)
    sock.connect(args.endpoint)
    time.sleep(0.2)  # let the connection come up before the clock starts
    _ready()
    sys.stdin.readline()  # "go": the runner has its subscribers in place
    cpu0 = _cpu_s()
    rate = args.rate
    sent = blocked = 0
    timed_out = False
    start = time.monotonic()
    deadline = start + args.deadline
    start_wall = time.time()
    dumps, now_mono, now_wall, sleep = orjson.dumps, time.monotonic, time.time, time.sleep
    # Workflows start staggered over half the script's length, so they run
    # at different phases and end spread over the step's second half (as
    # real ones do), not all in the same last round.
    n = len(script)
    order = sorted(
        ((k + (w * n // 2) // len(wids), w, k) for w in range(len(wids)) for k in range(n)),
    )
    for _, w, k in order:
        fields, i = script[k]
        pause = start + sent / rate - now_mono()
        if pause > 0:
            sleep(pause)
        t = now_wall()
        # seq 1 is the setup `workflow.created`.
        ev = {"workflow_id": wids[w], "seq": k + 2, "ts": int(t * 1000), **fields}
        ev["data"] = {"t": t} if i < 0 else {"t": t, "i": i}
        frame = dumps(ev)
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            blocked += 1
            left = deadline - now_mono()
            if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLOUT):
                timed_out = True
                break
            sock.send(frame)
        sent += 1
        if now_mono() > deadline:
            timed_out = sent < total
            break
    elapsed = now_mono() - start
    cpu = _cpu_s() - cpu0
    _write(
        args.out,
        {
            "cpu_s": cpu,
            "events": total,
            "sent": sent,
            "elapsed": elapsed,
            "start_wall": start_wall,
            "send_rate": sent / elapsed if elapsed > 0 else 0.0,
            "blocked_sends": blocked,
            "timed_out": timed_out,
        },
    )
    # What is still queued goes to the broker within the linger time, or is dropped.
    sock.setsockopt(zmq.LINGER, int(args.linger * 1000))
    sock.close()
    ctx.term()


UNKNOWN = -2  # `last_i` after a resync: the next index is whatever comes next


class Samples:
    """One delay sample per read: publish→receive (s), its ingest and
    delivery parts (ms), and the second it arrived in."""

    __slots__ = ("latency", "ingest", "delivery", "at")

    def __init__(self) -> None:
        self.latency: list[float] = []
        self.ingest: list[float] = []
        self.delivery: list[float] = []
        self.at: list[int] = []


def _num_end(data: bytes, pos: int) -> int:
    while data[pos] in b"0123456789.eE+-":
        pos += 1
    return pos


class OvlConn:
    """One overload subscriber's stream and what it found. `feed` takes each
    read; per read, with bytes.count/rfind (no JSON but for `end`):

    - loss/duplicates: the state and log events carry `"i"`, consecutive per
      workflow; the count of `"i":` in a read against the jump between the
      last index of this read and of the previous one. Events before a
      `resync` are skipped legitimately: the index is taken afresh after it.
    - order: the last `id: <epoch>:<seq>` of a read is above the previous
      read's (equal only for `end`, which carries the terminal event's id).
    - delay: the last event with a `"t"`: receive − t, split at its
      `server_ts` into ingest (t → broker) and delivery (broker → here).
    - `end`: its data parsed (once): the workflow's final state.
    """

    __slots__ = (
        "path",
        "sock",
        "connecting",
        "buf",
        "head_done",
        "status",
        "got",
        "last_i",
        "lost",
        "dups",
        "resyncs",
        "last_seq",
        "disorder",
        "ended",
        "final_state",
        "errors",
        "closed",
        "last_rx",
    )

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.connecting = True
        self.buf = b""
        self.head_done = False
        self.status = 0
        self.got = 0  # state and log events received
        self.last_i = -1
        self.lost = 0
        self.dups = 0
        self.resyncs = 0
        self.last_seq = -1
        self.disorder = 0
        self.ended = False
        self.final_state = ""
        self.errors = 0
        self.closed = False  # the stream closed without `end`
        self.last_rx = 0.0

    @property
    def done(self) -> bool:
        return self.ended or self.closed or (self.status != 0 and self.status != 200)

    def feed(self, data: bytes, now: float, samples: Samples, last_index: int) -> None:
        if not self.head_done:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            head, _, data = self.buf.partition(b"\r\n\r\n")
            self.buf = b""
            self.status = int(head.split(b" ", 2)[1])
            self.head_done = True
            if self.status != 200:
                return
        # Only whole events: a read may end inside one.
        buf = self.buf + data if self.buf else data
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.buf = buf
            return
        data, self.buf = buf[: cut + 2], buf[cut + 2 :]
        self.last_rx = now
        end_at = data.find(b"event: end")
        p = data.rfind(b"\nid: ")
        if p >= 0:
            colon = data.index(b":", p + 5)
            seq = int(data[colon + 1 : data.index(b"\n", colon)])
            if seq < self.last_seq or (seq == self.last_seq and end_at < 0):
                self.disorder += 1
            self.last_seq = seq
        seg = data
        r = data.rfind(b"event: resync")
        if r >= 0:
            self.resyncs += data.count(b"event: resync")
            # What came before the (last) resync is replaced by it.
            self.got += data.count(b'"i":', 0, r)
            seg = data[data.find(b"\n\n", r) + 2 :]
            self.last_i = UNKNOWN
        n = seg.count(b'"i":')
        if n:
            pos = seg.rfind(b'"i":') + 4
            li = int(seg[pos : _num_end(seg, pos)])
            if self.last_i == UNKNOWN:
                fpos = seg.find(b'"i":') + 4
                self.last_i = int(seg[fpos : _num_end(seg, fpos)]) - 1
            lost, dups = index_jump(self.last_i, n, li)
            self.lost += lost
            self.dups += dups
            self.got += n
            self.last_i = li
        tpos = seg.rfind(b'"t":')
        if tpos >= 0:
            t = float(seg[tpos + 4 : _num_end(seg, tpos + 4)])
            samples.latency.append(now - t)
            samples.at.append(int(now))
            line_start = seg.rfind(b"\n", 0, tpos)
            sp = seg.find(b'"server_ts":', line_start, seg.find(b"\n", tpos))
            if sp >= 0:
                server_ms = int(seg[sp + 12 : _num_end(seg, sp + 12)])
                samples.ingest.append(server_ms - t * 1000)
                samples.delivery.append(now * 1000 - server_ms)
        if b"event: error" in data:
            self.errors += 1
        if end_at >= 0:
            self.ended = True
            dp = data.find(b"data: ", end_at) + 6
            try:
                self.final_state = str(orjson.loads(data[dp : data.find(b"\n", dp)]).get("state", ""))
            except (orjson.JSONDecodeError, AttributeError):
                self.final_state = "?"
            if self.last_i != UNKNOWN and self.last_i < last_index:
                self.lost += last_index - self.last_i  # the tail never came


def ovl_subscribe(
    host: str,
    port: int,
    paths: list[str],
    last_index: int,
    duration: float,
    stdin_fd: int | None = None,
    on_started: Any = None,
    on_go: Any = None,
) -> tuple[list[OvlConn], Samples, bool]:
    """Open one SSE stream per path and read them all until each has ended
    (or closed), or until the deadline: `duration` seconds, or earlier the
    wall-clock time a line on `stdin_fd` names (`on_go` is called when it
    comes: the engine has started). A plain epoll loop, not
    trio: per read it costs a few µs of Python, so the subscribers take as
    little as can be of the cores they share with the broker.

    Returns the connections, the delay samples and whether it timed out."""
    import errno
    import select

    ep = select.epoll()
    by_fd: dict[int, OvlConn] = {}
    samples = Samples()
    stop_at = time.monotonic() + duration
    conns = []
    for path in paths:
        c = OvlConn(path)
        conns.append(c)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            c.closed = True
            sock.close()
            continue
        c.sock = sock
        by_fd[sock.fileno()] = c
        ep.register(sock.fileno(), select.EPOLLOUT)
    if stdin_fd is not None:
        ep.register(stdin_fd, select.EPOLLIN)
    if on_started is not None:
        on_started()
    open_ = len(by_fd)
    timed_out = False
    hostname = host.encode()

    def finish(fd: int, c: OvlConn) -> None:
        nonlocal open_
        ep.unregister(fd)
        assert c.sock is not None
        c.sock.close()
        del by_fd[fd]
        open_ -= 1

    try:
        while open_:
            left = stop_at - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for fd, ev in ep.poll(min(left, 1.0)):
                if fd == stdin_fd:
                    line = os.read(fd, 4096)
                    ep.unregister(fd)
                    if line.strip():
                        stop_at = min(stop_at, time.monotonic() + float(line) - time.time())
                        if on_go is not None:
                            on_go()
                    continue
                conn = by_fd.get(fd)
                if conn is None:
                    continue
                sk = conn.sock
                assert sk is not None
                if conn.connecting:
                    if ev & (select.EPOLLERR | select.EPOLLHUP):
                        conn.closed = True
                        finish(fd, conn)
                        continue
                    conn.connecting = False
                    try:
                        sk.send(
                            b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n"
                            % (conn.path.encode(), hostname)
                        )
                    except OSError:
                        conn.closed = True
                        finish(fd, conn)
                        continue
                    ep.modify(fd, select.EPOLLIN)
                    continue
                try:
                    data = sk.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    conn.closed = True
                    finish(fd, conn)
                    continue
                conn.feed(data, time.time(), samples, last_index)
                if conn.done:
                    finish(fd, conn)
    finally:
        for fd, still_open in list(by_fd.items()):
            finish(fd, still_open)
        ep.close()
    return conns, samples, timed_out


def role_ovl_sse(args: argparse.Namespace) -> None:
    _raise_nofile()
    host, port, _ = _split_url(args.url_base + "/")
    paths = open(args.paths_file).read().split()
    cpu_at_go = [0.0]

    def started() -> None:
        # A measuring client must not pause on its own: freeze what is set up.
        gc.collect()
        gc.freeze()
        gc.disable()
        _ready()
        cpu_at_go[0] = _cpu_s()

    def go() -> None:
        cpu_at_go[0] = _cpu_s()  # from here on: the step (set-up not counted)

    conns, samples, timed_out = ovl_subscribe(
        host, port, paths, args.last_index, args.duration, sys.stdin.fileno(), started, go
    )
    cpu = _cpu_s() - cpu_at_go[0]
    clean = [c for c in conns if not c.resyncs]
    _write(
        args.out,
        {
            "cpu_s": cpu,
            "conns": len(paths),
            "bad_status": sum(1 for c in conns if c.status != 200),
            "ended": sum(1 for c in conns if c.ended),
            "ended_ok": sum(1 for c in conns if c.ended and c.final_state == args.final_state),
            "closed_early": sum(1 for c in conns if c.closed and not c.ended),
            "errors": sum(c.errors for c in conns),
            "got": sum(c.got for c in conns),
            "resynced_conns": len(conns) - len(clean),
            "resync_frames": sum(c.resyncs for c in conns),
            "lost": sum(c.lost for c in clean),
            "dups": sum(c.dups for c in clean),
            "lost_after_resync": sum(c.lost for c in conns if c.resyncs),
            "dups_after_resync": sum(c.dups for c in conns if c.resyncs),
            "disorder": sum(c.disorder for c in conns),
            "last_rx": max((c.last_rx for c in conns), default=0.0),
            "timed_out": timed_out,
            "latency": samples.latency,
            "ingest": samples.ingest,
            "delivery": samples.delivery,
            "latency_at": samples.at,
        },
    )


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

    r = sub.add_parser("send-ref")
    r.add_argument("--conns", type=int, required=True)
    r.add_argument("--sends", type=int, required=True)
    r.add_argument("--rate", type=float, required=True, help="sends per second")
    r.add_argument("--out", required=True)

    r = sub.add_parser("mix-push")
    r.add_argument("--endpoint", required=True)
    r.add_argument("--prefix", required=True)
    r.add_argument("--workflows", type=int, required=True)
    r.add_argument("--tasks", type=int, required=True)
    r.add_argument("--count", type=int, required=True)
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

    r = sub.add_parser("ovl-push")
    r.add_argument("--endpoint", required=True)
    r.add_argument("--prefix", required=True, help="workflow ids are PREFIX-0 … PREFIX-(W-1)")
    r.add_argument("--workflows", type=int, required=True)
    r.add_argument("--tasks", type=int, required=True, help="tasks in each workflow's script")
    r.add_argument("--rate", type=float, required=True, help="events per second, all workflows together")
    r.add_argument("--deadline", type=float, required=True, help="seconds: give up sending after this")
    r.add_argument("--linger", type=float, default=5.0, help="seconds to flush what is queued at the end")
    r.add_argument("--out", required=True)

    r = sub.add_parser("ovl-sse")
    r.add_argument("--url-base", required=True)
    r.add_argument("--paths-file", required=True)
    r.add_argument("--last-index", type=int, required=True, help='the "i" of the last state event')
    r.add_argument("--final-state", default="completed")
    r.add_argument("--duration", type=float, required=True, help="seconds at most (stdin may say earlier)")
    r.add_argument("--out", required=True)

    args = p.parse_args(argv)
    {
        "pull-ref": role_pull_ref,
        "send-ref": role_send_ref,
        "push": role_push,
        "http-push": role_http_push,
        "sse": role_sse,
        "idle": role_idle,
        "ovl-push": role_ovl_push,
        "mix-push": role_mix_push,
        "ovl-sse": role_ovl_sse,
    }[args.role](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
