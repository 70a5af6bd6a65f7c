"""Envelope validation (DESIGN.md §2) and frame decoding."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.core.envelope import KNOWN_FIELDS, LOG_LEVELS, MAX_SEQ, decode_frame, kind_of, validate
from broker.core.errors import REJECT_REASONS, Reject

DROP = object()


def ev(base: str = "workflow.running", **fields: Any) -> dict[str, Any]:
    """A valid event of type `base`, with fields overridden (DROP removes one)."""
    obj: dict[str, Any] = {"workflow_id": "wf-1", "type": base}
    if base.startswith("task."):
        obj["task_id"] = "t-1"
    if base == "task.progress":
        obj["progress"] = 10
    if base == "log":
        obj["level"] = "info"
    obj.update(fields)
    return {k: v for k, v in obj.items() if v is not DROP}


def reject_of(obj: Any) -> Reject:
    with pytest.raises(Reject) as info:
        validate(obj)
    assert info.value.reason in REJECT_REASONS
    return info.value


# --------------------------------------------------------------- valid input


@pytest.mark.parametrize(
    "obj, expected",
    [
        (ev(), {"workflow_id": "wf-1", "type": "workflow.running", "state": "running", "kind": "state"}),
        (ev(workflow_id="x" * 256), {"workflow_id": "x" * 256}),
        (ev(workflow_id="é" * 256), {"workflow_id": "é" * 256}),  # characters, not bytes
        (ev(workflow_id="a/b:c ü"), {"workflow_id": "a/b:c ü"}),
        (ev(type="timer.fired"), {"type": "timer.fired", "kind": "event"}),
        (ev(type="token"), {"type": "token", "kind": "event"}),
        (ev(type="a-b_c.D9.x"), {"type": "a-b_c.D9.x", "kind": "event"}),
        (ev(type="x" * 128), {"type": "x" * 128}),
        (ev(id="i" * 128), {"id": "i" * 128}),
        (ev(seq=1), {"seq": 1}),
        (ev(seq=MAX_SEQ), {"seq": MAX_SEQ}),
        (ev(ts=0), {"ts": 0}),
        (ev(ts=1763770000123), {"ts": 1763770000123}),
        (ev(tenant="acme"), {"tenant": "acme"}),
        (ev(tenant="t" * 128), {"tenant": "t" * 128}),
        (ev(parent_id="wf-0"), {"parent_id": "wf-0"}),
        (ev(task_id="t-9"), {"task_id": "t-9"}),  # task_id allowed on workflow events
        (ev("task.running"), {"task_id": "t-1", "state": "running", "kind": "state"}),
        (ev("task.running", task_id="t" * 256), {"task_id": "t" * 256}),
        (ev("task.progress", progress=0), {"progress": 0, "kind": "progress"}),
        (ev("task.progress", progress=100), {"progress": 100}),
        (ev("task.progress", progress=42.5), {"progress": 42.5}),
        (ev("task.progress", message="half"), {"message": "half"}),
        (ev("log", level="debug"), {"level": "debug", "kind": "log"}),
        (ev("log", level="critical", message=""), {"level": "critical", "message": ""}),
        (ev("workflow.completed", state="custom_state"), {"state": "custom_state"}),
        (ev("workflow.anything_new"), {"state": "anything_new", "kind": "state"}),
        (ev("task.retrying"), {"state": "retrying"}),
        (ev(type="timer.fired", state="waiting"), {"state": "waiting", "kind": "event"}),
        (ev(message="hello"), {"message": "hello"}),
        (ev(progress=5), {"progress": 5}),  # progress allowed on any type
    ],
)
def test_valid_fields(obj: dict[str, Any], expected: dict[str, Any]) -> None:
    out = validate(obj)
    for key, value in expected.items():
        assert out[key] == value


@pytest.mark.parametrize("level", list(LOG_LEVELS))
def test_every_log_level_is_accepted(level: str) -> None:
    assert validate(ev("log", level=level))["level"] == level


@pytest.mark.parametrize("key", ["result", "error", "data"])
@pytest.mark.parametrize("value", [None, 0, 1.5, "s", True, [], [1, "a", None], {}, {"a": {"b": [1, {"c": None}]}}])
def test_result_error_data_take_any_json(key: str, value: Any) -> None:
    out = validate(ev("task.completed", **{key: value}))
    assert key in out and out[key] == value


def test_output_has_only_envelope_fields_plus_kind() -> None:
    full = {
        "workflow_id": "wf",
        "type": "task.completed",
        "id": "i",
        "seq": 3,
        "tenant": "t",
        "ts": 5,
        "task_id": "t1",
        "state": "completed",
        "progress": 100,
        "level": "info",
        "message": "m",
        "parent_id": "p",
        "result": 1,
        "error": None,
        "data": {"x": 1},
    }
    assert set(full) == KNOWN_FIELDS
    out = validate(full)
    assert out == {**full, "kind": "state"}


def test_absent_optional_fields_are_not_invented() -> None:
    out = validate({"workflow_id": "wf", "type": "timer.fired"})
    assert out == {"workflow_id": "wf", "type": "timer.fired", "kind": "event"}


def test_explicit_null_counts_as_absent_for_optional_fields() -> None:
    out = validate(ev(id=None, seq=None, tenant=None, ts=None, message=None))
    for key in ("id", "seq", "tenant", "ts", "message"):
        assert key not in out


# ------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "obj, reason, detail",
    [
        # workflow_id
        (ev(workflow_id=DROP), "missing_field", "workflow_id"),
        (ev(workflow_id=None), "missing_field", "workflow_id"),
        (ev(workflow_id=""), "invalid_field", "workflow_id"),
        (ev(workflow_id="x" * 257), "invalid_field", "workflow_id"),
        (ev(workflow_id=5), "invalid_field", "workflow_id"),
        (ev(workflow_id=["wf"]), "invalid_field", "workflow_id"),
        (ev(workflow_id="a\x00b"), "invalid_field", "control"),
        (ev(workflow_id="a\nb"), "invalid_field", "control"),
        (ev(workflow_id="a\tb"), "invalid_field", "control"),
        (ev(workflow_id="a\x1fb"), "invalid_field", "control"),
        (ev(workflow_id="a\x7fb"), "invalid_field", "control"),
        (ev(workflow_id="a\x85b"), "invalid_field", "control"),
        # type
        (ev(type=DROP), "missing_field", "type"),
        (ev(type=None), "missing_field", "type"),
        (ev(type=""), "invalid_field", "type"),
        (ev(type=7), "invalid_field", "type"),
        (ev(type="a..b"), "invalid_field", "type"),
        (ev(type=".a"), "invalid_field", "type"),
        (ev(type="a."), "invalid_field", "type"),
        (ev(type="a b"), "invalid_field", "type"),
        (ev(type="a/b"), "invalid_field", "type"),
        (ev(type="x" * 129), "invalid_field", "type"),
        (ev(type="workflow.Running"), "invalid_field", "state"),
        (ev(type="workflow.2go"), "invalid_field", "state"),
        # id
        (ev(id=""), "invalid_field", "id"),
        (ev(id="i" * 129), "invalid_field", "id"),
        (ev(id=12), "invalid_field", "id"),
        (ev(id="a\x01"), "invalid_field", "control"),
        # seq
        (ev(seq=0), "invalid_field", "seq"),
        (ev(seq=-1), "invalid_field", "seq"),
        (ev(seq=True), "invalid_field", "seq"),
        (ev(seq=False), "invalid_field", "seq"),
        (ev(seq=1.0), "invalid_field", "seq"),
        (ev(seq="1"), "invalid_field", "seq"),
        (ev(seq=MAX_SEQ + 1), "invalid_field", "seq"),
        # ts
        (ev(ts=-1), "invalid_field", "ts"),
        (ev(ts=True), "invalid_field", "ts"),
        (ev(ts=1.5), "invalid_field", "ts"),
        (ev(ts="2025-01-01"), "invalid_field", "ts"),
        # tenant / parent_id / task_id
        (ev(tenant=""), "invalid_field", "tenant"),
        (ev(tenant="t" * 129), "invalid_field", "tenant"),
        (ev(tenant=1), "invalid_field", "tenant"),
        (ev(parent_id=1), "invalid_field", "parent_id"),
        (ev(parent_id="p\x00"), "invalid_field", "control"),
        (ev("task.running", task_id=DROP), "missing_field", "task_id"),
        (ev("task.completed", task_id=None), "missing_field", "task_id"),
        (ev("task.progress", task_id=DROP), "missing_field", "task_id"),
        (ev(type="task.custom.thing"), "missing_field", "task_id"),
        (ev("task.running", task_id=""), "invalid_field", "task_id"),
        (ev("task.running", task_id="t" * 257), "invalid_field", "task_id"),
        (ev("task.running", task_id=3), "invalid_field", "task_id"),
        # state
        (ev(state="Running"), "invalid_field", "state"),
        (ev(state=""), "invalid_field", "state"),
        (ev(state=5), "invalid_field", "state"),
        (ev(state="s" * 65), "invalid_field", "state"),
        # progress
        (ev("task.progress", progress=DROP), "missing_field", "progress"),
        (ev("task.progress", progress=None), "missing_field", "progress"),
        (ev("task.progress", progress=-0.1), "invalid_field", "progress"),
        (ev("task.progress", progress=100.01), "invalid_field", "progress"),
        (ev("task.progress", progress=101), "invalid_field", "progress"),
        (ev("task.progress", progress=True), "invalid_field", "progress"),
        (ev("task.progress", progress="50"), "invalid_field", "progress"),
        # level
        (ev("log", level=DROP), "missing_field", "level"),
        (ev("log", level="warn"), "invalid_field", "level"),
        (ev("log", level="INFO"), "invalid_field", "level"),
        (ev("log", level=30), "invalid_field", "level"),
        (ev(level="loud"), "invalid_field", "level"),
        # message
        (ev(message=5), "invalid_field", "message"),
        (ev(message=["a"]), "invalid_field", "message"),
        (ev(message={"a": 1}), "invalid_field", "message"),
        # unknown fields
        (ev(workflowid="wf"), "unknown_field", "workflowid"),
        (ev(extra=None), "unknown_field", "extra"),
        ({"foo": 1}, "unknown_field", "foo"),  # checked before required fields
        # not an object
        (None, "not_object", "object"),
        ([ev()], "not_object", "object"),
        ("wf", "not_object", "object"),
        (3, "not_object", "object"),
    ],
)
def test_invalid_fields(obj: Any, reason: str, detail: str) -> None:
    rej = reject_of(obj)
    assert rej.reason == reason
    assert detail in rej.detail


def test_unknown_field_detail_is_truncated() -> None:
    rej = reject_of(ev(**{"k" * 500: 1}))
    assert rej.reason == "unknown_field"
    assert "k" * 64 + "…" in rej.detail
    assert "k" * 65 not in rej.detail


@pytest.mark.parametrize("level", [["info"], {"info": 1}])
def test_unhashable_level_is_rejected_not_raised(level: Any) -> None:
    # BUG (envelope.py validate, `if level not in LOG_LEVELS`): a JSON list or
    # object as `level` raises TypeError (unhashable) instead of a Reject.
    rej = reject_of(ev("log", level=level))
    assert rej.reason == "invalid_field"


# ------------------------------------------------------------------ kind_of


@pytest.mark.parametrize(
    "etype, kind",
    [
        ("workflow.created", "state"),
        ("workflow.completed", "state"),
        ("workflow.whatever", "state"),
        ("task.running", "state"),
        ("task.cancelled", "state"),
        ("task.progress", "progress"),
        ("log", "log"),
        ("log.line", "event"),
        ("workflow", "event"),
        ("task", "event"),
        ("task.a.b", "event"),
        ("workflow.a.b", "event"),
        ("timer.fired", "event"),
        ("promise.resolved", "event"),
        ("token", "event"),
        ("output", "event"),
        ("tasks.running", "event"),
    ],
)
def test_kind_of(etype: str, kind: str) -> None:
    assert kind_of(etype) == kind


# ------------------------------------------------------------- decode_frame


def reasons(results: list[Any]) -> list[str]:
    return [r.reason if isinstance(r, Reject) else "ok" for r in results]


@pytest.mark.parametrize(
    "frame, expected",
    [
        (b"not json", ["invalid_json"]),
        (b"", ["invalid_json"]),
        (b"{", ["invalid_json"]),
        (b"\xff\xfe{}", ["invalid_json"]),
        (b'{"workflow_id": "\xff", "type": "log"}', ["invalid_json"]),  # not UTF-8
        (b"[1,", ["invalid_json"]),
        (b"5", ["not_object"]),
        (b'"text"', ["not_object"]),
        (b"null", ["not_object"]),
        (b"true", ["not_object"]),
        (b"[]", ["not_object"]),
        (b"[[]]", ["not_object"]),
        (b"{}", ["missing_field"]),
        (orjson.dumps(ev()), ["ok"]),
        (orjson.dumps([ev()]), ["ok"]),
        (
            orjson.dumps([ev(), 5, ev(seq=0), ev(id="x"), [ev()], None, ev(bogus=1)]),
            ["ok", "not_object", "invalid_field", "ok", "not_object", "not_object", "unknown_field"],
        ),
    ],
)
def test_decode_frame(frame: bytes, expected: list[str]) -> None:
    assert reasons(decode_frame(frame, 1 << 20)) == expected


def test_decode_frame_batch_bad_element_does_not_affect_good_ones() -> None:
    good1 = ev(id="a", message="first")
    good2 = ev("log", id="b", message="second")
    out = decode_frame(orjson.dumps([good1, {"workflow_id": "wf"}, good2]), 1 << 20)
    assert isinstance(out[1], Reject) and out[1].reason == "missing_field"
    assert out[0] == validate(good1)
    assert out[2] == validate(good2)


def test_decode_frame_batch_with_unhashable_level_keeps_the_others() -> None:
    # BUG (see test_unhashable_level_is_rejected_not_raised): one bad element
    # makes decode_frame raise TypeError for the whole batch.
    out = decode_frame(orjson.dumps([ev(id="a"), ev("log", level=["x"]), ev(id="b")]), 1 << 20)
    assert reasons(out) == ["ok", "invalid_field", "ok"]


@pytest.mark.parametrize("extra, expected", [(0, ["ok"]), (1, ["too_large"])])
def test_decode_frame_size_limit(extra: int, expected: list[str]) -> None:
    frame = orjson.dumps(ev())
    assert reasons(decode_frame(frame, len(frame) - extra)) == expected


def test_too_large_is_checked_before_parsing() -> None:
    out = decode_frame(b"x" * 11, 10)
    assert reasons(out) == ["too_large"]
    assert "11" in out[0].detail and "10" in out[0].detail
