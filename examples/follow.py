"""Follow a workflow with broker.client: its tasks and logs as they come,
resumed after any drop, until its end.

    python examples/follow.py wf-1                      # sync, over SSE
    python examples/follow.py wf-1 --trio --ws          # trio, over WebSocket
    broker push --endpoint tcp://127.0.0.1:5557 < events.jsonl   # meanwhile

It prints each event and, at the end, each task's final state.
"""

from __future__ import annotations

import argparse

import trio

from broker.client import Message, Subscription, subscribe


def show(msg: Message, sub: Subscription) -> None:
    if msg.kind == "log":
        print(f"  log  [{msg.data['level']}] {msg.data.get('message', '')}")
    elif msg.is_event:
        what = msg.task_id or "workflow"
        print(f"  {msg.data['type']:<16} {what}  {msg.data.get('progress', '')}")
    elif msg.kind in ("snapshot", "resync"):
        snap = sub.view.workflows[msg.data["workflow_id"]]
        print(f"{msg.kind}: {snap.state}, {len(snap.tasks)} tasks")
    elif msg.kind == "end":
        snap = sub.view.workflows[msg.data["workflow_id"]]
        print(f"end: {snap.state}")
        for task_id, task in snap.tasks.items():
            print(f"  {task_id}: {task.state} (attempt {task.attempt})")


def follow(url: str, workflow: str, transport: str) -> None:
    with subscribe(url, workflow=workflow, transport=transport) as sub:  # type: ignore[arg-type]
        for msg in sub:
            show(msg, sub)


async def follow_async(url: str, workflow: str, transport: str) -> None:
    async with subscribe(url, workflow=workflow, transport=transport) as sub:  # type: ignore[arg-type]
        async for msg in sub:
            show(msg, sub)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--ws", action="store_true", help="over WebSocket (default: SSE)")
    p.add_argument("--trio", action="store_true", help="the trio async iterator (default: the sync one)")
    args = p.parse_args()
    transport = "ws" if args.ws else "sse"
    if args.trio:
        trio.run(follow_async, args.url, args.workflow, transport)
    else:
        follow(args.url, args.workflow, transport)


if __name__ == "__main__":
    main()
