"""The store's spill queue (core/spill.py, DESIGN.md §10): exact bounds in
events and bytes, what is dropped counted, peek/committed in order, the
pushed/done positions a durable publish waits on; BrokerState pushing
every released entry; and random push/peek/commit sequences against a
plain model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core.entry import Entry
from broker.core.spill import SpillQueue
from broker.core.state import BrokerState, Limits

SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

_BASE = len(Entry({"kind": "event", "workflow_id": "w", "epoch": "e", "seq": 1, "d": ""}, tenant="default").body)


def entry(seq: int, size: int = 0, wid: str = "w") -> Entry:
    """An entry whose body is exactly `size` bytes (at least the bare body's)."""
    pad = max(0, size - _BASE - (len(wid) - 1) - (len(str(seq)) - 1))
    e = Entry({"kind": "event", "workflow_id": wid, "epoch": "e", "seq": seq, "d": "x" * pad}, tenant="default")
    assert size <= _BASE or len(e.body) == size, (len(e.body), size)
    return e


def seqs(items: list[Entry]) -> list[int]:
    return [e.seq for e in items]


# ------------------------------------------------------------------ bounds


def test_empty() -> None:
    q = SpillQueue(10, 1000)
    assert len(q) == 0 and q.bytes == q.pushed == q.done == q.dropped == q.peak == 0
    assert q.peek(5) == [] and q.peek(0) == []
    q.committed(0)
    assert q.done == 0


def test_event_bound_is_exact() -> None:
    q = SpillQueue(3, 10**9)
    assert [q.push(entry(s)) for s in (1, 2, 3)] == [True, True, True]
    assert not q.push(entry(4))  # the 4th does not fit …
    assert not q.push(entry(5))
    assert (len(q), q.pushed, q.dropped, q.peak) == (3, 3, 2, 3)
    assert seqs(q.peek(10)) == [1, 2, 3]  # … and the queued ones are untouched
    q.committed(1)
    assert q.push(entry(6))  # one left: one more fits, exactly
    assert not q.push(entry(7))
    assert seqs(q.peek(10)) == [2, 3, 6]
    assert (len(q), q.pushed, q.done, q.dropped, q.peak) == (3, 4, 1, 3, 3)


def test_byte_bound_is_exact() -> None:
    size = 100
    q = SpillQueue(1000, 3 * size)
    assert q.push(entry(1, size)) and q.push(entry(2, size))
    assert not q.push(entry(3, size + 1))  # one byte over
    assert q.bytes == 2 * size and q.dropped == 1
    assert q.push(entry(4, size))  # exactly at the bound: fits
    assert q.bytes == 3 * size
    assert not q.push(entry(5, _BASE))  # nothing more, however small
    assert (len(q), q.pushed, q.dropped) == (3, 3, 2)
    q.committed(2)
    assert q.bytes == size
    assert q.push(entry(6, 2 * size))
    assert q.bytes == 3 * size and seqs(q.peek(9)) == [4, 6]


def test_smaller_entry_fits_after_a_larger_one_was_refused() -> None:
    # Each entry is measured on its own: a refused large one does not
    # block a smaller one that fits (each drop is counted).
    q = SpillQueue(10, 250)
    assert q.push(entry(1, 100))
    assert not q.push(entry(2, 200))
    assert q.push(entry(3, 150))
    assert seqs(q.peek(10)) == [1, 3] and q.dropped == 1 and q.bytes == 250


def test_entry_larger_than_the_byte_bound_is_dropped_even_when_empty() -> None:
    q = SpillQueue(10, 50)
    assert not q.push(entry(1, 100))
    assert (len(q), q.bytes, q.pushed, q.dropped) == (0, 0, 0, 1)


def test_zero_bounds_queue_nothing() -> None:
    q = SpillQueue(0, 10**6)
    assert not q.push(entry(1))
    q = SpillQueue(10, 0)
    assert not q.push(entry(1))
    assert q.dropped == 1 and q.pushed == 0


# --------------------------------------------------------- peek/committed


def test_peek_is_in_order_and_keeps_the_entries() -> None:
    q = SpillQueue(100, 10**6)
    pushed = [entry(s) for s in range(1, 8)]
    for e in pushed:
        q.push(e)
    first = q.peek(3)
    assert first == pushed[:3] and all(a is b for a, b in zip(first, pushed, strict=False))
    assert q.peek(3) == first and len(q) == 7  # peeking twice reads the same batch
    assert q.peek(100) == pushed
    q.committed(3)
    assert q.peek(2) == pushed[3:5]
    assert (q.pushed, q.done, len(q)) == (7, 3, 4)
    q.committed(4)
    assert q.peek(5) == [] and q.bytes == 0 and (q.pushed, q.done) == (7, 7)


def test_peek_returns_a_copy() -> None:
    q = SpillQueue(100, 10**6)
    q.push(entry(1))
    got = q.peek(5)
    got.append(entry(2))
    assert seqs(q.peek(5)) == [1]


def test_positions_for_a_durable_publish() -> None:
    # A publisher notes `pushed` after its events went in and waits until
    # `done` reaches it; a dropped entry moves neither.
    q = SpillQueue(3, 10**6)
    q.push(entry(1))
    q.push(entry(2))
    target = q.pushed
    assert target == 2
    q.push(entry(3))
    q.push(entry(4))  # dropped
    assert q.pushed == 3 and q.dropped == 1
    q.committed(1)
    assert q.done < target
    q.committed(1)
    assert q.done == target
    q.committed(1)
    assert q.done == q.pushed == 3


def test_peak_is_the_most_ever_queued() -> None:
    q = SpillQueue(100, 10**6)
    for s in range(5):
        q.push(entry(s + 1))
    q.committed(4)
    q.push(entry(9))
    assert len(q) == 2 and q.peak == 5


# -------------------------------------------------------- with the state


def mk_state(spill: SpillQueue, **limits: Any) -> BrokerState:
    st_ = BrokerState("n1", Limits(reorder_window=0.5, **limits), make_epoch=lambda: "abc")
    st_.spill = spill
    return st_


def test_state_pushes_every_released_entry_in_journal_order() -> None:
    q = SpillQueue(100, 10**6)
    s = mk_state(q)
    frames = [
        {"workflow_id": "a", "type": "workflow.running"},
        [{"workflow_id": "b", "type": "log", "level": "info", "seq": 2}, {"workflow_id": "a", "type": "x"}],
        {"workflow_id": "b", "type": "x", "seq": 4},
    ]
    for f in frames:
        s.ingest_frame(orjson.dumps(f), 0.0)
    assert [(e.workflow_id, e.seq) for e in q.peek(100)] == [("a", 1), ("a", 2)]  # b waits to be ordered
    s.tick(1.0)  # b's first seq 2 released after the window, then a gap for 3, then 4
    got = q.peek(100)
    assert [(e.workflow_id, e.kind, e.seq) for e in got] == [
        ("a", "state", 1),
        ("a", "event", 2),
        ("b", "log", 2),
        ("b", "gap", 3),
        ("b", "event", 4),
    ]
    assert got == list(s.journal)  # the very entries, in the journal's order
    assert all(x is y for x, y in zip(got, s.journal, strict=True))
    assert q.bytes == sum(len(e.body) for e in got)
    assert "store_dropped" not in s.counters


def test_state_counts_what_the_queue_drops() -> None:
    q = SpillQueue(2, 10**6)
    s = mk_state(q)
    for i in range(5):
        s.ingest_frame(orjson.dumps({"workflow_id": "w", "type": "x", "data": i}), 0.0)
    assert s.counters["store_dropped"] == 3 == q.dropped
    assert seqs(q.peek(9)) == [1, 2]
    assert len(s.workflows["w"].ring) == 5  # streams keep everything: only the store misses it
    q.committed(2)
    s.ingest_frame(orjson.dumps({"workflow_id": "w", "type": "x"}), 0.0)
    assert seqs(q.peek(9)) == [6] and q.pushed == 3 and q.done == 2


def test_state_without_a_spill_queue_queues_nothing() -> None:
    s = BrokerState("n1", Limits())
    assert s.spill is None
    s.ingest_frame(orjson.dumps({"workflow_id": "w", "type": "x"}), 0.0)
    assert "store_dropped" not in s.counters


# ------------------------------------------------- random sequences vs model


@dataclass
class Model:
    max_events: int
    max_bytes: int
    items: list[Entry] = field(default_factory=list)
    pushed: int = 0
    done: int = 0
    dropped: int = 0
    peak: int = 0

    @property
    def bytes(self) -> int:
        return sum(len(e.body) for e in self.items)

    def push(self, e: Entry) -> bool:
        if len(self.items) + 1 > self.max_events or self.bytes + len(e.body) > self.max_bytes:
            self.dropped += 1
            return False
        self.items.append(e)
        self.pushed += 1
        self.peak = max(self.peak, len(self.items))
        return True


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(_BASE, _BASE + 120)),
        st.tuples(st.just("peek"), st.integers(0, 8)),
        st.tuples(st.just("commit"), st.integers(0, 8)),
    ),
    max_size=60,
)


@SETTINGS
@given(st.integers(0, 8), st.integers(0, 600), OPS)
def test_random_push_peek_commit_against_a_model(max_events: int, max_bytes: int, ops: list[tuple[str, int]]) -> None:
    q = SpillQueue(max_events, max_bytes)
    m = Model(max_events, max_bytes)
    batch: list[Entry] = []  # the writer commits only what it peeked
    seq = 0
    for op, n in ops:
        if op == "push":
            seq += 1
            e = entry(seq, n)
            assert q.push(e) == m.push(e)
        elif op == "peek":
            batch = q.peek(n)
            assert batch == m.items[:n]
            assert all(a is b for a, b in zip(batch, m.items, strict=False))
        else:
            k = min(n, len(batch))
            q.committed(k)
            assert m.items[:k] == batch[:k]
            del m.items[:k]
            m.done += k
            batch = []
        assert len(q) == len(m.items) <= max_events
        assert q.bytes == m.bytes <= max_bytes
        assert (q.pushed, q.done, q.dropped, q.peak) == (m.pushed, m.done, m.dropped, m.peak)
        assert q.pushed - q.done == len(q)
        assert q.pushed + q.dropped == seq
    assert q.peek(max_events + 1) == m.items
