"""A standalone engine process for the end-to-end tests: plain pyzmq PUSH.

Two modes:

    python -m tests.engine --endpoint tcp://127.0.0.1:5557 --workflow wf-1 \
        --tasks 3 --log-lines 5 [--seq] [--rate 500] [--batch K] [--multipart K]

pushes a whole workflow (created, running, per task: scheduled, running,
three progress steps, log lines, completed; a generic event; completed) —
exactly the list `workflow_events()` returns, so a test can import it and
know what to expect.

    python -m tests.engine --endpoint tcp://127.0.0.1:5557 --file FRAMES

sends the file as it is: each line is one ZMQ message, its frames separated
by the ASCII record separator 0x1E (never valid inside JSON text), each frame
sent byte for byte (malformed JSON included).

The socket is set up as an engine should (FIELD-NOTES): IMMEDIATE=1 (never
queue into a pipe to a broker that is not there), a bounded LINGER so the
process exits once its messages are handed over, and SNDTIMEO so a missing
broker makes it fail (exit 1) instead of hanging. Prints one summary line.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson
import zmq

RS = b"\x1e"
LEVELS = ("info", "debug", "warning", "info", "error")


def workflow_events(
    workflow: str,
    tasks: int = 3,
    log_lines: int = 5,
    *,
    seq: bool = False,
    tenant: str | None = None,
    parent: str | None = None,
    final: str = "completed",
) -> list[dict[str, Any]]:
    """The events of one whole workflow, in the order the engine sends them."""
    out: list[dict[str, Any]] = []

    def add(etype: str, **fields: Any) -> None:
        ev: dict[str, Any] = {"workflow_id": workflow, "type": etype, **fields}
        if tenant is not None:
            ev["tenant"] = tenant
        if parent is not None:
            ev["parent_id"] = parent
        if seq:
            ev["seq"] = len(out) + 1
        out.append(ev)

    add("workflow.created")
    add("workflow.running")
    for i in range(1, tasks + 1):
        tid = f"t-{i}"
        add("task.scheduled", task_id=tid)
        add("task.running", task_id=tid)
        for pct in (25, 50, 75):
            add("task.progress", task_id=tid, progress=pct, message=f"{tid} at {pct}%")
        for n in range(log_lines):
            add("log", task_id=tid, level=LEVELS[n % len(LEVELS)], message=f"{tid} line {n}")
        add("task.completed", task_id=tid, result={"task": tid, "rows": i})
    add("timer.fired", data={"after": tasks})
    if final == "completed":
        add("workflow.completed", result={"tasks": tasks})
    else:
        add(f"workflow.{final}", error={"reason": "test"})
    return out


def _messages_from_file(path: str) -> list[list[bytes]]:
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    return [line.split(RS) for line in lines if line]


def _messages_generated(args: argparse.Namespace) -> list[list[bytes]]:
    events = workflow_events(
        args.workflow,
        args.tasks,
        args.log_lines,
        seq=args.seq,
        tenant=args.tenant,
        parent=args.parent,
        final=args.final,
    )
    if args.batch > 1:
        frames = [orjson.dumps(events[i : i + args.batch]) for i in range(0, len(events), args.batch)]
    else:
        frames = [orjson.dumps(ev) for ev in events]
    k = max(1, args.multipart)
    return [frames[i : i + k] for i in range(0, len(frames), k)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests.engine")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--file", help="send this file: one message per line, frames split by 0x1E")
    p.add_argument("--workflow", default="wf-1")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--log-lines", type=int, default=5)
    p.add_argument("--seq", action="store_true", help="engine-sequenced: send seq 1, 2, 3, ...")
    p.add_argument("--tenant")
    p.add_argument("--parent")
    p.add_argument("--final", default="completed", choices=("completed", "failed", "cancelled"))
    p.add_argument("--batch", type=int, default=1, help="events per frame (a JSON array when > 1)")
    p.add_argument("--multipart", type=int, default=1, help="frames per ZMQ message")
    p.add_argument("--rate", type=float, default=0, help="messages per second (0: as fast as possible)")
    p.add_argument("--linger-ms", type=int, default=5000)
    p.add_argument("--timeout-ms", type=int, default=10000, help="SNDTIMEO: give up if the broker is not there")
    args = p.parse_args(argv)

    messages = _messages_from_file(args.file) if args.file else _messages_generated(args)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, args.linger_ms)
    sock.setsockopt(zmq.SNDTIMEO, args.timeout_ms)
    sock.connect(args.endpoint)
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    next_at = time.monotonic()
    sent = 0
    try:
        for frames in messages:
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
            sock.send_multipart(frames)
            sent += 1
    except zmq.Again:
        print(f"engine: broker at {args.endpoint} not reachable; sent {sent} of {len(messages)}", file=sys.stderr)
        return 1
    finally:
        sock.close()  # waits up to LINGER for the messages to be handed over
        ctx.term()
    print(f"engine: sent {sent} messages to {args.endpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
