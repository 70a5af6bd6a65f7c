"""Stream start planning and readers (DESIGN.md §5, §6)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.core.entry import Entry, Message
from broker.core.errors import InvalidArgument
from broker.core.filters import Filter
from broker.core.reader import (
    AT_INDEX,
    NO_CONTENT,
    RESYNC,
    SNAPSHOT,
    MultiReader,
    Start,
    WorkflowReader,
    plan_multi_start,
    plan_workflow_start,
)
from broker.core.state import BrokerState

from .helpers import body, brief, log, mk, progress, send, task, wfe


def five(st: BrokerState, wid: str = "w") -> None:
    send(st, wfe(wid), *[log(wid, message=str(i)) for i in range(4)])


# ------------------------------------------------------- plan_workflow_start


def _pos(start: Start) -> tuple[str, int]:
    return (start.mode, start.index)


@pytest.mark.parametrize(
    "last_event_id, since, expected",
    [
        (None, None, Start(SNAPSHOT)),
        ("abc:2", None, Start(AT_INDEX, 2)),
        ("abc:0", None, Start(AT_INDEX, 0)),
        ("abc:5", None, Start(AT_INDEX, 5)),
        (" abc:3 ", None, Start(AT_INDEX, 3)),
        ("garbage", None, Start(RESYNC)),
        ("abc:", None, Start(RESYNC)),
        ("abc:x", None, Start(RESYNC)),
        ("abc.2", None, Start(RESYNC)),
        ("", None, Start(RESYNC)),
        ("zzz:2", None, Start(RESYNC)),
        ("e:2", None, Start(RESYNC)),
        ("abc:6", None, Start(RESYNC)),
        (None, "2", Start(AT_INDEX, 2)),
        (None, "0", Start(AT_INDEX, 0)),
        (None, "5", Start(AT_INDEX, 5)),
        # Last-Event-ID wins over since
        ("abc:4", "1", Start(AT_INDEX, 4)),
        ("abc:4", "bogus", Start(AT_INDEX, 4)),
        ("abc:4", "99", Start(AT_INDEX, 4)),
        ("bogus", "1", Start(RESYNC)),
    ],
)
def test_plan_workflow_start(last_event_id: str | None, since: str | None, expected: Start) -> None:
    st = mk()
    five(st)
    got = plan_workflow_start(st.get("w"), last_event_id=last_event_id, since=since)
    assert (got.mode, got.index) == (expected.mode, expected.index)


@pytest.mark.parametrize(
    "since, needle",
    [("6", "ahead"), ("x", "since"), ("-1", "since"), ("1.5", "since"), ("", "since"), ("abc:2", "since")],
)
def test_plan_since_invalid(since: str, needle: str) -> None:
    st = mk()
    five(st)
    with pytest.raises(InvalidArgument) as info:
        plan_workflow_start(st.get("w"), since=since)
    assert needle in info.value.message


def test_plan_with_dropped_ring() -> None:
    st = mk(ring_events=3)
    five(st)  # ring holds 3, 4, 5; index of seq 3 is 2
    wf = st.get("w")
    assert wf.oldest_cursor_seq() == 2
    assert _pos(plan_workflow_start(wf, last_event_id="abc:2")) == (AT_INDEX, 2)
    assert _pos(plan_workflow_start(wf, last_event_id="abc:4")) == (AT_INDEX, 4)
    assert plan_workflow_start(wf, last_event_id="abc:1") == Start(RESYNC)
    assert plan_workflow_start(wf, last_event_id="abc:0") == Start(RESYNC)
    assert _pos(plan_workflow_start(wf, since="2")) == (AT_INDEX, 2)
    for since in ("1", "0"):
        with pytest.raises(InvalidArgument) as info:
            plan_workflow_start(wf, since=since)
        assert "oldest available since is 2" in info.value.message


def test_plan_at_terminal() -> None:
    st = mk()
    send(st, wfe(), log(), wfe(etype="workflow.completed"), log())  # seq 4 after terminal
    wf = st.get("w")
    assert wf.terminal_seq == 3
    assert plan_workflow_start(wf, last_event_id="abc:3") == Start(NO_CONTENT)
    assert plan_workflow_start(wf, since="3") == Start(NO_CONTENT)
    assert _pos(plan_workflow_start(wf, last_event_id="abc:2")) == (AT_INDEX, 2)
    assert plan_workflow_start(wf, last_event_id="abc:4") == Start(RESYNC)  # never streamed
    assert plan_workflow_start(wf) == Start(SNAPSHOT)


def test_plan_engine_sequenced() -> None:
    st = mk()
    send(st, wfe(seq=1), log(seq=2), log(seq=3))
    wf = st.get("w")
    assert _pos(plan_workflow_start(wf, last_event_id="e:1")) == (AT_INDEX, 1)
    assert plan_workflow_start(wf, last_event_id="abc:1") == Start(RESYNC)
    assert _pos(plan_workflow_start(wf, since="0")) == (AT_INDEX, 0)


# ------------------------------------------------------------ WorkflowReader


def reader(st: BrokerState, wid: str = "w", flt: Filter | None = None, **plan: Any) -> WorkflowReader:
    coalesce_after = plan.pop("coalesce_after", 256)
    wf = st.get(wid)
    return WorkflowReader(wf, flt or Filter(), plan_workflow_start(wf, **plan), coalesce_after=coalesce_after)


def test_snapshot_first_then_live() -> None:
    st = mk()
    send(st, wfe(), task("t1", "running"))
    r = reader(st)
    (snap,) = r.pull()
    assert isinstance(snap, Message)
    assert body(snap) == st.get("w").snapshot.to_message("snapshot", "abc")
    assert snap.cursor == "abc:2"
    assert snap.sse().startswith(b"id: abc:2\nevent: snapshot\ndata: {")
    assert r.pull() == []
    send(st, task("t1", "progress", progress=50), log())
    items = r.pull()
    assert brief(items) == [("progress", "w", 3), ("log", "w", 4)]
    assert all(isinstance(i, Entry) for i in items)
    assert items[0].sse() == b"id: abc:3\nevent: progress\ndata: " + items[0].body + b"\n\n"
    assert r.pull() == [] and not r.done


def test_end_after_terminal() -> None:
    st = mk()
    send(st, wfe())
    r = reader(st)
    r.pull()
    send(st, log(), wfe(etype="workflow.failed", error="x"), log(), task("t", "running"))
    items = r.pull()
    assert brief(items) == [("log", "w", 2), ("state", "w", 3), ("end", "w", 3)]
    end = items[-1]
    assert body(end) == {"kind": "end", "workflow_id": "w", "epoch": "abc", "seq": 3, "state": "failed"}
    assert end.cursor == "abc:3"
    assert r.done
    send(st, log())
    assert r.pull() == []


def test_end_is_sent_even_when_the_filter_hides_the_terminal_event() -> None:
    st = mk()
    send(st, wfe())
    r = reader(st, flt=Filter.parse({"types": "log"}))
    r.pull()
    send(st, log(), wfe(etype="workflow.completed"))
    assert brief(r.pull()) == [("log", "w", 2), ("end", "w", 3)]
    assert r.done


def test_snapshot_of_terminal_workflow_then_end() -> None:
    st = mk()
    send(st, wfe(), wfe(etype="workflow.completed", result=1), log())
    r = reader(st)
    items = r.pull()
    assert brief(items) == [("snapshot", "w", 2), ("end", "w", 2)]
    assert body(items[0])["state"] == "completed"
    assert r.done and r.pull() == []


def test_no_content_start_is_done() -> None:
    st = mk()
    send(st, wfe(), wfe(etype="workflow.completed"))
    r = reader(st, last_event_id="abc:2")
    assert r.done and r.pull() == []


def test_resume_at_index_has_no_snapshot() -> None:
    st = mk()
    five(st)
    r = reader(st, last_event_id="abc:3")
    assert brief(r.pull()) == [("log", "w", 4), ("log", "w", 5)]
    r = reader(st, since="5")
    assert r.pull() == []
    send(st, log())
    assert brief(r.pull()) == [("log", "w", 6)]


def test_resync_start_sends_resync() -> None:
    st = mk()
    five(st)
    r = reader(st, last_event_id="other:1")
    items = r.pull()
    assert brief(items) == [("resync", "w", 5)]
    send(st, log())
    assert brief(r.pull()) == [("log", "w", 6)]


def test_resume_up_to_terminal() -> None:
    st = mk()
    send(st, wfe(), log(), wfe(etype="workflow.cancelled"), log())
    r = reader(st, since="1")
    assert brief(r.pull()) == [("log", "w", 2), ("state", "w", 3), ("end", "w", 3)]
    assert r.done


def test_fell_off_ring_state_stream_gets_resync() -> None:
    st = mk(ring_events=3)
    send(st, wfe())
    r = reader(st)
    r.pull()
    send(st, *[task("t", s) for s in ("created", "running", "retrying", "running", "completed")])
    items = r.pull()
    assert brief(items) == [("resync", "w", 6)]
    assert body(items[0])["tasks"]["t"]["attempt"] == 2
    send(st, log())
    assert brief(r.pull()) == [("log", "w", 7)]


def test_fell_off_ring_past_terminal_state_stream_gets_resync_and_end() -> None:
    st = mk(ring_events=2)
    send(st, wfe())
    r = reader(st)
    r.pull()
    send(st, log(), wfe(etype="workflow.completed"), log(), log(), log())
    assert brief(r.pull()) == [("resync", "w", 3), ("end", "w", 3)]
    assert r.done


@pytest.mark.parametrize("behind, resync", [(3, False), (4, True)])
def test_coalesce_after(behind: int, resync: bool) -> None:
    st = mk()
    send(st, wfe())
    r = reader(st, coalesce_after=3)
    r.pull()
    send(st, *[log() for _ in range(behind)])
    kinds = [b[0] for b in brief(r.pull())]
    assert kinds == (["resync"] if resync else ["log"] * behind)


def test_fell_off_ring_log_stream_gets_gap_with_dropped_count() -> None:
    st = mk(ring_events=3)
    send(st, wfe())
    r = reader(st, flt=Filter(view="logs"))
    r.pull()
    # five log lines: two fall off the ring, three are skipped in it
    send(st, *[log(message=str(i)) for i in range(5)])
    (gap,) = r.pull()
    b = body(gap)
    assert (b["kind"], b["to"], b["seq"], b["dropped"]) == ("gap", 6, 6, 5)
    assert gap.cursor == "abc:6"
    send(st, log(message="live"))
    assert [body(i)["message"] for i in r.pull()] == ["live"]


def test_log_stream_gap_counts_only_lines_of_its_view() -> None:
    st = mk()
    send(st, wfe())
    r = reader(st, flt=Filter.parse({"level": "warning"}, view="logs"), coalesce_after=2)
    r.pull()
    send(st, log(level="warning"), task("t", "running"), log(level="debug"), log(level="error"))
    (gap,) = r.pull()
    assert body(gap)["dropped"] == 2


def test_log_stream_gap_starts_after_what_was_delivered() -> None:
    # BUG (reader.py WorkflowReader._skip_ahead): `from` is the seq of the
    # ring's first entry, not of the first entry the reader skipped. Here the
    # reader already received seqs 1-3 and is skipped over 4-8, yet the gap
    # says from=1 ("events the subscriber will not get" includes 1-3).
    st = mk()
    send(st, wfe())
    r = reader(st, flt=Filter(view="logs"), coalesce_after=3)
    r.pull()
    send(st, log(), log())
    assert brief(r.pull()) == [("log", "w", 2), ("log", "w", 3)]
    send(st, *[log() for _ in range(5)])
    (gap,) = r.pull()
    b = body(gap)
    assert (b["from"], b["to"], b["dropped"]) == (4, 8, 5)


def test_log_stream_off_the_ring_past_terminal_gets_end() -> None:
    # BUG (reader.py WorkflowReader._skip_ahead): the terminal event is looked
    # for only among entries still in the ring. When after-terminal events
    # have pushed it out, the log reader gets a gap with from=6 > to=4 and no
    # `end`, and never becomes done (the stream stays open forever).
    st = mk(ring_events=4)
    send(st, wfe())
    r = reader(st, flt=Filter(view="logs"))
    r.pull()
    send(st, log(), log(), wfe(etype="workflow.completed"), *[log() for _ in range(5)])
    items = r.pull()
    assert [body(i)["kind"] for i in items] == ["gap", "end"]
    gap = body(items[0])
    assert gap["from"] <= gap["to"] == 4
    assert r.done


def test_filters_apply_live_and_set_filter() -> None:
    st = mk()
    send(st, wfe(), task("t1", "created"), task("t2", "created"))
    r = reader(st, flt=Filter.parse({"tasks": "t1"}))
    (snap,) = r.pull()
    assert set(body(snap)["tasks"]) == {"t1"}
    send(st, task("t1", "running"), task("t2", "running"), log(), wfe(etype="workflow.suspended"))
    assert brief(r.pull()) == [("state", "w", 4), ("state", "w", 7)]
    r.set_filter(Filter.parse({"types": "log"}))
    send(st, task("t1", "completed"), log())
    assert brief(r.pull()) == [("log", "w", 9)]


def test_tasks_view() -> None:
    st = mk()
    send(st, wfe())
    r = reader(st, flt=Filter(view="tasks"))
    r.pull()
    send(st, task("t", "running"), log(task_id="t"), task("t", "progress", progress=5), wfe(etype="workflow.suspended"))
    assert brief(r.pull()) == [("state", "w", 2), ("progress", "w", 4)]


def test_reorder_gap_is_delivered() -> None:
    st = mk(reorder_window=0.5)
    send(st, wfe(seq=1))
    r = reader(st, flt=Filter.parse({"types": "state"}))
    r.pull()
    send(st, log(seq=4))
    assert r.pull() == []
    st.tick(1.0)
    items = r.pull()
    assert brief(items) == [("gap", "w", 3)]
    assert (body(items[0])["from"], body(items[0])["dropped"]) == (2, 2)


# --------------------------------------------------------------- MultiReader


def multi(st: BrokerState, flt: Filter | None = None, **kw: Any) -> MultiReader:
    plan = {k: kw.pop(k) for k in ("last_event_id", "since") if k in kw}
    return MultiReader(st, flt or Filter(), plan_multi_start(st, **plan), **kw)


def test_multi_workflows_scope() -> None:
    st = mk()
    send(st, wfe("a"), wfe("b"), wfe("c"))
    r = multi(st, workflows=frozenset({"b", "a", "unknown"}))
    snaps = r.pull()
    assert brief(snaps) == [("snapshot", "a", 1), ("snapshot", "b", 1)]
    assert all(s.journal_cursor == "abc.3" for s in snaps)
    assert snaps[0].sse_multi("abc").startswith(b"id: abc.3\nevent: snapshot\n")
    send(st, log("c"), log("a"), log("b"))
    items = r.pull()
    assert brief(items) == [("log", "a", 2), ("log", "b", 2)]
    assert [i.sse_multi("abc").split(b"\n")[0] for i in items] == [b"id: abc.5", b"id: abc.6"]


def test_multi_snapshots_only_active_workflows() -> None:
    st = mk()
    send(st, wfe("a"), wfe("b"), wfe("a", "workflow.completed"))
    r = multi(st, workflows=frozenset({"a", "b"}))
    assert brief(r.pull()) == [("snapshot", "b", 1)]
    assert not r.done
    send(st, log("a"), wfe("b", "workflow.completed"), log("b"))
    items = r.pull()
    assert brief(items) == [("state", "b", 2), ("end", "b", 2)]
    assert items[-1].journal_cursor == "abc.5"
    assert r.done and r.pull() == []


def test_multi_workflows_done_when_all_ended() -> None:
    st = mk()
    send(st, wfe("a"), wfe("b"))
    r = multi(st, workflows=frozenset({"a", "b"}))
    r.pull()
    send(st, wfe("a", "workflow.completed"), log("a"), log("b"))
    assert brief(r.pull()) == [("state", "a", 2), ("end", "a", 2), ("log", "b", 2)]
    assert not r.done
    send(st, wfe("b", "workflow.failed"))
    assert brief(r.pull()) == [("state", "b", 3), ("end", "b", 3)]
    assert r.done


def test_multi_tenant_scope_never_done() -> None:
    st = mk()
    send(st, wfe("a", tenant="t1"), wfe("b", tenant="t2"), wfe("c", tenant="t1", etype="workflow.completed"))
    r = multi(st, tenant="t1")
    assert brief(r.pull()) == [("snapshot", "a", 1)]
    send(st, wfe("d", tenant="t1"), log("b"), wfe("a", "workflow.completed"), log("d"))
    assert brief(r.pull()) == [("state", "d", 1), ("state", "a", 2), ("end", "a", 2), ("log", "d", 2)]
    send(st, wfe("d", "workflow.completed"))
    assert brief(r.pull()) == [("state", "d", 3), ("end", "d", 3)]
    assert not r.done


def test_multi_parent_scope_includes_later_descendants() -> None:
    st = mk()
    send(st, wfe("root"), wfe("c1", parent_id="root"), wfe("other"))
    r = multi(st, parent="root")
    assert brief(r.pull()) == [("snapshot", "root", 1), ("snapshot", "c1", 1)]
    send(st, wfe("c2", parent_id="root"), wfe("gc", parent_id="c1"), log("other"), log("gc"))
    assert brief(r.pull()) == [("state", "c2", 1), ("state", "gc", 1), ("log", "gc", 2)]
    send(st, wfe("root", "workflow.completed"))
    assert brief(r.pull()) == [("state", "root", 2), ("end", "root", 2)]
    assert not r.done  # descendants still running
    send(st, wfe("c1", "workflow.completed"), wfe("c2", "workflow.completed"))
    assert brief(r.pull()) == [("state", "c1", 2), ("end", "c1", 2), ("state", "c2", 2), ("end", "c2", 2)]
    assert not r.done  # gc still running
    send(st, wfe("gc", "workflow.completed"))
    assert brief(r.pull()) == [("state", "gc", 3), ("end", "gc", 3)]
    assert r.done


def test_multi_journal_cursor_resume() -> None:
    st = mk()
    send(st, wfe("a"), wfe("b"), log("a"), log("b"), log("a"))
    r = multi(st, workflows=frozenset({"a", "b"}), last_event_id="abc.3")
    items = r.pull()
    assert brief(items) == [("log", "b", 2), ("log", "a", 3)]
    assert [i.offset for i in items] == [4, 5]
    r2 = multi(st, workflows=frozenset({"a"}), since="abc.0")
    assert brief(r2.pull()) == [("state", "a", 1), ("log", "a", 2), ("log", "a", 3)]


def test_multi_resume_after_an_earlier_end() -> None:
    st = mk()
    send(st, wfe("a"), wfe("b"), wfe("a", "workflow.completed"))
    r = multi(st, workflows=frozenset({"a", "b"}), last_event_id="abc.3")
    send(st, wfe("b", "workflow.completed"))
    assert brief(r.pull()) == [("state", "b", 2), ("end", "b", 2)]
    assert r.done


def test_multi_resume_after_every_end_is_done() -> None:
    # BUG (reader.py MultiReader): a reader resumed at a journal cursor past
    # the `end` of every workflow in scope never calls _check_done (only the
    # snapshot path and a terminal entry do), so it stays open forever with
    # nothing to send (an EventSource reconnect hangs instead of closing).
    st = mk()
    send(st, wfe("a", "workflow.completed"), wfe("b", "workflow.completed"))
    r = multi(st, workflows=frozenset({"a", "b"}), last_event_id="abc.2")
    assert r.pull() == []
    assert r.done


@pytest.mark.parametrize("cursor", ["abc.1", "zzz.3", "garbage", "abc.99", "abc:3"])
def test_multi_stale_or_bad_last_event_id_resyncs(cursor: str) -> None:
    st = mk(journal_events=3)
    send(st, wfe("a"), wfe("b"), log("a"), log("b"), log("a"))  # journal holds offsets 3..5
    assert plan_multi_start(st, last_event_id=cursor) == Start(RESYNC)
    r = multi(st, workflows=frozenset({"a", "b"}), last_event_id=cursor)
    items = r.pull()
    assert brief(items) == [("resync", "a", 3), ("resync", "b", 2)]
    send(st, log("b"))
    assert brief(r.pull()) == [("log", "b", 3)]


@pytest.mark.parametrize(
    "last_event_id, since, expected",
    [
        (None, None, Start(SNAPSHOT)),
        ("abc.2", None, Start(AT_INDEX, 2)),
        ("abc.5", None, Start(AT_INDEX, 5)),
        (None, "abc.2", Start(AT_INDEX, 2)),
        ("abc.4", "bogus", Start(AT_INDEX, 4)),
        ("bogus", "abc.4", Start(RESYNC)),
    ],
)
def test_plan_multi_start(last_event_id: str | None, since: str | None, expected: Start) -> None:
    st = mk(journal_events=3)
    send(st, wfe("a"), wfe("b"), log("a"), log("b"), log("a"))
    assert plan_multi_start(st, last_event_id=last_event_id, since=since) == expected


@pytest.mark.parametrize("since", ["abc.1", "abc.6", "zzz.3", "3", "abc:3", ""])
def test_plan_multi_start_errors(since: str) -> None:
    st = mk(journal_events=3)
    send(st, wfe("a"), wfe("b"), log("a"), log("b"), log("a"))
    with pytest.raises(InvalidArgument) as info:
        plan_multi_start(st, since=since)
    assert "abc.2..abc.5" in info.value.message


@pytest.mark.parametrize(
    "scopes",
    [{}, {"workflows": frozenset({"a"}), "tenant": "t"}, {"tenant": "t", "parent": "p"}],
)
def test_multi_needs_exactly_one_scope(scopes: dict[str, Any]) -> None:
    st = mk()
    with pytest.raises(InvalidArgument):
        MultiReader(st, Filter(), Start(SNAPSHOT), **scopes)


def test_multi_far_behind_gets_resync() -> None:
    st = mk()
    send(st, wfe("a"), wfe("b"))
    r = multi(st, tenant="default", coalesce_after=1)
    r.pull()
    send(st, log("a"), log("a"), log("b"), log("a"))
    assert brief(r.pull()) == [("log", "a", 2), ("log", "a", 3), ("log", "b", 2), ("log", "a", 4)]
    send(st, *[log("a") for _ in range(5)])
    assert brief(r.pull()) == [("resync", "a", 9), ("resync", "b", 2)]


def test_multi_filter_and_after_terminal() -> None:
    st = mk()
    send(st, wfe("a"))
    r = multi(st, Filter.parse({"types": "log"}), workflows=frozenset({"a"}))
    r.pull()
    send(st, log("a"), task("t", "running", "a"), wfe("a", "workflow.completed"), log("a"))
    assert brief(r.pull()) == [("log", "a", 2), ("end", "a", 4)]
    assert r.done


def test_resume_replays_far_back_cursor_in_full_then_coalesces_live() -> None:
    st = mk()
    send(st, wfe(), *[log() for _ in range(9)])
    r = reader(st, since="1", coalesce_after=3)
    assert [b[2] for b in brief(r.pull())] == list(range(2, 11))
    send(st, log(), log(), log())
    assert [b[2] for b in brief(r.pull())] == [11, 12, 13]
    send(st, *[log() for _ in range(4)])
    assert brief(r.pull()) == [("resync", "w", 17)]


def test_multi_resume_replays_far_back_cursor_in_full() -> None:
    st = mk()
    send(st, wfe("a"), *[log("a") for _ in range(9)])
    r = multi(st, workflows=frozenset({"a"}), since="abc.1", coalesce_after=1)
    assert [b[2] for b in brief(r.pull())] == list(range(2, 11))
    send(st, *[log("a") for _ in range(5)])
    assert brief(r.pull()) == [("resync", "a", 15)]


# ------------------------------------------------------------- coalescing (§6)


def test_progress_of_one_task_in_one_write_is_coalesced_to_the_latest() -> None:
    st = mk()
    send(st, wfe())
    wf = st.get("w")
    r = WorkflowReader(wf, Filter(), plan_workflow_start(wf))
    r.pull()
    send(
        st,
        progress("a", 10),
        progress("b", 5),
        task("a", "running"),
        progress("a", 20),
        progress("b", 50),
        progress("a", 30),
    )
    got = [(orjson.loads(i.body)["kind"], orjson.loads(i.body).get("progress")) for i in r.pull()]
    # a's 10 and 20 and b's 5 are merged away; order of what stays is kept.
    assert got == [("state", None), ("progress", 50), ("progress", 30)]
    assert r.coalesced == 3
    # Separate writes are not merged.
    send(st, progress("a", 40))
    assert [orjson.loads(i.body)["progress"] for i in r.pull()] == [40]
    send(st, progress("a", 41))
    assert [orjson.loads(i.body)["progress"] for i in r.pull()] == [41]


def test_coalesce_true_keeps_only_the_latest_state_per_task() -> None:
    st = mk()
    send(st, wfe())
    wf = st.get("w")
    plain = WorkflowReader(wf, Filter(), plan_workflow_start(wf))
    merged = WorkflowReader(wf, Filter.parse({"coalesce": "true"}), plan_workflow_start(wf))
    plain.pull(), merged.pull()
    send(
        st,
        task("a", "scheduled"),
        task("a", "running"),
        task("b", "running"),
        task("a", "completed"),
        wfe(etype="workflow.suspended"),
        wfe(etype="workflow.resumed"),
    )
    kinds = lambda items: [(orjson.loads(i.body).get("task_id"), orjson.loads(i.body)["state"]) for i in items]  # noqa: E731
    assert kinds(plain.pull()) == [
        ("a", "scheduled"),
        ("a", "running"),
        ("b", "running"),
        ("a", "completed"),
        (None, "suspended"),
        (None, "resumed"),
    ]
    # Workflow-level state changes are never merged: only task states are.
    assert kinds(merged.pull()) == [("b", "running"), ("a", "completed"), (None, "suspended"), (None, "resumed")]
    assert merged.coalesced == 2


def test_multi_reader_coalesces_per_workflow_and_task() -> None:
    st = mk()
    send(st, wfe("w1"), wfe("w2"))
    r = MultiReader(st, Filter(), plan_multi_start(st), tenant="default")
    r.pull()
    send(st, progress("t", 1, "w1"), progress("t", 2, "w2"), progress("t", 3, "w1"))
    got = [(orjson.loads(i.body)["workflow_id"], orjson.loads(i.body)["progress"]) for i in r.pull()]
    assert got == [("w2", 2), ("w1", 3)]


# ----------------- MultiReader: resync ends, log gaps, tenant streams, done


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


def test_multi_log_stream_falling_behind_ends_each_workflow_that_ended_in_the_skipped_stretch() -> None:
    """As a resync does: a workflow that ended while the log stream was
    behind gets its `end` after its gap, and `workflows=` then ends."""
    st = mk()
    send(st, wfe("a"))
    r = MultiReader(st, Filter.parse({"types": "log"}), Start(SNAPSHOT), workflows=frozenset({"a"}), coalesce_after=2)
    r.pull()
    _busy(r, st, log("a", message="first"))
    send(st, *[log("a", message=f"m{i}") for i in range(10)], wfe("a", "workflow.completed"))
    out = [body(m) for m in r.pull()]
    assert [m["kind"] for m in out] == ["gap", "end"], out
    assert out[0]["dropped"] == 10 and out[1]["state"] == "completed"
    assert r.done


def test_tenant_log_stream_falling_behind_gives_no_gap_for_a_workflow_it_saw_end() -> None:
    """A workflow that started after the stream opened and ended with
    every line delivered gets nothing more when the stream later falls
    behind on another workflow."""
    st = mk()
    send(st, wfe("other"))
    r = MultiReader(st, Filter.parse({"types": "log"}), Start(SNAPSHOT), tenant="default", coalesce_after=2)
    r.pull()
    send(st, wfe("x"), log("x", message="one"), log("x", message="two"), wfe("x", "workflow.completed"))
    assert [body(m)["kind"] for m in r.pull()] == ["log", "log", "end"]
    _busy(r, st, log("other", message="first"))
    send(st, *[log("other", message=f"m{i}") for i in range(10)])
    out = [body(m) for m in r.pull()]
    assert [(m["kind"], m["workflow_id"]) for m in out] == [("gap", "other")], out


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


# -------------------------------------------------- ancestry after eviction


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
    assert st.evicted_ancestry["mid"] == ("default", ("root",))
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


# ------------------------------------------- idle readers take bursts whole


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
