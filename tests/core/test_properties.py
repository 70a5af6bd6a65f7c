"""Hypothesis properties of ordering, gaps, resume and incremental reading."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.core.entry import Entry
from broker.core.errors import InvalidArgument
from broker.core.filters import Filter
from broker.core.reader import (
    AT_INDEX,
    NO_CONTENT,
    RESYNC,
    MultiReader,
    WorkflowReader,
    plan_multi_start,
    plan_workflow_start,
)
from broker.core.state import BrokerState, Limits

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WINDOW = 0.5
NOW = 1000.0


def mk(**limits: Any) -> BrokerState:
    return BrokerState("n1", Limits(reorder_window=WINDOW, **limits), make_epoch=lambda: "abc")


def bodies(items: list[Any]) -> list[bytes]:
    return [i.body for i in items]


# ------------------------------------------------ (1) any delivery order, dups


def engine_event(seq: int, n: int, terminal_at: int | None) -> dict[str, Any]:
    ev: dict[str, Any] = {"workflow_id": "wf", "seq": seq, "id": f"ev-{seq}", "ts": 1000 + seq}
    if seq == terminal_at:
        ev["type"] = "workflow.completed"
        ev["result"] = {"n": n}
        return ev
    match seq % 5:
        case 0:
            ev.update(type="task.running", task_id=f"t{seq % 3}")
        case 1:
            ev.update(type="workflow.running" if seq == 1 else "timer.fired", data={"seq": seq})
        case 2:
            ev.update(type="task.progress", task_id=f"t{seq % 3}", progress=seq % 101, message=f"p{seq}")
        case 3:
            ev.update(type="log", level="info", message=f"line {seq}")
        case _:
            ev.update(type="task.completed", task_id=f"t{seq % 3}", result=[seq])
    return ev


@st.composite
def permuted_with_duplicates(draw: st.DrawFn) -> tuple[int, int | None, list[int], list[int]]:
    n = draw(st.integers(1, 30))
    terminal_at = draw(st.one_of(st.none(), st.integers(1, n)))
    extra = draw(st.lists(st.integers(1, n), max_size=n))
    order = draw(st.permutations(list(range(1, n + 1)) + extra))
    chunks = draw(st.lists(st.integers(1, 4), min_size=len(order), max_size=len(order)))
    return n, terminal_at, order, chunks


def deliver(st_: BrokerState, events: list[dict[str, Any]], chunks: list[int], now: float) -> tuple[int, int]:
    accepted = duplicates = 0
    i = 0
    for size in chunks:
        if i >= len(events):
            break
        part = events[i : i + size]
        i += size
        frame = orjson.dumps(part[0] if len(part) == 1 else part)
        r = st_.ingest_frame(frame, now)
        assert r.rejected == []
        accepted += r.accepted
        duplicates += r.duplicates
    return accepted, duplicates


@SETTINGS
@given(permuted_with_duplicates())
def test_any_permutation_with_duplicates_equals_in_order(case: tuple[int, int | None, list[int], list[int]]) -> None:
    n, terminal_at, order, chunks = case
    ref = mk()
    deliver(ref, [engine_event(s, n, terminal_at) for s in range(1, n + 1)], [1] * n, NOW)
    got = mk()
    accepted, duplicates = deliver(got, [engine_event(s, n, terminal_at) for s in order], chunks, NOW)

    assert (accepted, duplicates) == (n, len(order) - n)
    ref_wf, wf = ref.get("wf"), got.get("wf")
    assert [e.seq for e in wf.ring] == list(range(1, n + 1))
    assert bodies(list(wf.ring)) == bodies(list(ref_wf.ring))
    assert [(e.terminal, e.after_terminal) for e in wf.ring] == [(e.terminal, e.after_terminal) for e in ref_wf.ring]
    assert bodies(list(got.journal)) == bodies(list(ref.journal))
    assert wf.snapshot.to_message("snapshot", "e") == ref_wf.snapshot.to_message("snapshot", "e")
    assert got.reordering == set() and wf.seq.pending == {}


# --------------------------------------------------- (2) withheld seqs, gaps


@st.composite
def withheld_case(draw: st.DrawFn) -> tuple[int, list[int], list[int]]:
    n = draw(st.integers(2, 30))
    withheld = draw(st.sets(st.integers(1, n), max_size=n - 1))
    delivered = [s for s in range(1, n + 1) if s not in withheld]
    order = draw(st.permutations(delivered))
    return n, sorted(withheld), order


@SETTINGS
@given(withheld_case())
@example((5, [2, 4], [1, 3, 5]))  # two holes: see the sequencer bug in the report
def test_withheld_seqs_become_gaps_after_one_window(case: tuple[int, list[int], list[int]]) -> None:
    n, withheld, order = case
    s = mk()
    for seq in order:
        r = s.ingest_frame(orjson.dumps(engine_event(seq, n, None)), NOW)
        assert r.accepted == 1
    s.tick(NOW + WINDOW + 1)

    wf = s.get("wf")
    ring = list(wf.ring)
    seqs = [e.seq for e in ring]
    assert seqs == sorted(set(seqs)), "ring seqs strictly increasing"
    events = [e.seq for e in ring if e.kind != "gap"]
    assert events == sorted(order), "every delivered seq exactly once"
    covered: list[int] = []
    for e in ring:
        if e.kind == "gap":
            msg = orjson.loads(e.body)
            assert (msg["from"], msg["to"]) == (e.seq_from, e.seq)
            assert msg["dropped"] == e.seq - e.seq_from + 1
            covered.extend(range(e.seq_from, e.seq + 1))
    lo, hi = min(order), max(order)
    # The sequence starts at the lowest seq seen (documented): holes below it
    # are not gaps; every hole between the lowest and highest delivered is.
    assert covered == [w for w in withheld if lo < w < hi]
    assert s.reordering == set() and wf.seq.pending == {}


# ------------------------------------------------- (3) resume from any cursor


def plain_event(draw: st.DrawFn, wid: str = "wf") -> dict[str, Any]:
    kind = draw(st.sampled_from(["wf", "task", "progress", "log", "event"]))
    tid = draw(st.sampled_from(["t1", "t2", "t3"]))
    ev: dict[str, Any] = {"workflow_id": wid}
    if kind == "wf":
        ev["type"] = "workflow." + draw(st.sampled_from(["running", "suspended", "resumed"]))
    elif kind == "task":
        ev.update(
            type="task." + draw(st.sampled_from(["created", "running", "retrying", "completed", "failed"])), task_id=tid
        )
    elif kind == "progress":
        ev.update(type="task.progress", task_id=tid, progress=draw(st.integers(0, 100)))
    elif kind == "log":
        ev.update(type="log", level=draw(st.sampled_from(["debug", "info", "warning", "error"])))
        if draw(st.booleans()):
            ev["task_id"] = tid
    else:
        ev.update(
            type=draw(st.sampled_from(["timer.fired", "token", "output"])), data=draw(st.integers(-(10**6), 10**6))
        )
    if draw(st.booleans()):
        ev["message"] = draw(st.text(max_size=8))
    return ev


@st.composite
def resume_case(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int]:
    n = draw(st.integers(1, 40))
    events = [plain_event(draw) for _ in range(n)]
    if draw(st.booleans()):
        events[-1] = {
            "workflow_id": "wf",
            "type": "workflow." + draw(st.sampled_from(["completed", "failed", "cancelled"])),
        }
    ring_events = draw(st.one_of(st.just(1024), st.integers(1, 45)))
    return events, ring_events


@pytest.mark.slow
@SETTINGS
@given(resume_case())
def test_resume_from_any_cursor(case: tuple[list[dict[str, Any]], int]) -> None:
    events, ring_events = case
    n = len(events)
    s = mk(ring_events=ring_events)
    for ev in events:
        assert s.ingest_frame(orjson.dumps(ev), NOW).accepted == 1
    wf = s.get("wf")
    terminal = wf.terminal_seq is not None
    oldest = wf.oldest_cursor_seq()
    by_seq = {e.seq: e for e in wf.ring}

    for k in range(0, n + 1):
        for how in ("last_event_id", "since"):
            arg = {"last_event_id": f"abc:{k}"} if how == "last_event_id" else {"since": str(k)}
            if terminal and k == n:
                assert plan_workflow_start(wf, **arg).mode == NO_CONTENT
                continue
            if k < oldest:
                if how == "since":
                    with pytest.raises(InvalidArgument) as info:
                        plan_workflow_start(wf, **arg)
                    assert f"oldest available since is {oldest}" in info.value.message
                else:
                    start = plan_workflow_start(wf, **arg)
                    assert start.mode == RESYNC
                    items = WorkflowReader(wf, Filter(), start).pull()
                    assert orjson.loads(items[0].body)["kind"] == "resync"
                continue
            start = plan_workflow_start(wf, **arg)
            assert start.mode == AT_INDEX
            r = WorkflowReader(wf, Filter(), start)
            items = r.pull()
            entries = [i for i in items if isinstance(i, Entry)]
            # One write: progress of a task is coalesced to its latest (§6).
            suffix = [by_seq[q] for q in range(k + 1, n + 1)]
            last_progress = {e.task_id: e.seq for e in suffix if e.kind == "progress"}
            expected = [e.seq for e in suffix if e.kind != "progress" or last_progress[e.task_id] == e.seq]
            assert [e.seq for e in entries] == expected
            assert all(e is by_seq[e.seq] for e in entries)
            if terminal:
                assert orjson.loads(items[-1].body) == {
                    "kind": "end",
                    "workflow_id": "wf",
                    "epoch": "abc",
                    "seq": n,
                    "state": events[-1]["type"].split(".")[1],
                }
                assert len(items) == len(entries) + 1 and r.done
            else:
                assert len(items) == len(entries) and not r.done
            assert r.pull() == []


# ------------------------------------- (4) many small pulls == one big pull

FILTERS = [
    ({}, "all"),
    ({"types": "state"}, "all"),
    ({"types": "log"}, "all"),
    ({"tasks": "t1"}, "all"),
    ({"states": "terminal"}, "all"),
    ({"level": "warning"}, "logs"),
    ({}, "tasks"),
    ({}, "logs"),
    ({"types": "progress,event", "tasks": "t2,t3"}, "all"),
]


@st.composite
def interleaved_ops(draw: st.DrawFn, wids: tuple[str, ...]) -> tuple[int, list[Any]]:
    flt = draw(st.integers(0, len(FILTERS) - 1))
    ops: list[Any] = []
    for _ in range(draw(st.integers(0, 60))):
        choice = draw(st.integers(0, 9))
        if choice < 3:
            ops.append(("pull",))
        elif choice == 3:
            wid = draw(st.sampled_from(wids))
            state = draw(st.sampled_from(["completed", "failed", "cancelled"]))
            ops.append(("ingest", {"workflow_id": wid, "type": f"workflow.{state}"}))
        else:
            ops.append(("ingest", plain_event(draw, draw(st.sampled_from(wids)))))
    return flt, ops


def latest_progress_only(stream: list[bytes]) -> list[bytes]:
    """Drop every progress message followed later by one of the same task.

    Coalescing (§6) merges progress within one write, so readers that pull in
    different rhythms see different intermediate progress; with only the
    latest progress per task kept, every reader must see the same stream.
    """
    keep: list[bytes] = []
    seen: set[tuple[str, str]] = set()
    for body in reversed(stream):
        msg = orjson.loads(body)
        if msg["kind"] == "progress":
            key = (msg["workflow_id"], msg["task_id"])
            if key in seen:
                continue
            seen.add(key)
        keep.append(body)
    return keep[::-1]


@SETTINGS
@given(interleaved_ops(("wf",)))
def test_small_pulls_equal_one_big_pull_single(case: tuple[int, list[Any]]) -> None:
    flt_i, ops = case
    raw, view = FILTERS[flt_i]
    s = mk()
    s.ingest_frame(orjson.dumps({"workflow_id": "wf", "type": "workflow.running"}), NOW)
    wf = s.get("wf")
    a = WorkflowReader(wf, Filter.parse(raw, view=view), plan_workflow_start(wf))
    b = WorkflowReader(wf, Filter.parse(raw, view=view), plan_workflow_start(wf))
    assert bodies(a.pull()) == bodies(b.pull())  # the same opening snapshot
    got_a: list[bytes] = []
    for op in ops:
        if op[0] == "pull":
            got_a.extend(bodies(a.pull()))
        else:
            s.ingest_frame(orjson.dumps(op[1]), NOW)
    got_a.extend(bodies(a.pull()))
    assert latest_progress_only(got_a) == latest_progress_only(bodies(b.pull()))
    assert a.done == b.done


@SETTINGS
@given(interleaved_ops(("w1", "w2", "w3")))
def test_small_pulls_equal_one_big_pull_multi(case: tuple[int, list[Any]]) -> None:
    flt_i, ops = case
    raw, view = FILTERS[flt_i]
    s = mk()
    s.ingest_frame(orjson.dumps({"workflow_id": "w1", "type": "workflow.running"}), NOW)
    readers = []
    for scope in ({"tenant": "default"}, {"workflows": frozenset({"w1", "w2"})}):
        pair = [MultiReader(s, Filter.parse(raw, view=view), plan_multi_start(s), **scope) for _ in range(2)]
        assert bodies(pair[0].pull()) == bodies(pair[1].pull())
        readers.append(pair)
    got = [[] for _ in readers]
    for op in ops:
        if op[0] == "pull":
            for i, (a, _) in enumerate(readers):
                got[i].extend(bodies(a.pull()))
        else:
            s.ingest_frame(orjson.dumps(op[1]), NOW)
    for i, (a, b) in enumerate(readers):
        got[i].extend(bodies(a.pull()))
        assert latest_progress_only(got[i]) == latest_progress_only(bodies(b.pull()))
        assert a.done == b.done


# ------------------------- (5) a log reader's gaps add up to what it missed


@st.composite
def log_traffic(draw: st.DrawFn) -> tuple[list[Any], int, int, str | None]:
    ops: list[Any] = []
    for _ in range(draw(st.integers(1, 120))):
        choice = draw(st.integers(0, 9))
        if choice < 2:
            ops.append(("pull",))
        elif choice < 3:
            ops.append(("ingest", {"workflow_id": "wf", "type": "task.running", "task_id": "t"}))
        else:
            level = draw(st.sampled_from(["debug", "info", "warning", "error", "critical"]))
            ops.append(("ingest", {"workflow_id": "wf", "type": "log", "level": level}))
    if draw(st.booleans()):
        ops.append(("ingest", {"workflow_id": "wf", "type": "workflow.completed"}))
        ops.append(("ingest", {"workflow_id": "wf", "type": "log", "level": "error"}))  # after the end
    ring_events = draw(st.integers(2, 40))
    coalesce_after = draw(st.integers(1, 30))
    level = draw(st.sampled_from([None, "info", "error"]))
    return ops, ring_events, coalesce_after, level


@SETTINGS
@given(log_traffic())
def test_log_gaps_add_up_to_exactly_what_was_missed(case: tuple[list[Any], int, int, str | None]) -> None:
    ops, ring_events, coalesce_after, level = case
    s = mk(ring_events=ring_events)
    s.ingest_frame(orjson.dumps({"workflow_id": "wf", "type": "workflow.running"}), NOW)
    wf = s.get("wf")
    flt = Filter.parse({"level": level} if level else {}, view="logs")
    r = WorkflowReader(wf, flt, plan_workflow_start(wf), coalesce_after=coalesce_after)
    assert [orjson.loads(i.body)["kind"] for i in r.pull()] == ["snapshot"]  # lines after it count
    got: list[dict[str, Any]] = []
    total = 0
    ended = False
    for op in ops:
        if op[0] == "pull":
            got.extend(orjson.loads(i.body) for i in r.pull())
        else:
            ev = op[1]
            if ev["type"] == "workflow.completed":
                ended = True
            elif (
                ev["type"] == "log"
                and not ended
                and flt.min_level <= {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}[ev["level"]]
            ):
                total += 1
            s.ingest_frame(orjson.dumps(ev), NOW)
    got.extend(orjson.loads(i.body) for i in r.pull())
    delivered = sum(1 for m in got if m["kind"] == "log")
    dropped = sum(m["dropped"] for m in got if m["kind"] == "gap")
    assert delivered + dropped == total
    # Gaps and lines never go backwards, and the stream ends iff the workflow did.
    seqs = [m["seq"] for m in got if m["kind"] in ("log", "gap")]
    assert seqs == sorted(seqs)
    assert r.done == ended
    if ended:
        assert got[-1]["kind"] == "end"
