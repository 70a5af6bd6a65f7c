"""Builders shared by the core tests: a deterministic state and event dicts."""

from __future__ import annotations

from typing import Any

import orjson

from broker.core.entry import Entry, Message
from broker.core.state import BrokerState, IngestResult, Limits


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


def wfe(wid: str = "w", etype: str = "workflow.running", **kw: Any) -> dict[str, Any]:
    return {"workflow_id": wid, "type": etype, **kw}


def log(wid: str = "w", level: str = "info", **kw: Any) -> dict[str, Any]:
    return {"workflow_id": wid, "type": "log", "level": level, **kw}


def task(tid: str, state: str, wid: str = "w", **kw: Any) -> dict[str, Any]:
    return {"workflow_id": wid, "type": f"task.{state}", "task_id": tid, **kw}


def body(item: Entry | Message) -> dict[str, Any]:
    return orjson.loads(item.body)
