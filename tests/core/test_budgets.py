"""The memory budget (`buffer.total_bytes`, core/state.py `_trim`) and the
socket budget (core/limits.py `SocketBudget`, `budget_for`), synchronously."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.errors import InvalidArgument
from broker.core.filters import Filter
from broker.core.limits import FD_RESERVE, PLAIN_HEADROOM, SocketBudget, budget_for
from broker.core.reader import RESYNC, WorkflowReader, plan_workflow_start
from broker.core.state import BrokerState

from .helpers import brief, log, mk, send, task, wfe


def held(state: BrokerState) -> int:
    return sum(wf.ring.bytes for wf in state.workflows.values())


def fill(state: BrokerState, wid: str, n: int, size: int = 200) -> None:
    send(state, *(log(wid, message="x" * size) for _ in range(n)))


# ------------------------------------------------------------ total_bytes


def test_the_rings_together_stay_within_total_bytes_least_recently_updated_trimmed_first() -> None:
    s = mk(total_bytes=20_000)
    for w in ("a", "b", "c"):
        send(s, wfe(w))
        fill(s, w, 10)
    assert held(s) == s.ring_bytes <= 20_000
    # "a" was updated first: its oldest entries went first, "c" is whole.
    a, c = s.workflows["a"].ring, s.workflows["c"].ring
    assert a.dropped > 0 and c.dropped == 0
    assert s.counters["trimmed_events"] == a.dropped + s.workflows["b"].ring.dropped
    assert s.counters["trimmed_bytes"] > 0
    # Updating "a" makes "b" the least recently updated.
    fill(s, "a", 3)
    b_dropped = s.workflows["b"].ring.dropped
    fill(s, "c", 5)
    assert s.workflows["b"].ring.dropped > b_dropped
    assert held(s) == s.ring_bytes <= 20_000


def test_snapshots_survive_a_trimmed_ring_and_readers_resync() -> None:
    s = mk(total_bytes=4_000)
    send(s, wfe("a"), task("t1", "running", wid="a"))
    r = WorkflowReader(s.get("a"), Filter(), plan_workflow_start(s.get("a")), coalesce_after=256)
    r.pull()  # the snapshot
    send(s, wfe("b"))
    fill(s, "b", 30)  # "a" is trimmed to nothing
    wf = s.workflows["a"]
    assert len(wf.ring) == 0 and wf.ring.dropped == 2
    assert wf.snapshot.seq == 2 and "t1" in wf.snapshot.tasks
    # A cursor at the head still resumes (nothing after it was dropped) …
    assert wf.oldest_cursor_seq() == 2
    send(s, task("t1", "completed", wid="a"))
    items = r.pull()
    assert brief(items) == [("state", "a", 3)]
    # … one from before the trim gets a resync, and since= says what is left.
    assert plan_workflow_start(wf, last_event_id="abc:1").mode == RESYNC
    try:
        plan_workflow_start(wf, since=1)
    except InvalidArgument as err:
        assert "oldest available since is" in str(err)
    else:
        raise AssertionError("since=1 must be refused once trimmed")


def test_a_reader_behind_the_trim_gets_a_resync() -> None:
    s = mk(total_bytes=6_000)
    send(s, wfe("a"))
    r = WorkflowReader(s.get("a"), Filter(), plan_workflow_start(s.get("a")), coalesce_after=256)
    r.pull()
    fill(s, "a", 3)  # unread
    send(s, wfe("b"))
    fill(s, "b", 40)  # "a" trimmed below the reader
    kinds = [orjson.loads(it.body)["kind"] for it in r.pull()]
    assert kinds[0] == "resync", kinds


def test_evicted_workflows_leave_the_budget() -> None:
    s = mk(total_bytes=1 << 20, terminal_ttl=1.0)
    send(s, wfe("a"), wfe("a", "workflow.completed"))
    fill(s, "b", 5)
    assert s.ring_bytes == held(s)
    s.tick(10.0)
    assert "a" not in s.workflows and "a" not in s.holding
    assert s.ring_bytes == held(s)


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(min_value=500, max_value=30_000),
    ops=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 900)), min_size=1, max_size=80),
)
def test_budget_invariants_hold_for_any_ingest_order(budget: int, ops: list[tuple[int, int]]) -> None:
    s = mk(total_bytes=budget)
    order: list[str] = []
    for w, size in ops:
        wid = f"w{w}"
        send(s, log(wid, message="y" * size))
        if wid in order:
            order.remove(wid)
        order.append(wid)
        assert s.ring_bytes == held(s)
        # Over the budget only by the entry just added, when it alone is larger.
        assert s.ring_bytes <= budget or (len(s.holding) == 1 and len(s.workflows[wid].ring) == 1)
        assert set(s.holding) == {w for w, wf in s.workflows.items() if len(wf.ring)}
        # Least recently updated first.
        assert list(s.holding) == [w for w in order if w in s.holding]


# ---------------------------------------------------------- socket budget


def test_socket_budget_counts_open_sockets() -> None:
    b = SocketBudget(2)
    assert b.has_room()
    b.opened()
    b.opened()
    assert not b.has_room() and b.peak == 2
    b.closed()
    assert b.has_room() and b.open == 1 and b.peak == 2


def test_budget_for_keeps_limits_global_within_the_open_file_limit() -> None:
    ok = budget_for(100_000, 20_000)
    assert ok.sockets == 100_000 - FD_RESERVE and ok.global_limit == 20_000 and not ok.lowered
    low = budget_for(600, 20_000)
    assert low.sockets == 600 - FD_RESERVE
    assert low.global_limit == 600 - FD_RESERVE - PLAIN_HEADROOM and low.lowered
    assert budget_for(10, 5).global_limit >= 1  # never zero, however small the limit
