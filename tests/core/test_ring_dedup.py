"""Ring (bounded window with absolute indices) and IdWindow (dedup by id)."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import pytest

from broker.core.dedup import IdWindow
from broker.core.ring import Ring


@dataclass
class Item:
    """A stand-in for an Entry, weakref-able (Entry has __slots__, no __weakref__)."""

    seq: int
    size: int = 10


def seqs(ring: Ring[Item]) -> list[int]:
    return [i.seq for i in ring]


# --------------------------------------------------------------------- ring


def test_empty_ring() -> None:
    r: Ring[Item] = Ring(4)
    assert len(r) == 0 and r.first() is None and r.last() is None
    assert r.first_index == r.next_index == r.dropped == r.bytes == 0
    assert r.entries_from(0) == []
    assert r.index_after_seq(0) == 0 and r.index_after_seq(99) == 0


def test_append_returns_absolute_index() -> None:
    r: Ring[Item] = Ring(2)
    assert [r.append(Item(s)) for s in range(1, 6)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "max_events, n, kept, dropped",
    [(3, 2, [1, 2], 0), (3, 3, [1, 2, 3], 0), (3, 5, [3, 4, 5], 2), (1, 4, [4], 3)],
)
def test_bounded_by_events(max_events: int, n: int, kept: list[int], dropped: int) -> None:
    r: Ring[Item] = Ring(max_events)
    for s in range(1, n + 1):
        r.append(Item(s))
    assert seqs(r) == kept
    assert len(r) == len(kept)
    assert r.dropped == r.first_index == dropped
    assert r.next_index == n
    assert r.first().seq == kept[0] and r.last().seq == kept[-1]
    assert r.bytes == 10 * len(kept)


def test_bounded_by_bytes() -> None:
    r: Ring[Item] = Ring(100, max_bytes=100)
    for s in range(1, 4):
        r.append(Item(s, size=40))
    assert seqs(r) == [2, 3] and r.bytes == 80 and r.dropped == 1
    r.append(Item(4, size=90))  # needs both older ones gone
    assert seqs(r) == [4] and r.bytes == 90 and r.dropped == 3


def test_a_single_oversized_entry_is_kept_until_the_next_one() -> None:
    r: Ring[Item] = Ring(100, max_bytes=50)
    r.append(Item(1, size=500))
    assert seqs(r) == [1] and r.bytes == 500
    r.append(Item(2, size=5))
    assert seqs(r) == [2] and r.bytes == 5


def test_whichever_bound_is_hit_first() -> None:
    r: Ring[Item] = Ring(3, max_bytes=1000)
    for s in range(1, 6):
        r.append(Item(s, size=10))
    assert seqs(r) == [3, 4, 5]  # events bound
    r2: Ring[Item] = Ring(3, max_bytes=15)
    for s in range(1, 6):
        r2.append(Item(s, size=10))
    assert seqs(r2) == [5]  # bytes bound


def test_index_after_seq_without_drops() -> None:
    r: Ring[Item] = Ring(10)
    for s in (2, 4, 6):
        r.append(Item(s))
    assert [r.index_after_seq(q) for q in range(0, 8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_index_after_seq_and_entries_from_with_drops() -> None:
    r: Ring[Item] = Ring(3)
    for s in range(1, 8):  # indices 0..6, seq = index + 1; ring holds 5, 6, 7
        r.append(Item(s))
    assert r.first_index == 4
    assert r.index_after_seq(4) == 4
    assert r.index_after_seq(5) == 5
    assert r.index_after_seq(7) == 7
    assert r.index_after_seq(1) == 4  # below the ring: the ring's first index
    assert [i.seq for i in r.entries_from(5)] == [6, 7]
    assert [i.seq for i in r.entries_from(7)] == []
    assert [i.seq for i in r.entries_from(0)] == [5, 6, 7]  # clamped


def test_compaction_keeps_contents_correct() -> None:
    r: Ring[Item] = Ring(7)
    n = 3500
    for s in range(1, n + 1):
        index = r.append(Item(s, size=s % 13 + 1))
        assert index == s - 1
        if s % 97 == 0 or s > n - 10:
            lo = max(1, s - 6)
            assert seqs(r) == list(range(lo, s + 1))
            assert r.first_index == lo - 1 and r.next_index == s
            assert r.first().seq == lo and r.last().seq == s
            assert r.bytes == sum(q % 13 + 1 for q in range(lo, s + 1))
            assert [i.seq for i in r.entries_from(s - 3)] == list(range(s - 2, s + 1))
            assert r.index_after_seq(s - 2) == s - 2
            assert r.index_after_seq(0) == r.first_index
    # the backing list does not grow without bound
    assert len(r._items) <= 2 * 1024 + 7


def test_compaction_with_byte_bound() -> None:
    r: Ring[Item] = Ring(10_000, max_bytes=50)
    for s in range(1, 3201):
        r.append(Item(s, size=10))
    assert seqs(r) == [3196, 3197, 3198, 3199, 3200]
    assert r.dropped == 3195
    assert [i.seq for i in r.entries_from(3198)] == [3199, 3200]
    assert r.index_after_seq(3197) == 3197


# ---------------------------------------------- ring releases what it drops


def _alive(refs: list[weakref.ref[Item]]) -> list[int]:
    gc.collect()
    return [item.seq for r in refs if (item := r()) is not None]


def test_ring_releases_entries_it_drops_by_count() -> None:
    ring: Ring[Item] = Ring(max_events=2)
    refs = []
    for seq in range(1, 11):
        item = Item(seq, size=1)
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
        item = Item(seq, size=1)
        refs.append(weakref.ref(item))
        ring.append(item)
    del item
    assert _alive(refs) == [4998, 4999, 5000]
    assert len(ring) == 3 and ring.first_index == 4997 and ring.next_index == 5000
    assert [i.seq for i in ring.entries_from(4998)] == [4999, 5000]
    assert ring.index_after_seq(4998) == 4998 and ring.first().seq == 4998 and ring.last().seq == 5000


# ------------------------------------------------------------------- dedup


def test_idwindow_max_ids_forgets_oldest_first() -> None:
    w = IdWindow(max_ids=2, max_age=600)
    w.add("a", 0)
    w.add("b", 1)
    assert "a" in w and "b" in w and len(w) == 2
    w.add("c", 2)
    assert "a" not in w and "b" in w and "c" in w and len(w) == 2


@pytest.mark.parametrize(
    "now, remaining",
    [
        (0.0, {"a", "b", "c"}),
        (599.9, {"a", "b", "c"}),
        (600.0, {"b", "c"}),
        (604.9, {"b", "c"}),
        (605.0, {"c"}),
        (610.0, set()),
        (10_000.0, set()),
    ],
)
def test_idwindow_max_age(now: float, remaining: set[str]) -> None:
    w = IdWindow(max_ids=100, max_age=600)
    w.add("a", 0.0)
    w.add("b", 5.0)
    w.add("c", 10.0)
    w.expire(now)
    assert {k for k in "abc" if k in w} == remaining
    assert len(w) == len(remaining)


def test_idwindow_expire_on_empty() -> None:
    w = IdWindow(max_ids=3)
    w.expire(1e9)
    assert len(w) == 0


def test_add_new_keeps_the_bound_and_the_age_order():
    w = IdWindow(max_ids=3, max_age=10.0)
    for i, eid in enumerate(["a", "b", "c", "d"]):
        w.add_new(eid, float(i))
    assert len(w) == 3 and "a" not in w and all(e in w for e in "bcd")
    w.expire(11.5)  # forgets what was added before t = 1.5: b
    assert "b" not in w and "c" in w and "d" in w
