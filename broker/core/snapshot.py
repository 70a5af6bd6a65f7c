"""Materialised current state of one workflow and its tasks (DESIGN.md §4).

`WorkflowSnapshot.apply(event, seq, ts)` folds one released event into the
state; `to_message()` renders the `snapshot`/`resync` message body. Times are
the engine's `ts` when given, else the broker's receive time (ms).

Task `attempt` counts how often the task entered `running` (a retry that
runs again is attempt 2). A task's `progress` becomes 100 when it completes.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Any

from .envelope import TERMINAL_STATES


class TaskSnapshot:
    __slots__ = (
        "task_id",
        "state",
        "progress",
        "attempt",
        "created",
        "started",
        "finished",
        "updated",
        "message",
        "result",
        "error",
    )

    def __init__(self, task_id: str, ts: int) -> None:
        self.task_id = task_id
        self.state = "created"
        self.progress: float | None = None
        self.attempt = 0
        self.created = ts
        self.started: int | None = None
        self.finished: int | None = None
        self.updated = ts
        self.message: str | None = None
        self.result: Any = None
        self.error: Any = None

    def apply(self, ev: dict[str, Any], ts: int) -> None:
        self.updated = ts
        if "message" in ev:
            self.message = ev["message"]
        if "progress" in ev:
            self.progress = ev["progress"]
        if ev["kind"] != "state":
            return
        state = ev.get("state", self.state)
        self.state = state
        if state == "running":
            self.attempt += 1
            if self.started is None:
                self.started = ts
            self.finished = None
        elif state in TERMINAL_STATES:
            self.finished = ts
            if state == "completed":
                self.progress = 100
                self.error = None  # an error of an earlier attempt no longer stands
        if "result" in ev:
            self.result = ev["result"]
        if "error" in ev:
            self.error = ev["error"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "state": self.state,
            "progress": self.progress,
            "attempt": self.attempt,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "updated": self.updated,
            "message": self.message,
            "result": self.result,
            "error": self.error,
        }


class WorkflowSnapshot:
    __slots__ = (
        "workflow_id",
        "tenant",
        "parent_id",
        "state",
        "created",
        "updated",
        "seq",
        "message",
        "result",
        "error",
        "tasks",
    )

    def __init__(self, workflow_id: str, tenant: str, parent_id: str | None) -> None:
        self.workflow_id = workflow_id
        self.tenant = tenant
        self.parent_id = parent_id
        # A workflow exists for the broker from its first event of any type.
        self.state = "created"
        self.created: int | None = None
        self.updated: int | None = None
        self.seq = 0
        self.message: str | None = None
        self.result: Any = None
        self.error: Any = None
        self.tasks: dict[str, TaskSnapshot] = {}

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def apply(self, ev: dict[str, Any], seq: int, ts: int) -> None:
        self.seq = seq
        if self.created is None:
            self.created = ts
        self.updated = ts
        if self.parent_id is None and "parent_id" in ev:
            self.parent_id = ev["parent_id"]
        etype: str = ev["type"]
        task_id = ev.get("task_id")
        if task_id is not None and etype.startswith("task."):
            task = self.tasks.get(task_id)
            if task is None:
                task = self.tasks[task_id] = TaskSnapshot(task_id, ts)
            task.apply(ev, ts)
            return
        if etype.startswith("workflow.") and ev["kind"] == "state":
            self.state = ev["state"]
            if "message" in ev:
                self.message = ev["message"]
            if "result" in ev:
                self.result = ev["result"]
            if "error" in ev:
                self.error = ev["error"]

    def to_message(self, kind: str, epoch: str, tasks: frozenset[str] | None = None) -> dict[str, Any]:
        return {
            "kind": kind,
            "workflow_id": self.workflow_id,
            "epoch": epoch,
            "seq": self.seq,
            "tenant": self.tenant,
            "parent_id": self.parent_id,
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
            "message": self.message,
            "result": self.result,
            "error": self.error,
            "tasks": {tid: t.to_dict() for tid, t in self.tasks.items() if tasks is None or tid in tasks},
        }
