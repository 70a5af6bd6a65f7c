"""`broker simulate`: an engine simulator pushing realistic workflows over ZMQ.

Each simulated workflow is a small script of lifecycle events, produced
lazily: created → running → its tasks (scheduled → running → progress and
log lines → completed; some fail and are retried, attempt 2 runs again; a
task whose retries run out fails the workflow), sometimes a child workflow
(`parent_id`), generic events (`timer.fired`, `output`), and a terminal
`workflow.completed` / `workflow.failed` (or `cancelled`). Many workflows run
interleaved, at a chosen overall event rate; events carry the engine's
`seq` (engine-sequenced, as an engine with persisted state would) unless
`--no-seq`.

It is a tool for people first (the README's quick start uses it: a newcomer
sees live streams at once) and the engine of `broker bench`'s many-workflow
scenario. Deterministic for a given `--seed`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import zmq

PROGRESS_EVERY = 5.0  # seconds between progress lines on stderr

TASK_NAMES = ("extract", "validate", "transform", "enrich", "score", "load", "notify", "archive")
LOG_LINES = (
    ("info", "connected to source"),
    ("debug", "batch read"),
    ("info", "rows processed"),
    ("warning", "slow response from upstream, retrying request"),
    ("info", "checkpoint written"),
    ("error", "upstream returned 503"),
)


class Shape:
    """The knobs of the simulated workload."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tasks = args.tasks
        self.progress_steps = args.progress_steps
        self.logs_per_task = args.logs_per_task
        self.fail_rate = args.fail_rate
        self.retry_rate = args.retry_rate
        self.child_rate = args.child_rate
        self.tenant = args.tenant
        self.seq = not args.no_seq


def workflow_script(wid: str, rng: random.Random, shape: Shape, parent: str | None = None) -> Iterator[dict[str, Any]]:
    """The events of one workflow, in order, without seq/ts (added on send)."""
    base: dict[str, Any] = {"workflow_id": wid}
    if shape.tenant:
        base["tenant"] = shape.tenant
    first = dict(base, type="workflow.created")
    if parent:
        first["parent_id"] = parent
    yield first
    yield dict(base, type="workflow.running")
    tasks = rng.sample(TASK_NAMES, k=min(shape.tasks, len(TASK_NAMES)))
    failed = False
    for name in tasks:
        yield dict(base, type="task.scheduled", task_id=name)
        attempts = 1 + sum(rng.random() < shape.retry_rate for _ in range(2))
        for attempt in range(1, attempts + 1):
            yield dict(base, type="task.running", task_id=name)
            for step in range(1, shape.progress_steps + 1):
                pct = round(100 * step / (shape.progress_steps + 1), 1)
                yield dict(base, type="task.progress", task_id=name, progress=pct, message=f"{pct}%")
                for _ in range(shape.logs_per_task // max(1, shape.progress_steps)):
                    level, text = rng.choice(LOG_LINES)
                    yield dict(base, type="log", level=level, task_id=name, message=f"{name}: {text}")
            if attempt < attempts:
                yield dict(
                    base,
                    type="task.retrying",
                    task_id=name,
                    message=f"attempt {attempt} failed",
                    error={"reason": "transient"},
                )
            elif rng.random() < shape.fail_rate:
                yield dict(base, type="task.failed", task_id=name, error={"reason": "gave up"})
                failed = True
            else:
                yield dict(base, type="task.completed", task_id=name, result={"rows": rng.randint(1, 10_000)})
        if failed:
            break
        if rng.random() < 0.3:
            yield dict(base, type="timer.fired", data={"after": name})
    if not failed and parent is None and rng.random() < shape.child_rate:
        yield dict(base, type="output", data={"spawned": f"{wid}.child"})
        yield from workflow_script(f"{wid}.child", rng, shape, parent=wid)
    if failed:
        yield dict(base, type="workflow.failed", error={"task": name})
    elif rng.random() < 0.03:
        yield dict(base, type="workflow.cancelled", message="cancelled by operator")
    else:
        yield dict(base, type="workflow.completed", result={"tasks": len(tasks)})


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    shape = Shape(args)
    prefix = args.prefix or f"sim-{int(time.time()) % 100000}"
    seqs: dict[str, int] = {}
    started = 0
    active: list[Iterator[dict[str, Any]]] = []
    sent = 0
    deadline = time.monotonic() + args.duration if args.duration else None
    start = time.monotonic()
    from ..cli import no_broker, open_publisher

    pub = open_publisher(args, "simulate")
    if isinstance(pub, str):
        print(f"broker: {pub}", file=sys.stderr)
        return 2
    every = 1.0 if args.verbose else PROGRESS_EVERY
    progress_at = start + every
    done = 0
    try:
        while True:
            while len(active) < args.concurrent and (args.workflows == 0 or started < args.workflows):
                active.append(workflow_script(f"{prefix}-{started + 1}", rng, shape))
                started += 1
            if not active or (deadline is not None and time.monotonic() >= deadline):
                break
            i = rng.randrange(len(active))
            try:
                ev = next(active[i])
            except StopIteration:
                active[i] = active[-1]
                active.pop()
                done += 1
                continue
            if shape.seq:
                wid = ev["workflow_id"]
                seqs[wid] = seqs.get(wid, 0) + 1
                ev["seq"] = seqs[wid]
            ev["ts"] = int(time.time() * 1000)
            pub.publish(ev)
            sent += 1
            if args.rate:
                due = start + sent / args.rate
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            if (now := time.monotonic()) >= progress_at:
                progress_at = now + every
                print(
                    f"simulate: {sent} events sent ({sent / (now - start):.0f}/s), "
                    f"{done} of {started} workflows done, {len(active)} running",
                    file=sys.stderr,
                )
    except zmq.Again:
        pub.close(linger_ms=0)
        print(f"broker: simulate: {no_broker(args.endpoint, args.timeout)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    pub.close()
    elapsed = time.monotonic() - start
    print(
        f"simulate: pushed {sent} events of {started} workflows in {elapsed:.1f}s "
        f"({sent / max(elapsed, 1e-9):.0f}/s) to {args.endpoint}; ids {prefix}-1…",
        file=sys.stderr,
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5557", help="the broker's ingest endpoint")
    p.add_argument("--workflows", type=int, default=20, help="how many workflows in all (0: until --duration)")
    p.add_argument("--concurrent", type=int, default=5, help="workflows running at once")
    p.add_argument("--rate", type=float, default=20, help="events per second overall (0: as fast as possible)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: when done)")
    p.add_argument("--tasks", type=int, default=4, help="tasks per workflow (at most 8)")
    p.add_argument("--progress-steps", type=int, default=3, help="progress updates per task attempt")
    p.add_argument("--logs-per-task", type=int, default=3, help="log lines per task attempt")
    p.add_argument("--fail-rate", type=float, default=0.05, help="chance a task fails for good")
    p.add_argument("--retry-rate", type=float, default=0.15, help="chance of each of up to 2 retries")
    p.add_argument("--child-rate", type=float, default=0.2, help="chance a workflow spawns a child")
    p.add_argument("--tenant", default="", help="tenant of every workflow (default: the broker's default)")
    p.add_argument("--prefix", default="", help="workflow id prefix (default: sim-<n>)")
    p.add_argument("--no-seq", action="store_true", help="let the broker sequence events (no engine seq)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a new run each time)")
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for a broker to take an event: then exit 1"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="progress every second instead of every 5 s")
