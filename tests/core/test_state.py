"""BrokerState: ingest, dedup, limits, eviction, snapshots, rejects, journal."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from broker.core.envelope import decode_frame
from broker.core.filters import Filter
from broker.core.reader import SNAPSHOT, MultiReader, Start
from broker.core.state import BrokerState, random_epoch

from .helpers import body, brief, ingest, log, mk, reasons, send, task, wfe

MAX_BATCH = 10000  # events in one frame
REJECTS_KEPT_PER_FRAME = 10  # rejects of one frame listed in the recent rejects


def ring_msgs(st: BrokerState, wid: str = "w") -> list[dict[str, Any]]:
    return [orjson.loads(e.body) for e in st.workflows[wid].ring]


# ------------------------------------------------------------------ ingest


def test_random_epoch_shape() -> None:
    for _ in range(50):
        ep = random_epoch()
        assert len(ep) == 6 and ep != "e" and ep.isalnum()


def test_ingest_counters_and_result() -> None:
    st = mk()
    r = ingest(st, wfe(), log(), log("other"), batch=True, now=1.0)
    assert r.accepted == 3 and r.duplicates == 0 and r.rejected == []
    assert r.touched == {"w", "other"} and r.created
    assert st.counters["ingested"] == 3
    assert st.counters["workflows_created"] == 2
    r2 = ingest(st, log(), now=2.0)
    assert r2.accepted == 1 and r2.touched == {"w"} and not r2.created


def test_broker_assigns_ids_and_keeps_given_ones() -> None:
    st = mk()
    ingest(st, wfe(), log(id="mine"), log())
    assert [m["id"] for m in ring_msgs(st)] == ["n1-1", "mine", "n1-2"]


def test_message_body() -> None:
    st = mk()
    ingest(st, task("t1", "completed", id="x", ts=123, tenant="default", result={"rows": 3}), now=5.0)
    (msg,) = ring_msgs(st)
    assert msg == {
        "kind": "state",
        "workflow_id": "w",
        "epoch": "abc",
        "seq": 1,
        "type": "task.completed",
        "id": "x",
        "task_id": "t1",
        "state": "completed",
        "result": {"rows": 3},
        "ts": 123,
        "server_ts": 5000,
    }


def test_ts_defaults_to_server_time() -> None:
    st = mk()
    ingest(st, log(), now=12.3456)
    (msg,) = ring_msgs(st)
    assert msg["ts"] == msg["server_ts"] == 12345


def test_duplicates_by_id() -> None:
    st = mk()
    ingest(st, wfe(id="a"))
    r = ingest(st, log(id="a"), log("other", id="a"))  # ids are global, not per workflow
    assert r.accepted == 0 and r.duplicates == 2 and r.touched == set()
    assert st.counters["duplicates"] == 2
    assert len(st.workflows["w"].ring) == 1
    assert st.get("other") is None


def test_duplicate_within_one_batch() -> None:
    st = mk()
    r = ingest(st, wfe(id="a"), wfe(id="a"), batch=True)
    assert (r.accepted, r.duplicates) == (1, 1)


def test_dedup_window_by_age_via_tick() -> None:
    st = mk()
    ingest(st, wfe(id="a"), now=0.0)
    st.tick(599.0)
    assert ingest(st, log(id="a"), now=599.0).duplicates == 1
    st.tick(600.0)
    assert ingest(st, log(id="a"), now=600.0).accepted == 1


def test_dedup_window_by_count() -> None:
    st = mk(dedup_window=2)
    ingest(st, wfe(id="a"), log(id="b"), log(id="c"))
    assert ingest(st, log(id="a")).accepted == 1
    assert ingest(st, log(id="c")).duplicates == 1


def test_duplicate_engine_seq_with_new_id() -> None:
    st = mk()
    ingest(st, wfe(seq=1, id="a"))
    r = ingest(st, log(seq=1, id="b"))
    assert r.duplicates == 1 and st.counters["duplicates"] == 1
    # the dropped event's id was not remembered
    assert ingest(st, log(seq=2, id="b")).accepted == 1


def test_tenant_fixed_by_first_event() -> None:
    st = mk()
    ingest(st, wfe(tenant="acme"))
    r = ingest(st, log(tenant="other"))
    assert reasons(r) == ["tenant_mismatch"]
    assert ingest(st, log(tenant="acme"), log()).accepted == 2  # no tenant: the workflow's
    assert st.workflows["w"].tenant == "acme"
    assert st.workflows["w"].snapshot.tenant == "acme"
    ingest(st, wfe("d"))
    assert st.workflows["d"].tenant == "default"
    assert reasons(ingest(st, log("d", tenant="acme"))) == ["tenant_mismatch"]


@pytest.mark.parametrize(
    "first, second, reason",
    [(wfe(seq=1), log(), "missing_seq"), (wfe(), log(seq=2), "unexpected_seq")],
)
def test_sequencing_mode_mixing(first: dict[str, Any], second: dict[str, Any], reason: str) -> None:
    st = mk()
    ingest(st, first)
    r = ingest(st, second)
    assert reasons(r) == [reason]
    assert st.rejected_by_reason[reason] == 1
    assert len(st.workflows["w"].ring) == 1


def test_engine_epoch_and_seq_canonical() -> None:
    st = mk()
    ingest(st, wfe(seq=1), log(seq=2))
    wf = st.get("w")
    assert wf.epoch == "e"
    assert [e.cursor for e in wf.ring] == ["e:1", "e:2"]


def test_engine_reorder_gap_via_tick() -> None:
    st = mk(reorder_window=0.5)
    ingest(st, wfe(seq=1), log(seq=3), log(seq=4), now=10.0)
    assert st.reordering == {"w"}
    assert st.next_deadline() == pytest.approx(10.5)
    assert st.tick(10.4).touched == set()
    r = st.tick(10.5)
    assert r.touched == {"w"}
    assert st.reordering == set() and st.next_deadline() is None
    msgs = ring_msgs(st)
    assert [(m["kind"], m["seq"]) for m in msgs] == [("state", 1), ("gap", 2), ("log", 3), ("log", 4)]
    assert msgs[1] == {
        "kind": "gap",
        "workflow_id": "w",
        "epoch": "e",
        "seq": 2,
        "from": 2,
        "to": 2,
        "dropped": 1,
        "server_ts": 10500,
    }
    assert st.counters["gaps"] == 1
    assert reasons(ingest(st, log(seq=2), now=11.0)) == ["late_seq"]
    assert st.get("w").snapshot.seq == 4


def test_engine_workflow_invisible_until_its_first_release() -> None:
    st = mk(reorder_window=0.5)
    r = ingest(st, wfe(seq=5), now=0.0)
    assert r.accepted == 1 and not r.created and r.touched == set()
    assert st.get("w") is None and "w" in st.workflows
    r = st.tick(0.5)
    assert r.created and r.touched == {"w"}
    assert st.get("w").snapshot.seq == 5
    assert reasons(ingest(st, log(seq=4), now=1.0)) == ["stale_seq"]


def test_frame_level_rejects() -> None:
    st = mk(max_frame_bytes=150)
    r = st.ingest_frame(b"{nope", 1.0)
    assert reasons(r) == ["invalid_json"] and r.accepted == 0
    r = st.ingest_frame(orjson.dumps(log(message="x" * 200)), 1.0)
    assert reasons(r) == ["too_large"]
    r = st.ingest_frame(orjson.dumps([wfe(), 5, log(bad=1)]), 1.0)
    assert r.accepted == 1 and r.rejected[0][0] == 1 and r.rejected[1][0] == 2
    assert reasons(r) == ["not_object", "unknown_field"]
    assert st.counters["rejected"] == 4
    assert dict(st.rejected_by_reason) == {"invalid_json": 1, "too_large": 1, "not_object": 1, "unknown_field": 1}


def test_unhashable_level_in_a_batch_does_not_break_ingest() -> None:
    # BUG (envelope.py validate, `level not in LOG_LEVELS`): ingest_frame raises
    # TypeError; the good event before it is already applied but the caller
    # gets no IngestResult, and the good event after it is lost.
    st = mk()
    r = st.ingest_frame(orjson.dumps([wfe(), log(level=["info"]), log()]), 0.0)
    assert r.accepted == 2 and reasons(r) == ["invalid_field"]


# ----------------------------------------------------------------- rejects


def test_rejects_list_is_bounded_and_describes_each_reject() -> None:
    st = mk(rejects_kept=3)
    for i in range(5):
        st.ingest_frame(b'{"workflow_id": "w", "type": "log", "level": "loud", "message": "%d"}' % i, float(i), "http")
    assert len(st.rejects) == 3
    assert [r["ts"] for r in st.rejects] == [2000, 3000, 4000]
    last = st.rejects[-1]
    assert last["reason"] == "invalid_field"
    assert "level" in last["detail"]
    assert last["source"] == "http"
    assert last["index"] == 0
    assert last["sample"].startswith('{"workflow_id": "w"') and '"message": "4"' in last["sample"]
    assert st.counters["rejected"] == 5


def test_reject_sample_is_truncated_and_safe() -> None:
    st = mk()
    st.ingest_frame(b"\xff" + b"x" * 1000, 0.0)
    (rej,) = st.rejects
    assert rej["reason"] == "invalid_json"
    assert len(rej["sample"]) == 256 and rej["sample"][0] == "\ufffd"


# ------------------------------------------------------------------ limits


def test_too_many_workflows() -> None:
    st = mk(max_workflows=2)
    ingest(st, wfe("a"), wfe("b"))
    r = ingest(st, wfe("c"))
    assert reasons(r) == ["too_many_workflows"]
    assert "c" not in st.workflows and st.rejected_by_reason["too_many_workflows"] == 1
    assert ingest(st, log("a")).accepted == 1  # existing workflows still ingest


def test_terminal_workflow_is_evicted_to_make_room() -> None:
    st = mk(max_workflows=2)
    ingest(st, wfe("a"), wfe("b"))
    ingest(st, wfe("a", "workflow.completed"))
    r = ingest(st, wfe("c"))
    assert r.accepted == 1
    assert sorted(st.workflows) == ["b", "c"]
    assert st.counters["workflows_evicted"] == 1


def test_least_recently_updated_terminal_goes_first() -> None:
    st = mk(max_workflows=3)
    ingest(st, wfe("a", "workflow.completed"), now=1.0)
    ingest(st, wfe("b", "workflow.failed"), now=2.0)
    ingest(st, wfe("x"), now=2.5)
    ingest(st, log("a"), now=3.0)  # a is updated after b
    ingest(st, wfe("c"), now=4.0)
    assert sorted(st.workflows) == ["a", "c", "x"]
    ingest(st, wfe("d"), now=5.0)
    assert sorted(st.workflows) == ["c", "d", "x"]
    assert reasons(ingest(st, wfe("e"), now=6.0)) == ["too_many_workflows"]


def test_terminal_ttl_eviction_via_tick() -> None:
    st = mk(terminal_ttl=60.0)
    ingest(st, wfe("p"), wfe("kid", parent_id="p"), now=0.0)
    ingest(st, wfe("kid", "workflow.completed"), now=10.0)
    ingest(st, wfe("active"), now=10.0)
    assert st.subtree == {"p": {"kid"}}
    st.tick(69.9)
    assert "kid" in st.workflows
    st.tick(70.0)
    assert "kid" not in st.workflows and st.subtree == {}
    assert st.counters["workflows_evicted"] == 1
    st.tick(1e9)  # active workflows are never evicted
    assert sorted(st.workflows) == ["active", "p"]


def test_terminal_ttl_counts_from_the_end_not_the_last_update() -> None:
    # BUG (state.py tick): the TTL loop walks `self.terminal` in least-recently
    # *updated* order and stops at the first workflow not yet expired, but the
    # TTL is measured from `terminal_at`. A workflow that ended first but got a
    # later after-terminal event sits behind one that ended later and outlives
    # its TTL (here: a ended at 0, ttl 600, still present at 650).
    st = mk(terminal_ttl=600.0)
    ingest(st, wfe("a", "workflow.completed"), now=0.0)
    ingest(st, wfe("b", "workflow.completed"), now=100.0)
    ingest(st, log("a"), now=200.0)
    st.tick(650.0)
    assert sorted(st.workflows) == ["b"]


# --------------------------------------------------------------- snapshots


def test_snapshot_contents() -> None:
    st = mk()
    ingest(
        st,
        wfe(ts=1000, parent_id="root"),
        task("t1", "created", ts=1100),
        task("t1", "running", ts=1200),
        {"workflow_id": "w", "type": "task.progress", "task_id": "t1", "progress": 40, "message": "40%", "ts": 1250},
        task("t1", "failed", ts=1300, error={"why": "boom"}),
        task("t1", "retrying", ts=1350),
        task("t1", "running", ts=1400),
        task("t1", "completed", ts=1500, result={"rows": 3}),
        task("t2", "scheduled", ts=1600),
        log(ts=1650, message="not a task message"),
        {"workflow_id": "w", "type": "timer.fired", "ts": 1700},
        wfe(etype="workflow.completed", ts=1800, message="done", result=[1, 2]),
        now=9.0,
    )
    wf = st.get("w")
    assert wf.terminal and wf.terminal_seq == 12
    assert wf.snapshot.to_message("snapshot", wf.epoch) == {
        "kind": "snapshot",
        "workflow_id": "w",
        "epoch": "abc",
        "seq": 12,
        "tenant": "default",
        "parent_id": "root",
        "state": "completed",
        "created": 1000,
        "updated": 1800,
        "message": "done",
        "result": [1, 2],
        "error": None,
        "tasks": {
            "t1": {
                "task_id": "t1",
                "state": "completed",
                "progress": 100,
                "attempt": 2,
                "created": 1100,
                "started": 1200,
                "finished": 1500,
                "updated": 1500,
                "message": "40%",
                "result": {"rows": 3},
                "error": None,  # the earlier attempt's error is cleared on completion
            },
            "t2": {
                "task_id": "t2",
                "state": "scheduled",
                "progress": None,
                "attempt": 0,
                "created": 1600,
                "started": None,
                "finished": None,
                "updated": 1600,
                "message": None,
                "result": None,
                "error": None,
            },
        },
    }
    assert wf.snapshot.to_message("resync", wf.epoch, frozenset({"t2"}))["tasks"].keys() == {"t2"}


@pytest.mark.parametrize(
    "states, attempt, finished",
    [
        (["running"], 1, None),
        (["running", "failed"], 1, 20),
        (["running", "retrying", "running"], 2, None),
        (["running", "failed", "running", "failed", "running"], 3, None),
        (["created", "scheduled", "pending", "cancelled"], 0, 40),
    ],
)
def test_task_attempt_counts_running(states: list[str], attempt: int, finished: int | None) -> None:
    st = mk()
    ingest(st, *[task("t", s, ts=10 * (i + 1)) for i, s in enumerate(states)])
    t = st.get("w").snapshot.tasks["t"]
    assert t.attempt == attempt and t.finished == finished and t.state == states[-1]
    assert t.started == (10 * (states.index("running") + 1) if "running" in states else None)


def test_workflow_failed_error_and_default_times() -> None:
    st = mk()
    ingest(st, wfe(), now=1.0)
    ingest(st, wfe(etype="workflow.failed", error={"code": 7}), now=2.0)
    snap = st.get("w").snapshot
    assert (snap.state, snap.error, snap.created, snap.updated) == ("failed", {"code": 7}, 1000, 2000)


def test_events_after_terminal_are_kept_but_not_applied() -> None:
    st = mk()
    ingest(st, wfe(), task("t", "running"), wfe(etype="workflow.cancelled"), now=1.0)
    before = st.get("w").snapshot.to_message("snapshot", "abc")
    r = ingest(st, task("t", "completed"), log(), wfe(etype="workflow.completed"), now=2.0)
    assert r.accepted == 3 and r.touched == {"w"}
    wf = st.get("w")
    assert wf.snapshot.to_message("snapshot", "abc") == before
    assert wf.terminal_seq == 3 and wf.snapshot.seq == 3
    assert [(e.seq, e.terminal, e.after_terminal) for e in wf.ring] == [
        (1, False, False),
        (2, False, False),
        (3, True, False),
        (4, False, True),
        (5, False, True),
        (6, False, True),
    ]
    assert [e.seq for e in st.journal if e.workflow_id == "w"] == [1, 2, 3, 4, 5, 6]
    assert wf.terminal_offset == 3


def test_parent_and_children() -> None:
    st = mk()
    ingest(st, wfe("root"), wfe("c1", parent_id="root"), wfe("c2", parent_id="c1"), wfe("x"))
    assert st.subtree == {"root": {"c1", "c2"}, "c1": {"c2"}}
    assert st.get("c2").ancestors == ("c1", "root")
    assert sorted(w.id for w in st.descendants("root")) == ["c1", "c2"]
    assert st.is_descendant("c2", "root") and st.is_descendant("root", "root")
    assert not st.is_descendant("x", "root")
    assert st.get("c2").snapshot.parent_id == "c1"


def test_grandchild_stays_in_the_subtree_after_its_parent_is_evicted() -> None:
    st = mk(terminal_ttl=1.0)
    ingest(st, wfe("root"), wfe("c1", parent_id="root"), wfe("c1", "workflow.completed"), now=0.0)
    st.tick(5.0)
    assert "c1" not in st.workflows
    # A grandchild that starts now still belongs to root's tree.
    ingest(st, wfe("c2", parent_id="c1"), now=6.0)
    assert st.get("c2").ancestors == ("c1", "root")
    assert {w.id for w in st.descendants("root")} == {"c2"}
    assert st.is_descendant("c2", "root")


def test_ring_bounds_come_from_limits() -> None:
    st = mk(ring_events=3)
    ingest(st, *[log(message=str(i)) for i in range(5)])
    wf = st.get("w")
    assert [e.seq for e in wf.ring] == [3, 4, 5] and wf.ring.dropped == 2
    assert wf.oldest_cursor_seq() == 2


# ------------------------------------------------------------ journal/stats


def test_journal_offsets_in_ingest_order() -> None:
    st = mk()
    ingest(st, wfe("a"), wfe("b"), log("a"), log("b"), log("a"), batch=True)
    assert [(e.offset, e.workflow_id, e.seq) for e in st.journal] == [
        (1, "a", 1),
        (2, "b", 1),
        (3, "a", 2),
        (4, "b", 2),
        (5, "a", 3),
    ]
    assert [e.sse_multi("abc").split(b"\n")[0] for e in st.journal][:2] == [b"id: abc.1", b"id: abc.2"]


def test_journal_is_bounded() -> None:
    st = mk(journal_events=3)
    ingest(st, *[log(message=str(i)) for i in range(5)])
    assert [e.offset for e in st.journal] == [3, 4, 5]
    assert st.journal.first_index == 2 and st.journal.next_index == 5


def test_stats() -> None:
    st = mk(journal_events=3)
    ingest(
        st,
        wfe("a"),
        wfe("b", "workflow.completed"),
        log("a"),
        log("a"),
        log("a", level="nope"),
        log("a", id="dup"),
        log("a", id="dup"),
    )
    st.ingest_frame(b"nope", 0.0)
    stats = st.stats()
    held = sum(wf.ring.bytes for wf in st.workflows.values())
    assert stats.pop("buffer") == {"ring_bytes": held, "total_bytes": st.limits.total_bytes}
    assert stats == {
        "node_id": "n1",
        "node_epoch": "abc",
        "workflows": 2,
        "terminal_workflows": 1,
        "journal": {"first": 3, "head": 5},
        "counters": {"ingested": 5, "workflows_created": 2, "rejected": 2, "duplicates": 1},
        "rejected_by_reason": {"invalid_field": 1, "invalid_json": 1},
    }


# ------------------------------------------------------- journal byte bound


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


# ------------------------------------------------------------- batch limits


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


# ---------------------------------------------------------------- max_tasks


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


# ----------------------------------------------- broker ids skip engine ids


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
