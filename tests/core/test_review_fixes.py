"""Regression tests for the review fixes (synchronous: core, config).

Each test here failed before the fix it covers: payload depth limit, config
bounds, the ring releasing dropped entries, the journal byte bound, batch and
task caps, broker ids that skip engine ids, multi-stream resync ends and log
gaps, tenant streams without an `ended` set, `done` at once, ancestry kept
for `parent=` streams, and idle readers taking a burst whole.
"""

from __future__ import annotations

import gc
import math
import weakref
from typing import Any

import orjson
import pytest

from broker.config import ConfigError, from_mapping
from broker.core.entry import Entry, Message
from broker.core.envelope import decode_frame, validate
from broker.core.errors import Reject
from broker.core.filters import Filter
from broker.core.reader import SNAPSHOT, MultiReader, Start, WorkflowReader
from broker.core.ring import Ring
from broker.core.state import BrokerState, IngestResult
from broker.server.hub import limits_from_config

from .helpers import body, log, mk, send, task, wfe

MAX_NUMBER = 2**31 - 1  # config numbers are C ints
MAX_BATCH = 10000  # events in one frame
REJECTS_KEPT_PER_FRAME = 10  # rejects of one frame listed in the recent rejects


def brief(items: list[Entry | Message]) -> list[tuple[str, str, int]]:
    """(kind, workflow, seq) of each item."""
    return [(b["kind"], b["workflow_id"], b["seq"]) for b in map(body, items)]


def nested(depth: int) -> Any:
    """A JSON value `depth` containers deep (dicts and lists alternating)."""
    value: Any = "leaf"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


def nested_json(depth: int) -> bytes:
    """JSON text of `nested(depth)`, built by hand: orjson encodes only ~254 levels."""
    text = b'"leaf"'
    for i in range(depth):
        text = b'{"k":' + text + b"}" if i % 2 else b"[" + text + b"]"
    return text


def frame_with(ev: dict[str, Any], key: str, depth: int) -> bytes:
    """One event's JSON with `key` set to a value `depth` containers deep."""
    return orjson.dumps(ev)[:-1] + b',"' + key.encode() + b'":' + nested_json(depth) + b"}"


def reasons(r: IngestResult) -> list[str]:
    return [rej.reason for _, rej in r.rejected]


# ------------------------------------------------------------ 1. payload depth


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
    r = st.ingest_frame(frame_with(wfe(), key, depth), 0.0)
    assert reasons(r) == ["invalid_field"] and r.accepted == 0
    assert st.get("w") is None


def test_deep_event_in_a_batch_rejects_only_itself() -> None:
    st = mk()
    frame = b"[%s,%s,%s]" % (
        orjson.dumps(wfe("a")),
        frame_with(wfe("b"), "data", 300),
        frame_with(wfe("c"), "data", 64),
    )
    r = st.ingest_frame(frame, 0.0)
    assert r.accepted == 2
    assert [(i, rej.reason) for i, rej in r.rejected] == [(1, "invalid_field")]
    assert st.get("b") is None and st.get("c") is not None


# ----------------------------------------------------------- 2. config bounds


