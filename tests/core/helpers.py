"""Builders shared by the core tests: a deterministic state, event dicts, and
short views of what readers return.

The event builders default to workflow "w" (most core tests need one
workflow and say only what differs); the end-to-end ones in tests/builders.py
take the workflow id first and always. Deeply nested payloads come from
tests/builders.py for both.
"""

from __future__ import annotations

from typing import Any

import orjson

from broker.core.entry import Entry, Message
from broker.core.state import BrokerState, IngestResult, Limits

DROP = object()  # a `valid_event` field set to DROP is left out


def mk(**limits: Any) -> BrokerState:
    return BrokerState("n1", Limits(**limits), make_epoch=lambda: "abc")


def send(st: BrokerState, *events: dict[str, Any], now: float = 0.0) -> IngestResult:
    """Ingest each event as its own frame; every one must be accepted."""
    total = IngestResult()
    for ev in events:
        r = st.ingest_frame(orjson.dumps(ev), now)
        assert r.rejected == [], r.rejected
        total.accepted += r.accepted
    return total


def ingest(st: BrokerState, *events: dict[str, Any], now: float = 0.0, batch: bool = False) -> IngestResult:
    """Ingest events, each in its own frame (or all as one batch), rejects
    allowed; the results merged into one."""
    if batch:
        return st.ingest_frame(orjson.dumps(list(events)), now)
    total = IngestResult()
    for ev in events:
        r = st.ingest_frame(orjson.dumps(ev), now)
        total.accepted += r.accepted
        total.duplicates += r.duplicates
        total.rejected.extend(r.rejected)
        total.touched |= r.touched
        total.created |= r.created
    return total


def wfe(wid: str = "w", etype: str = "workflow.running", **kw: Any) -> dict[str, Any]:
    return {"workflow_id": wid, "type": etype, **kw}


def log(wid: str = "w", level: str = "info", **kw: Any) -> dict[str, Any]:
    return {"workflow_id": wid, "type": "log", "level": level, **kw}


def task(tid: str, state: str, wid: str = "w", **kw: Any) -> dict[str, Any]:
    return {"workflow_id": wid, "type": f"task.{state}", "task_id": tid, **kw}


def progress(tid: str, value: int, wid: str = "w") -> dict[str, Any]:
    return task(tid, "progress", wid=wid, progress=value)


def valid_event(base: str = "workflow.running", **fields: Any) -> dict[str, Any]:
    """A valid event of type `base` for workflow "wf-1", with the fields its
    type requires, then `fields` over them (DROP removes one)."""
    obj: dict[str, Any] = {"workflow_id": "wf-1", "type": base}
    if base.startswith("task."):
        obj["task_id"] = "t-1"
    if base == "task.progress":
        obj["progress"] = 10
    if base == "log":
        obj["level"] = "info"
    obj.update(fields)
    return {k: v for k, v in obj.items() if v is not DROP}


def body(item: Entry | Message) -> dict[str, Any]:
    return orjson.loads(item.body)


def brief(items: list[Entry | Message]) -> list[tuple[str, str, int]]:
    """(kind, workflow, seq) of each item."""
    return [(b["kind"], b["workflow_id"], b["seq"]) for b in map(body, items)]


def reasons(r: IngestResult) -> list[str]:
    """The reject reason of each rejected event, in order."""
    return [rej.reason for _, rej in r.rejected]
