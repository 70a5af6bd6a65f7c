"""Envelope validation (DESIGN.md §2) and frame decoding."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.core.envelope import KNOWN_FIELDS, LOG_LEVELS, MAX_SEQ, decode_frame, kind_of, validate
from broker.core.errors import REJECT_REASONS, Reject
from broker.core.filters import Filter
from broker.core.reader import SNAPSHOT, Start, WorkflowReader

from ..builders import nested, nested_json, with_deep_field
from .helpers import DROP, body, mk, reasons, send, task, valid_event, wfe


def reject_of(obj: Any) -> Reject:
    with pytest.raises(Reject) as info:
        validate(obj)
    assert info.value.reason in REJECT_REASONS
    return info.value


# --------------------------------------------------------------- valid input


@pytest.mark.parametrize(
    "obj, expected",
    [
        (valid_event(), {"workflow_id": "wf-1", "type": "workflow.running", "state": "running", "kind": "state"}),
        (valid_event(workflow_id="x" * 256), {"workflow_id": "x" * 256}),
        (valid_event(workflow_id="é" * 256), {"workflow_id": "é" * 256}),  # characters, not bytes
        (valid_event(workflow_id="a/b:c ü"), {"workflow_id": "a/b:c ü"}),
        (valid_event(type="timer.fired"), {"type": "timer.fired", "kind": "event"}),
        (valid_event(type="token"), {"type": "token", "kind": "event"}),
        (valid_event(type="a-b_c.D9.x"), {"type": "a-b_c.D9.x", "kind": "event"}),
        (valid_event(type="x" * 128), {"type": "x" * 128}),
        (valid_event(id="i" * 128), {"id": "i" * 128}),
        (valid_event(seq=1), {"seq": 1}),
        (valid_event(seq=MAX_SEQ), {"seq": MAX_SEQ}),
        (valid_event(ts=0), {"ts": 0}),
        (valid_event(ts=1763770000123), {"ts": 1763770000123}),
        (valid_event(tenant="acme"), {"tenant": "acme"}),
        (valid_event(tenant="t" * 128), {"tenant": "t" * 128}),
        (valid_event(parent_id="wf-0"), {"parent_id": "wf-0"}),
        (valid_event(task_id="t-9"), {"task_id": "t-9"}),  # task_id allowed on workflow events
        (valid_event("task.running"), {"task_id": "t-1", "state": "running", "kind": "state"}),
        (valid_event("task.running", task_id="t" * 256), {"task_id": "t" * 256}),
        (valid_event("task.progress", progress=0), {"progress": 0, "kind": "progress"}),
        (valid_event("task.progress", progress=100), {"progress": 100}),
        (valid_event("task.progress", progress=42.5), {"progress": 42.5}),
        (valid_event("task.progress", message="half"), {"message": "half"}),
        (valid_event("log", level="debug"), {"level": "debug", "kind": "log"}),
        (valid_event("log", level="critical", message=""), {"level": "critical", "message": ""}),
        (valid_event("workflow.completed", state="custom_state"), {"state": "custom_state"}),
        (valid_event("workflow.anything_new"), {"state": "anything_new", "kind": "state"}),
        (valid_event("task.retrying"), {"state": "retrying"}),
        (valid_event(type="timer.fired", state="waiting"), {"state": "waiting", "kind": "event"}),
        (valid_event(message="hello"), {"message": "hello"}),
        (valid_event(progress=5), {"progress": 5}),  # progress allowed on any type
    ],
)
def test_valid_fields(obj: dict[str, Any], expected: dict[str, Any]) -> None:
    out = validate(obj)
    for key, value in expected.items():
        assert out[key] == value


@pytest.mark.parametrize("level", list(LOG_LEVELS))
def test_every_log_level_is_accepted(level: str) -> None:
    assert validate(valid_event("log", level=level))["level"] == level


@pytest.mark.parametrize("key", ["result", "error", "data"])
@pytest.mark.parametrize("value", [None, 0, 1.5, "s", True, [], [1, "a", None], {}, {"a": {"b": [1, {"c": None}]}}])
def test_result_error_data_take_any_json(key: str, value: Any) -> None:
    out = validate(valid_event("task.completed", **{key: value}))
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
    out = validate(valid_event(id=None, seq=None, tenant=None, ts=None, message=None))
    for key in ("id", "seq", "tenant", "ts", "message"):
        assert key not in out


# ------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "obj, reason, detail",
    [
        # workflow_id
        (valid_event(workflow_id=DROP), "missing_field", "workflow_id"),
        (valid_event(workflow_id=None), "missing_field", "workflow_id"),
        (valid_event(workflow_id=""), "invalid_field", "workflow_id"),
        (valid_event(workflow_id="x" * 257), "invalid_field", "workflow_id"),
        (valid_event(workflow_id=5), "invalid_field", "workflow_id"),
        (valid_event(workflow_id=["wf"]), "invalid_field", "workflow_id"),
        (valid_event(workflow_id="a\x00b"), "invalid_field", "control"),
        (valid_event(workflow_id="a\nb"), "invalid_field", "control"),
        (valid_event(workflow_id="a\tb"), "invalid_field", "control"),
        (valid_event(workflow_id="a\x1fb"), "invalid_field", "control"),
        (valid_event(workflow_id="a\x7fb"), "invalid_field", "control"),
        (valid_event(workflow_id="a\x85b"), "invalid_field", "control"),
        # type
        (valid_event(type=DROP), "missing_field", "type"),
        (valid_event(type=None), "missing_field", "type"),
        (valid_event(type=""), "invalid_field", "type"),
        (valid_event(type=7), "invalid_field", "type"),
        (valid_event(type="a..b"), "invalid_field", "type"),
        (valid_event(type=".a"), "invalid_field", "type"),
        (valid_event(type="a."), "invalid_field", "type"),
        (valid_event(type="a b"), "invalid_field", "type"),
        (valid_event(type="a/b"), "invalid_field", "type"),
        (valid_event(type="x" * 129), "invalid_field", "type"),
        (valid_event(type="workflow.Running"), "invalid_field", "state"),
        (valid_event(type="workflow.2go"), "invalid_field", "state"),
        # id
        (valid_event(id=""), "invalid_field", "id"),
        (valid_event(id="i" * 129), "invalid_field", "id"),
        (valid_event(id=12), "invalid_field", "id"),
        (valid_event(id="a\x01"), "invalid_field", "control"),
        # seq
        (valid_event(seq=0), "invalid_field", "seq"),
        (valid_event(seq=-1), "invalid_field", "seq"),
        (valid_event(seq=True), "invalid_field", "seq"),
        (valid_event(seq=False), "invalid_field", "seq"),
        (valid_event(seq=1.0), "invalid_field", "seq"),
        (valid_event(seq="1"), "invalid_field", "seq"),
        (valid_event(seq=MAX_SEQ + 1), "invalid_field", "seq"),
        # ts
        (valid_event(ts=-1), "invalid_field", "ts"),
        (valid_event(ts=True), "invalid_field", "ts"),
        (valid_event(ts=1.5), "invalid_field", "ts"),
        (valid_event(ts="2025-01-01"), "invalid_field", "ts"),
        # tenant / parent_id / task_id
        (valid_event(tenant=""), "invalid_field", "tenant"),
        (valid_event(tenant="t" * 129), "invalid_field", "tenant"),
        (valid_event(tenant=1), "invalid_field", "tenant"),
        (valid_event(parent_id=1), "invalid_field", "parent_id"),
        (valid_event(parent_id="p\x00"), "invalid_field", "control"),
        (valid_event("task.running", task_id=DROP), "missing_field", "task_id"),
        (valid_event("task.completed", task_id=None), "missing_field", "task_id"),
        (valid_event("task.progress", task_id=DROP), "missing_field", "task_id"),
        (valid_event(type="task.custom.thing"), "missing_field", "task_id"),
        (valid_event("task.running", task_id=""), "invalid_field", "task_id"),
        (valid_event("task.running", task_id="t" * 257), "invalid_field", "task_id"),
        (valid_event("task.running", task_id=3), "invalid_field", "task_id"),
        # state
        (valid_event(state="Running"), "invalid_field", "state"),
        (valid_event(state=""), "invalid_field", "state"),
        (valid_event(state=5), "invalid_field", "state"),
        (valid_event(state="s" * 65), "invalid_field", "state"),
        # progress
        (valid_event("task.progress", progress=DROP), "missing_field", "progress"),
        (valid_event("task.progress", progress=None), "missing_field", "progress"),
        (valid_event("task.progress", progress=-0.1), "invalid_field", "progress"),
        (valid_event("task.progress", progress=100.01), "invalid_field", "progress"),
        (valid_event("task.progress", progress=101), "invalid_field", "progress"),
        (valid_event("task.progress", progress=True), "invalid_field", "progress"),
        (valid_event("task.progress", progress="50"), "invalid_field", "progress"),
        # level
        (valid_event("log", level=DROP), "missing_field", "level"),
        (valid_event("log", level="warn"), "invalid_field", "level"),
        (valid_event("log", level="INFO"), "invalid_field", "level"),
        (valid_event("log", level=30), "invalid_field", "level"),
        (valid_event(level="loud"), "invalid_field", "level"),
        # message
        (valid_event(message=5), "invalid_field", "message"),
        (valid_event(message=["a"]), "invalid_field", "message"),
        (valid_event(message={"a": 1}), "invalid_field", "message"),
        # unknown fields
        (valid_event(workflowid="wf"), "unknown_field", "workflowid"),
        (valid_event(extra=None), "unknown_field", "extra"),
        ({"foo": 1}, "unknown_field", "foo"),  # checked before required fields
        # not an object
        (None, "not_object", "object"),
        ([valid_event()], "not_object", "object"),
        ("wf", "not_object", "object"),
        (3, "not_object", "object"),
    ],
)
def test_invalid_fields(obj: Any, reason: str, detail: str) -> None:
    rej = reject_of(obj)
    assert rej.reason == reason
    assert detail in rej.detail


def test_unknown_field_detail_is_truncated() -> None:
    rej = reject_of(valid_event(**{"k" * 500: 1}))
    assert rej.reason == "unknown_field"
    assert "k" * 64 + "…" in rej.detail
    assert "k" * 65 not in rej.detail


@pytest.mark.parametrize("level", [["info"], {"info": 1}])
def test_unhashable_level_is_rejected_not_raised(level: Any) -> None:
    # BUG (envelope.py validate, `if level not in LOG_LEVELS`): a JSON list or
    # object as `level` raises TypeError (unhashable) instead of a Reject.
    rej = reject_of(valid_event("log", level=level))
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


def decode_reasons(results: list[Any]) -> list[str]:
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
        (orjson.dumps(valid_event()), ["ok"]),
        (orjson.dumps([valid_event()]), ["ok"]),
        (
            orjson.dumps(
                [valid_event(), 5, valid_event(seq=0), valid_event(id="x"), [valid_event()], None, valid_event(bogus=1)]
            ),
            ["ok", "not_object", "invalid_field", "ok", "not_object", "not_object", "unknown_field"],
        ),
    ],
)
def test_decode_frame(frame: bytes, expected: list[str]) -> None:
    assert decode_reasons(decode_frame(frame, 1 << 20)) == expected


def test_decode_frame_batch_bad_element_does_not_affect_good_ones() -> None:
    good1 = valid_event(id="a", message="first")
    good2 = valid_event("log", id="b", message="second")
    out = decode_frame(orjson.dumps([good1, {"workflow_id": "wf"}, good2]), 1 << 20)
    assert isinstance(out[1], Reject) and out[1].reason == "missing_field"
    assert out[0] == validate(good1)
    assert out[2] == validate(good2)


def test_decode_frame_batch_with_unhashable_level_keeps_the_others() -> None:
    # BUG (see test_unhashable_level_is_rejected_not_raised): one bad element
    # makes decode_frame raise TypeError for the whole batch.
    out = decode_frame(
        orjson.dumps([valid_event(id="a"), valid_event("log", level=["x"]), valid_event(id="b")]), 1 << 20
    )
    assert decode_reasons(out) == ["ok", "invalid_field", "ok"]


@pytest.mark.parametrize("extra, expected", [(0, ["ok"]), (1, ["too_large"])])
def test_decode_frame_size_limit(extra: int, expected: list[str]) -> None:
    frame = orjson.dumps(valid_event())
    assert decode_reasons(decode_frame(frame, len(frame) - extra)) == expected


def test_too_large_is_checked_before_parsing() -> None:
    out = decode_frame(b"x" * 11, 10)
    assert decode_reasons(out) == ["too_large"]
    assert "11" in out[0].detail and "10" in out[0].detail


# ------------------------------------------------------------ payload depth


@pytest.mark.parametrize("key", ["data", "result", "error"])
def test_payload_nested_64_levels_is_accepted_and_snapshots_encode(key: str) -> None:
    st = mk()
    send(st, wfe(), task("t1", "failed", **{key: nested(64)}))
    # The snapshot nests the task's payload deeper still: it must encode.
    r = WorkflowReader(st.get("w"), Filter(), Start(SNAPSHOT))
    snap = body(r.pull()[0])
    if key == "data":
        assert body(st.get("w").ring.last())["data"] == nested(64)
    else:
        assert snap["tasks"]["t1"][key] == nested(64)


@pytest.mark.parametrize("key", ["data", "result", "error"])
@pytest.mark.parametrize("depth", [65, 300])
def test_payload_nested_deeper_than_64_levels_is_rejected(key: str, depth: int) -> None:
    assert orjson.loads(nested_json(depth)) == nested(depth)
    with pytest.raises(Reject) as info:
        validate(task("t1", "failed", **{key: nested(depth)}))
    assert info.value.reason == "invalid_field"
    assert key in info.value.detail
    st = mk()
    r = st.ingest_frame(with_deep_field(wfe(), key, depth), 0.0)
    assert reasons(r) == ["invalid_field"] and r.accepted == 0
    assert st.get("w") is None


def test_deep_event_in_a_batch_rejects_only_itself() -> None:
    st = mk()
    frame = b"[%s,%s,%s]" % (
        orjson.dumps(wfe("a")),
        with_deep_field(wfe("b"), "data", 300),
        with_deep_field(wfe("c"), "data", 64),
    )
    r = st.ingest_frame(frame, 0.0)
    assert r.accepted == 2
    assert [(i, rej.reason) for i, rej in r.rejected] == [(1, "invalid_field")]
    assert st.get("b") is None and st.get("c") is not None


def test_checked_types_are_remembered_within_a_bound() -> None:
    """Types are checked once and remembered (a few dozen per engine); a bad
    one is refused every time, and a flood of new types stays bounded."""
    from broker.core import envelope

    for _ in range(2):
        assert reject_of(valid_event(type="workflow.Running")).reason == "invalid_field"
        assert validate(valid_event(type="workflow.running"))["state"] == "running"
    for n in range(envelope._TYPES_MAX + 10):
        validate(valid_event(type=f"custom.t{n}"))
    assert len(envelope._TYPES) <= envelope._TYPES_MAX
    assert validate(valid_event(type="custom.t1"))["kind"] == "event"


def test_names_beyond_ascii_are_checked_in_full() -> None:
    assert validate(valid_event(workflow_id="wf-é-東京"))["workflow_id"] == "wf-é-東京"
    assert "control" in reject_of(valid_event(workflow_id="wf-é\x9f")).detail