BAD_MAPPINGS = [
    ("nan duration", {"stream": {"unknown_workflow_wait": math.nan}}, "stream.unknown_workflow_wait"),
    ("inf duration", {"buffer": {"terminal_ttl": math.inf}}, "buffer.terminal_ttl"),
    ("nan keepalive", {"stream": {"keepalive": math.nan}}, "stream.keepalive"),
    ("nan nonneg", {"order": {"reorder_window_ms": math.nan}}, "order.reorder_window_ms"),
    ("inf top-level", {"shutdown_timeout": math.inf}, "shutdown_timeout"),
    ("backlog over int32", {"http": {"backlog": MAX_NUMBER + 1}}, "http.backlog"),
    ("rcvhwm over int32", {"ingest": {"rcvhwm": 2**31}}, "ingest.rcvhwm"),
    ("huge duration", {"stream": {"ws_pong_timeout": 1e300}}, "stream.ws_pong_timeout"),
    ("zero keepalive", {"stream": {"keepalive": 0}}, "stream.keepalive"),
    ("zero slow_consumer_timeout", {"stream": {"slow_consumer_timeout": 0}}, "stream.slow_consumer_timeout"),
    ("zero ws_ping_interval", {"stream": {"ws_ping_interval": 0.0}}, "stream.ws_ping_interval"),
    ("empty top-level key", {"": 1}, "''"),
    ("empty top-level table", {"": {"shutdown_timeout": 1}}, "''"),
    ("peer pub not a string", {"cluster": {"peers": [{"pub": 5}]}}, "cluster.peers[0]"),
    (
        "peer replay not a string",
        {"cluster": {"peers": [{"pub": "tcp://a:1"}, {"pub": "tcp://b:1", "replay": 7}]}},
        "cluster.peers[1]",
    ),
    ("peer pub empty", {"cluster": {"peers": [{"pub": ""}]}}, "cluster.peers[0]"),
]


