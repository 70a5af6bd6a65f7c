"""`broker tail`: a live terminal view of a workflow, or of a tenant's,
a parent's or listed workflows, through broker.client.subscribe() and rich.

One workflow: its state, a table of its tasks (state in colour, attempt,
a progress bar, the latest message) and its latest log lines. Several:
a table of the workflows (most recently updated first) and the latest
log lines of all. The header says whether the stream is live or
reconnecting; the subscription resumes by itself. `--json` prints every
message as one JSON line instead (its body, with `cursor`). Exit 0 at
the end (the workflow's, or every listed one's), 1 when the broker
refuses the subscription, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from ..core.snapshot import WorkflowSnapshot

if TYPE_CHECKING:  # imported when the command runs: `broker run` need not load the client (httpx, …)
    from ..client import Message, Subscription

STATE_STYLES = {
    "created": "dim",
    "pending": "dim",
    "queued": "dim",
    "running": "bold cyan",
    "completed": "bold green",
    "failed": "bold red",
    "cancelled": "bold yellow",
    "timed_out": "bold red",
    "skipped": "dim",
}
LEVEL_STYLES = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red", "critical": "bold white on red"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", nargs="?", help="the workflow to follow (or one of --tenant, --parent, --workflows)")
    p.add_argument("--tenant", help="every workflow of a tenant (never ends: Ctrl-C)")
    p.add_argument("--parent", help="a workflow and its descendants")
    p.add_argument("--workflows", metavar="A,B", help="listed workflows (ends when each has)")
    p.add_argument(
        "--url", default=os.environ.get("BROKER_URL", "http://127.0.0.1:8080"), help="the broker's HTTP base"
    )
    p.add_argument("--token", default=os.environ.get("BROKER_TOKEN"), help="a bearer token (or $BROKER_TOKEN)")
    p.add_argument("--ws", action="store_true", help="over WebSocket (default: SSE)")
    p.add_argument("--types", metavar="LIST", help="state,progress,log,event")
    p.add_argument("--tasks", metavar="LIST", help="only these tasks (and the workflow's state)")
    p.add_argument("--states", metavar="LIST", help="state messages of these states only (or 'terminal')")
    p.add_argument("--level", help="logs at or above: debug, info, warning, error, critical")
    p.add_argument("--coalesce", action="store_true", help="the latest task state per write only")
    p.add_argument("--since", help="start at this seq (a journal cursor for several workflows)")
    p.add_argument("--cursor", help="resume after this cursor (as printed by --json)")
    p.add_argument("--json", action="store_true", help="print each message as a JSON line, no live view")
    p.add_argument("--logs", type=int, default=10, metavar="N", help="log lines shown")


def _words(value: str | None) -> list[str] | None:
    return None if value is None else [w.strip() for w in value.split(",") if w.strip()]


def open_subscription(args: argparse.Namespace) -> Subscription | str:
    """The subscription the arguments ask for, or what is wrong with them."""
    from ..client import subscribe

    scopes = {
        "workflow": args.workflow,
        "tenant": args.tenant,
        "parent": args.parent,
        "workflows": _words(args.workflows),
    }
    given = {k: v for k, v in scopes.items() if v is not None}
    if len(given) != 1:
        return "tail: give one workflow, or one of --tenant, --parent, --workflows"
    since: int | str | None = args.since
    if args.since is not None and "workflow" in given:
        if not args.since.isdigit():
            return f"tail: --since must be a seq (a number) for one workflow, not {args.since!r}"
        since = int(args.since)
    try:
        return subscribe(
            args.url,
            **given,
            types=_words(args.types),
            tasks=_words(args.tasks),
            states=_words(args.states),
            level=args.level,
            coalesce=args.coalesce,
            cursor=args.cursor,
            since=since,
            token=args.token,
            transport="ws" if args.ws else "sse",
        )
    except ValueError as exc:
        return f"tail: {exc}"


def run(args: argparse.Namespace) -> int:
    from ..client import SubscriptionError

    sub = open_subscription(args)
    if isinstance(sub, str):
        print(f"broker: {sub}", file=sys.stderr)
        return 2
    try:
        if args.json:
            _print_json(sub)
        else:
            _live(sub, args)
    except SubscriptionError as exc:
        print(f"broker: tail: {args.url} refused the subscription: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        sub.close()
    return 0


def _print_json(sub: Subscription) -> None:
    out = sys.stdout
    with sub:
        for msg in sub:
            out.write(orjson.dumps({**msg.data, "cursor": msg.cursor}).decode() + "\n")
            out.flush()


def _live(sub: Subscription, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.live import Live

    view = TailView(sub, args.logs, title=args.workflow or args.tenant or args.parent or args.workflows)
    console = Console()
    with sub, Live(get_renderable=view.render, console=console, refresh_per_second=8, redirect_stderr=False):
        for msg in sub:
            view.add(msg)


def _clock(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return "--:--:--"
    return datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S")


class TailView:
    """What the screen shows, from the subscription's view and the latest
    log lines. `render()` runs in rich's refresh thread: it reads copies
    of the dicts (a dict or deque copy is atomic under the GIL), never
    iterates what the main thread changes."""

    def __init__(self, sub: Subscription, log_lines: int, title: str) -> None:
        self.sub = sub
        self.title = title
        self.single = "workflow" in sub.scope
        self.logs: deque[Message] = deque(maxlen=max(0, log_lines))
        self.last_error: dict[str, Any] | None = None
        self.started = time.monotonic()

    def add(self, msg: Message) -> None:
        if msg.kind == "log":
            self.logs.append(msg)
        elif msg.kind == "state" and msg.data.get("error") is not None:
            self.last_error = {"workflow_id": msg.workflow_id, "task_id": msg.task_id, "error": msg.data["error"]}

    def render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [self._header()]
        workflows = list(self.sub.view.workflows.items())
        if self.single:
            snap = dict(workflows).get(self.title)
            parts.append(self._tasks(snap) if snap is not None else Text("waiting for the workflow…", style="dim"))
        else:
            parts.append(self._workflows(workflows))
        if self.last_error is not None:
            err = self.last_error
            where = err["task_id"] or err["workflow_id"]
            parts.append(Text(f"last error ({where}): {_short(err['error'])}", style="red"))
        if self.logs.maxlen:
            parts.append(self._logs(list(self.logs)))
        return Group(*parts)

    def _header(self) -> Any:
        from rich.text import Text

        sub = self.sub
        text = Text()
        text.append(f"{self.title}", style="bold")
        if self.single:
            snap = sub.view.workflows.get(self.title)
            if snap is not None:
                text.append("  ")
                text.append(snap.state, style=STATE_STYLES.get(snap.state, ""))
                text.append(f"  seq {snap.seq}", style="dim")
        else:
            text.append(f"  {len(sub.view.workflows)} workflows", style="dim")
        text.append("  ")
        if sub.state.done:
            text.append("■ ended", style="bold")
        elif sub.connected:
            text.append("● live", style="green")
        elif sub.reconnects or time.monotonic() - self.started > 2:
            text.append(f"reconnecting… ({sub.reconnects})", style="bold yellow")
        else:
            text.append("connecting…", style="dim")
        return text

    def _tasks(self, snap: WorkflowSnapshot) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        table = Table(expand=False, box=None, pad_edge=False, header_style="bold")
        table.add_column("task")
        table.add_column("state")
        table.add_column("try", justify="right")
        table.add_column("progress")
        table.add_column("%", justify="right")
        table.add_column("message", overflow="ellipsis", no_wrap=True, max_width=60)
        for task_id, task in list(snap.tasks.items()):
            progress = task.progress
            table.add_row(
                task_id,
                Text(task.state, style=STATE_STYLES.get(task.state, "")),
                str(task.attempt),
                ProgressBar(total=100, completed=progress or 0, width=24),
                "" if progress is None else f"{progress:g}",
                task.message or "",
            )
        if not snap.tasks:
            table.add_row(Text("no tasks yet", style="dim"), "", "", "", "", "")
        return table

    def _workflows(self, workflows: list[tuple[str, WorkflowSnapshot]]) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table(expand=False, box=None, pad_edge=False, header_style="bold")
        for name in ("workflow", "state", "tasks done", "updated"):
            table.add_column(name)
        workflows.sort(key=lambda item: item[1].updated or 0, reverse=True)
        shown = workflows[:20]
        for wid, snap in shown:
            tasks = list(snap.tasks.values())
            done = sum(1 for t in tasks if t.state == "completed")
            table.add_row(
                wid,
                Text(snap.state, style=STATE_STYLES.get(snap.state, "")),
                f"{done}/{len(tasks)}",
                _clock(snap.updated),
            )
        if len(workflows) > len(shown):
            table.add_row(Text(f"… {len(workflows) - len(shown)} more", style="dim"), "", "", "")
        return table

    def _logs(self, lines: list[Message]) -> Any:
        from rich.text import Text

        text = Text()
        for msg in lines:
            data = msg.data
            level = str(data.get("level", "info"))
            text.append(f"{_clock(data.get('ts'))} ", style="dim")
            text.append(f"{level:<8} ", style=LEVEL_STYLES.get(level, ""))
            if not self.single:
                text.append(f"{msg.workflow_id} ", style="bold")
            if msg.task_id:
                text.append(f"[{msg.task_id}] ", style="dim")
            text.append(str(data.get("message", "")) + "\n")
        return text


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"
