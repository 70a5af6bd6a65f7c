"""An engine process that pushes one workflow's events at a fixed rate.

    python -m tests.firehose --endpoint tcp://… --workflow wf --count 15000 --rate 3000 \
        [--kind event|log|task] [--payload 300] [--end]

Every event carries `data.i` (its index) and `data.t` (wall-clock send time,
for publish→receive delay), or for logs the same in `message`. Prints one
JSON line: sent, elapsed, max_send_ms (how long the longest PUSH send call
blocked: an engine must never be slowed by subscribers), also to --summary FILE.
"""

from __future__ import annotations

import argparse
import sys
import time

import orjson
import zmq


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--workflow", required=True)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--kind", choices=("event", "log", "task"), default="event")
    p.add_argument("--payload", type=int, default=0, help="bytes of filler per event")
    p.add_argument("--end", action="store_true", help="finish with workflow.completed")
    p.add_argument("--summary", help="also write the summary line to this file")
    args = p.parse_args(argv)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, 10000)
    sock.setsockopt(zmq.SNDTIMEO, 10000)
    sock.connect(args.endpoint)
    filler = "x" * args.payload
    start = time.monotonic()
    max_send = 0.0
    for i in range(args.count):
        due = start + i / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if args.kind == "event":
            ev = {"workflow_id": args.workflow, "type": "tick", "data": {"i": i, "t": time.time(), "f": filler}}
        elif args.kind == "log":
            ev = {"workflow_id": args.workflow, "type": "log", "level": "info", "message": f"{i} {filler}"}
        else:
            ev = {
                "workflow_id": args.workflow,
                "type": "task." + ("running" if i % 2 == 0 else "completed"),
                "task_id": f"t{i // 2}",
                "data": {"f": filler},
            }
        t0 = time.monotonic()
        sock.send(orjson.dumps(ev))
        max_send = max(max_send, time.monotonic() - t0)
    if args.end:
        sock.send(orjson.dumps({"workflow_id": args.workflow, "type": "workflow.completed"}))
    elapsed = time.monotonic() - start
    sock.close()
    ctx.term()
    summary = orjson.dumps({"sent": args.count, "elapsed": elapsed, "max_send_ms": max_send * 1000})
    print(summary.decode())
    if args.summary:
        with open(args.summary, "wb") as f:
            f.write(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