@pytest.mark.parametrize("mapping, needle", [c[1:] for c in BAD_MAPPINGS], ids=[c[0] for c in BAD_MAPPINGS])
def test_config_rejects_out_of_range_values(mapping: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(mapping)
    text = str(info.value)
    assert "\n" not in text
    assert f"config key '{needle}" in text or needle in text, text


def test_config_accepts_the_boundaries() -> None:
    cfg = from_mapping(
        {
            "http": {"backlog": MAX_NUMBER},
            "ingest": {"rcvhwm": MAX_NUMBER},
            "stream": {"keepalive": 0.001, "unknown_workflow_wait": 0, "ws_ping_interval": 0.5},
            "order": {"reorder_window_ms": 0},
            "cluster": {"peers": [{"pub": "tcp://a:1", "replay": "tcp://a:2"}, {"pub": "tcp://b:1"}]},
            "buffer": {"journal_bytes": 12345, "max_tasks": 7},
            "shutdown_timeout": 0,
        }
    )
    assert cfg.http.backlog == MAX_NUMBER and cfg.stream.keepalive == 0.001
    limits = limits_from_config(cfg)
    assert limits.journal_bytes == 12345 and limits.max_tasks == 7


# ------------------------------------------------------ 3. ring releases drops


class Item:
    """A weakref-able stand-in for an Entry (Entry has __slots__, no __weakref__)."""

    def __init__(self, seq: int, size: int = 1) -> None:
        self.seq = seq
        self.size = size


def _alive(refs: list[weakref.ref[Item]]) -> list[int]:
    gc.collect()
    return [item.seq for r in refs if (item := r()) is not None]


def test_ring_releases_entries_it_drops_by_count() -> None:
    ring: Ring[Item] = Ring(max_events=2)
    refs = []
    for seq in range(1, 11):
        item = Item(seq)
        refs.append(weakref.ref(item))
        ring.append(item)
    del item
    assert _alive(refs) == [9, 10]
    assert [i.seq for i in ring] == [9, 10] and ring.first_index == 8 and ring.at(9).seq == 10


def test_ring_releases_entries_it_drops_by_bytes() -> None:
    ring: Ring[Item] = Ring(max_events=100, max_bytes=30)
    refs = []
    for seq in range(1, 11):
        item = Item(seq, size=10)
        refs.append(weakref.ref(item))
        ring.append(item)
    del item
    assert _alive(refs) == [8, 9, 10]
    assert ring.bytes == 30


def test_ring_still_compacts_and_indexes_after_many_drops() -> None:
    ring: Ring[Item] = Ring(max_events=3)
    refs = []
    for seq in range(1, 5001):
        item = Item(seq)
        refs.append(weakref.ref(item))
        ring.append(item)
    del item
    assert _alive(refs) == [4998, 4999, 5000]
    assert len(ring) == 3 and ring.first_index == 4997 and ring.next_index == 5000
    assert [i.seq for i in ring.entries_from(4998)] == [4999, 5000]
    assert ring.index_after_seq(4998) == 4998 and ring.first().seq == 4998 and ring.last().seq == 5000


# ------------------------------------------------------- 4. journal byte bound


def test_journal_is_bounded_by_bytes_and_a_multi_reader_behind_it_resyncs() -> None:
    st = mk(journal_bytes=20_000)
    send(st, wfe())
    r = MultiReader(st, Filter(), Start(SNAPSHOT), workflows=frozenset({"w"}))
    assert brief(r.pull()) == [("snapshot", "w", 1)]
    send(st, *[{"workflow_id": "w", "type": "tick", "data": "x" * 1000} for _ in range(20)])
    journal = st.journal
    assert journal.bytes <= 20_000
    assert journal.first_index > 0 and len(journal) < 10, (journal.first_index, len(journal))
    assert len(st.get("w").ring) == 21  # the workflow's ring keeps them: only the journal is small
    out = r.pull()
    assert brief(out) == [("resync", "w", 21)]


# ------------------------------------------------------------ 5. batch limits


def test_batch_of_more_than_10000_events_is_one_too_large_reject() -> None:
    st = mk()
    events = [{"workflow_id": "w", "type": "tick"}] * (MAX_BATCH + 1)
    r = st.ingest_frame(orjson.dumps(events), 0.0)
    assert r.accepted == 0
    assert [(i, rej.reason) for i, rej in r.rejected] == [(0, "too_large")]
    assert st.counters["rejected"] == 1 and st.rejected_by_reason == {"too_large": 1}
    assert st.get("w") is None
    assert len(decode_frame(orjson.dumps(events[:MAX_BATCH]), 1 << 20)) == MAX_BATCH


def test_batch_of_exactly_10000_events_is_accepted() -> None:
    st = mk()
    r = st.ingest_frame(orjson.dumps([{"workflow_id": "w", "type": "tick"}] * MAX_BATCH), 0.0)
    assert r.accepted == MAX_BATCH and r.rejected == []


def test_many_bad_events_in_one_frame_are_all_counted_but_few_are_listed() -> None:
    st = mk()
    batch: list[Any] = []
    for i in range(30):
        if i % 6 == 5:
            batch.append(wfe(f"ok{i}"))  # 5 good events
        elif i % 2:
            batch.append(5)  # not_object
        else:
            batch.append({"workflow_id": f"x{i}"})  # missing_field (type)
    r = st.ingest_frame(orjson.dumps(batch), 0.0)
    assert r.accepted == 5 and len(r.rejected) == 25
    assert st.counters["rejected"] == 25
    assert sum(st.rejected_by_reason.values()) == 25
    assert st.rejected_by_reason == {
        "not_object": sum(1 for x in batch if x == 5),
        "missing_field": sum(1 for x in batch if isinstance(x, dict) and "type" not in x),
    }
    bad_indexes = [i for i, _ in r.rejected]
    assert [x["index"] for x in st.rejects] == bad_indexes[:REJECTS_KEPT_PER_FRAME]
    # The cap is per frame: the next frame lists its own first ten.
    r2 = st.ingest_frame(orjson.dumps([7] * 15), 0.0)
    assert len(r2.rejected) == 15
    assert st.counters["rejected"] == 40 and st.rejected_by_reason["not_object"] == 15 + batch.count(5)
    assert len(st.rejects) == 2 * REJECTS_KEPT_PER_FRAME


# ---------------------------------------------------------------- 6. max_tasks


def test_max_tasks_refuses_a_new_task_but_known_tasks_still_pass() -> None:
    st = mk(max_tasks=3)
    send(st, wfe(), *[task(f"t{i}", "running") for i in range(3)])
    r = st.ingest_frame(orjson.dumps(task("t3", "running")), 0.0)
    assert reasons(r) == ["too_many_tasks"]
    assert "max_tasks" in r.rejected[0][1].detail
    # A log naming a new task is refused too; one without a task passes.
    r = st.ingest_frame(orjson.dumps(log(task_id="t4", message="m")), 0.0)
    assert reasons(r) == ["too_many_tasks"]
    send(st, task("t1", "completed"), task("t0", "progress", progress=50), log(task_id="t2"), log())
    batch = st.ingest_frame(orjson.dumps([task("t9", "running"), task("t2", "completed")]), 0.0)
    assert batch.accepted == 1 and [(i, rej.reason) for i, rej in batch.rejected] == [(0, "too_many_tasks")]
    snap = st.get("w").snapshot
    assert sorted(snap.tasks) == ["t0", "t1", "t2"]
    assert snap.tasks["t1"].state == "completed" and snap.tasks["t2"].state == "completed"
    # The cap is per workflow.
    send(st, wfe("other"), *[task(f"t{i}", "running", wid="other") for i in range(3)])
    assert st.rejected_by_reason["too_many_tasks"] == 3


# ---------------------------------------------- 7. broker ids skip engine ids


def test_broker_generated_ids_skip_ids_an_engine_already_used() -> None:
    st = mk()
    r = st.ingest_frame(orjson.dumps(wfe(id="n1-1")), 0.0)
    assert r.accepted == 1
    r = st.ingest_frame(orjson.dumps(log(message="no id")), 0.0)
    assert r.accepted == 1 and r.duplicates == 0
    send(st, log(id="n1-3"), log(message="no id either"))
    ids = [body(e)["id"] for e in st.get("w").ring]
    assert ids[0] == "n1-1" and ids[2] == "n1-3"
    assert len(set(ids)) == len(ids) == 4, ids
    assert ids[1] != "n1-1" and ids[3] not in ("n1-1", "n1-3")
    # An engine resending the broker-assigned id is a duplicate, as any reused id is.
    again = st.ingest_frame(orjson.dumps(log(id=ids[1])), 0.0)
    assert again.duplicates == 1


# ---------------------------------------------------------- 8. MultiReader


def _busy(r: MultiReader | WorkflowReader, st: BrokerState, ev: dict[str, Any]) -> None:
    """Make `r` mid-write: its last pull returned something."""
    send(st, ev)
    assert r.pull(), "expected the event"


def test_multi_resync_includes_final_state_and_end_of_a_workflow_that_ended_meanwhile() -> None:
    st = mk()
    send(st, wfe("a"), wfe("b"))
    r = MultiReader(st, Filter(), Start(SNAPSHOT), workflows=frozenset({"a", "b"}), coalesce_after=2)
    assert brief(r.pull()) == [("snapshot", "a", 1), ("snapshot", "b", 1)]
    _busy(r, st, log("a", message="one"))
    # More than 4 * coalesce_after = 8 entries pile up; b fails in the middle.
    send(st, *[log("a", message=str(i)) for i in range(5)])
    send(st, wfe("b", "workflow.failed", error={"why": "boom"}))
    send(st, *[log("a", message=str(i)) for i in range(5, 10)])
    out = r.pull()
    assert brief(out) == [("resync", "a", 12), ("resync", "b", 2), ("end", "b", 2)], brief(out)
    assert body(out[1])["state"] == "failed" and body(out[1])["error"] == {"why": "boom"}
    assert body(out[2])["state"] == "failed"
    assert not r.done
    # A later resync does not repeat b's end.
    _busy(r, st, log("a", message="again"))
    send(st, *[log("a", message=str(i)) for i in range(10)])
    assert brief(r.pull()) == [("resync", "a", 23)]
    send(st, wfe("a", "workflow.completed"))
    assert brief(r.pull()) == [("state", "a", 24), ("end", "a", 24)]
    assert r.done


def test_multi_resync_on_a_parent_stream_ends_a_child_that_ended_meanwhile() -> None:
    st = mk()
    send(st, wfe("root"), wfe("kid", parent_id="root"))
    r = MultiReader(st, Filter(), Start(SNAPSHOT), parent="root", coalesce_after=1)
    assert sorted(brief(r.pull())) == [("snapshot", "kid", 1), ("snapshot", "root", 1)]
    _busy(r, st, log("root"))
    send(st, *[log("root") for _ in range(3)], wfe("kid", "workflow.completed"), log("root"))
    assert brief(r.pull()) == [("resync", "root", 6), ("resync", "kid", 2), ("end", "kid", 2)]


def test_multi_log_stream_falling_behind_gets_gaps_per_workflow_not_resync() -> None:
    st = mk()
    send(st, wfe("a"), wfe("b"))
    flt = Filter.parse({"types": "log", "level": "warning"})
    r = MultiReader(st, flt, Start(SNAPSHOT), workflows=frozenset({"a", "b"}), coalesce_after=2)
    r.pull()
    _busy(r, st, log("a", "warning", message="first"))  # a seq 2
    send(st, *[log("a", "warning", message=f"w{i}") for i in range(6)])  # a seq 3..8
    send(st, *[log("a", "info", message=f"i{i}") for i in range(4)])  # a seq 9..12: below the level
    send(st, task("t1", "running", wid="a"))  # a seq 13: not a log
    send(st, *[log("b", "error", message=f"e{i}") for i in range(3)])  # b seq 2..4
    send(st, *[log("b", "debug", message=f"d{i}") for i in range(2)])  # b seq 5..6
    out = r.pull()
    msgs = [body(m) for m in out]
    assert [m["kind"] for m in msgs] == ["gap", "gap"], msgs
    by_wf = {m["workflow_id"]: m for m in msgs}
    # As on single-workflow log streams, a gap runs to the workflow's head:
    # the stream resumes after it.
    assert by_wf["a"]["dropped"] == 6 and (by_wf["a"]["from"], by_wf["a"]["to"]) == (3, 13)
    assert by_wf["b"]["dropped"] == 3 and (by_wf["b"]["from"], by_wf["b"]["to"]) == (2, 6)
    assert r.counters["gaps"] == 1 and r.counters["resyncs"] == 0
    # It then carries on with the lines that follow.
    send(st, log("b", "critical", message="next"))
    assert [body(e)["message"] for e in r.pull()] == ["next"]


def test_multi_log_stream_that_fell_off_the_journal_counts_only_matching_lines_of_its_scope() -> None:
    """Falling off the journal is falling behind too: the gaps must still
    count only the skipped lines that the stream would have delivered."""
    st = mk(journal_events=50)
    send(st, wfe("a"), wfe("z"))
    flt = Filter.parse({"types": "log", "level": "error"})
    r = MultiReader(st, flt, Start(SNAPSHOT), workflows=frozenset({"a"}), coalesce_after=2)
    r.pull()
    _busy(r, st, log("a", "error", message="first"))
    send(st, *[log("a", "error", message=f"e{i}") for i in range(3)])  # 3 lines the stream wanted
    send(st, *[log("a", "info", message=f"i{i}") for i in range(2)])  # below its level
    send(st, *[log("z", "error", message=str(i)) for i in range(200)])  # another workflow: out of scope
    assert st.journal.first_index > r.index  # the reader's place is gone from the journal
    gaps = [body(m) for m in r.pull()]
    assert gaps and all(g["kind"] == "gap" for g in gaps), gaps
    assert sum(g["dropped"] for g in gaps) == 3, gaps


def test_tenant_stream_keeps_no_ended_set() -> None:
    st = mk()
    r = MultiReader(st, Filter(), Start(SNAPSHOT), tenant="t")
    assert r.pull() == []
    ends = 0
    for i in range(200):
        send(st, wfe(f"w{i}", tenant="t"), wfe(f"w{i}", "workflow.completed"))
        ends += sum(1 for b in map(body, r.pull()) if b["kind"] == "end")
    assert ends == 200
    assert len(r.ended) == 0, f"tenant reader remembers {len(r.ended)} ended workflows"
    assert not r.done


def test_tenant_stream_delivers_a_workflow_id_reused_after_its_eviction() -> None:
    st = mk(terminal_ttl=5)
    r = MultiReader(st, Filter(), Start(SNAPSHOT), tenant="t")
    assert r.pull() == []
    send(st, wfe("x", tenant="t"), wfe("x", "workflow.completed"))
    assert brief(r.pull()) == [("state", "x", 1), ("state", "x", 2), ("end", "x", 2)]
    st.tick(10.0)
    assert "x" not in st.workflows
    send(st, wfe("x", tenant="t"), log("x", message="second life"), now=11.0)
    assert brief(r.pull()) == [("state", "x", 1), ("log", "x", 2)]
    send(st, wfe("x", "workflow.cancelled"), now=11.0)
    assert brief(r.pull()) == [("state", "x", 3), ("end", "x", 3)]


def test_multi_reader_is_done_at_once_when_its_whole_scope_has_ended() -> None:
    st = mk()
    send(st, wfe("a"), wfe("a", "workflow.completed"), wfe("b"), wfe("b", "workflow.failed"), wfe("c"))
    r = MultiReader(st, Filter(), Start(SNAPSHOT), workflows=frozenset({"a", "b"}))
    assert r.done
    assert r.pull() == []
    # Not done while one of them is still running.
    assert not MultiReader(st, Filter(), Start(SNAPSHOT), workflows=frozenset({"a", "c"})).done
    send(st, wfe("root"), wfe("kid", parent_id="root"), wfe("kid", "workflow.completed"))
    send(st, wfe("root", "workflow.completed"))
    assert MultiReader(st, Filter(), Start(SNAPSHOT), parent="root").done


# -------------------------------------------------- 9. ancestry after eviction


def test_parent_stream_gets_a_grandchild_started_after_the_middle_workflow_was_evicted() -> None:
    st = mk(terminal_ttl=5)
    send(st, wfe("root"), wfe("mid", parent_id="root"))
    r = MultiReader(st, Filter(), Start(SNAPSHOT), parent="root")
    assert sorted(brief(r.pull())) == [("snapshot", "mid", 1), ("snapshot", "root", 1)]
    send(st, wfe("mid", "workflow.completed"))
    assert brief(r.pull()) == [("state", "mid", 2), ("end", "mid", 2)]
    st.tick(10.0)
    assert "mid" not in st.workflows and "root" in st.workflows
    send(st, wfe("grand", parent_id="mid"), log("grand", message="hello"), now=11.0)
    assert brief(r.pull()) == [("state", "grand", 1), ("log", "grand", 2)]
    # A stream opened now sees it in its snapshots too.
    late = MultiReader(st, Filter(), Start(SNAPSHOT), parent="root")
    assert sorted(brief(late.pull())) == [("snapshot", "grand", 2), ("snapshot", "root", 1)]
    assert st.evicted_ancestry["mid"] == ("root",)
    assert st.workflows["grand"].ancestors == ("mid", "root")
    assert not r.done
    send(st, wfe("grand", "workflow.completed"), wfe("root", "workflow.completed"), now=12.0)
    assert brief(r.pull()) == [("state", "grand", 3), ("end", "grand", 3), ("state", "root", 2), ("end", "root", 2)]
    assert r.done


def test_parent_stream_includes_a_grandchild_that_arrived_before_its_parent() -> None:
    """Ancestry fixed when a workflow is adopted must not lose a subtree whose
    middle workflow appears after its child (events of different workflows
    are not ordered). Before the fix the parent chain was walked at read time."""
    st = mk()
    send(st, wfe("top"))
    r = MultiReader(st, Filter(), Start(SNAPSHOT), parent="top")
    r.pull()
    send(st, wfe("kid", parent_id="mid"))  # "mid" is not known yet
    send(st, wfe("mid", parent_id="top"))
    send(st, log("kid", message="hi"))
    got = brief(r.pull())
    assert ("state", "mid", 1) in got
    assert ("log", "kid", 2) in got, got
    late = MultiReader(st, Filter(), Start(SNAPSHOT), parent="top")
    assert ("snapshot", "kid", 2) in brief(late.pull())


# ------------------------------------------------- 10. idle readers take bursts


@pytest.mark.parametrize("view", ["logs", "all"])
def test_idle_workflow_reader_takes_a_burst_larger_than_coalesce_after_whole(view: str) -> None:
    st = mk()
    send(st, wfe())
    r = WorkflowReader(st.get("w"), Filter(view=view), Start(SNAPSHOT), coalesce_after=256)
    assert brief(r.pull()) == [("snapshot", "w", 1)]
    assert r.pull() == []  # caught up
    send(st, *[log(message=str(i)) for i in range(300)])
    out = r.pull()
    assert [b["kind"] for b in map(body, out)] == ["log"] * 300
    assert [b["message"] for b in map(body, out)] == [str(i) for i in range(300)]
    assert r.counters["gaps"] == 0 and r.counters["resyncs"] == 0


@pytest.mark.parametrize("view, skip", [("logs", "gap"), ("all", "resync")])
def test_busy_workflow_reader_falling_behind_coalesce_after_skips_ahead(view: str, skip: str) -> None:
    st = mk()
    send(st, wfe())
    r = WorkflowReader(st.get("w"), Filter(view=view), Start(SNAPSHOT), coalesce_after=256)
    r.pull()
    assert r.pull() == []
    _busy(r, st, log(message="first"))
    send(st, *[log(message=str(i)) for i in range(300)])
    out = r.pull()
    assert [b["kind"] for b in map(body, out)] == [skip]
    if skip == "gap":
        assert body(out[0])["dropped"] == 300
    # Caught up again: the next burst comes whole.
    assert r.pull() == []
    send(st, *[log(message=str(i)) for i in range(300)])
    assert len(r.pull()) == 300


@pytest.mark.parametrize("types", [None, "log"])
def test_idle_multi_reader_takes_a_burst_larger_than_4x_coalesce_after_whole(types: str | None) -> None:
    st = mk()
    send(st, wfe())
    flt = Filter.parse({"types": types} if types else {})
    r = MultiReader(st, flt, Start(SNAPSHOT), workflows=frozenset({"w"}), coalesce_after=8)
    assert brief(r.pull()) == [("snapshot", "w", 1)]
    assert r.pull() == []
    send(st, *[log(message=str(i)) for i in range(40)])  # 40 > 4 * 8
    out = r.pull()
    assert [b["message"] for b in map(body, out)] == [str(i) for i in range(40)]
    assert r.counters["gaps"] == 0 and r.counters["resyncs"] == 0


@pytest.mark.parametrize("types, skip", [(None, "resync"), ("log", "gap")])
def test_busy_multi_reader_falling_behind_4x_coalesce_after_skips_ahead(types: str | None, skip: str) -> None:
    st = mk()
    send(st, wfe())
    flt = Filter.parse({"types": types} if types else {})
    r = MultiReader(st, flt, Start(SNAPSHOT), workflows=frozenset({"w"}), coalesce_after=8)
    r.pull()
    _busy(r, st, log(message="first"))
    send(st, *[log(message=str(i)) for i in range(40)])
    out = r.pull()
    assert [b["kind"] for b in map(body, out)] == [skip]
    if skip == "gap":
        assert body(out[0])["dropped"] == 40
