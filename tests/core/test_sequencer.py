"""Sequencer (DESIGN.md §3): broker numbering, engine seq, reorder window, gaps."""

from __future__ import annotations

from typing import Any

import pytest

from broker.core.errors import Reject
from broker.core.sequencer import ENGINE_EPOCH, MAX_PENDING, Duplicate, Release, Sequencer

W = 0.5


def engine() -> Sequencer:
    return Sequencer(engine=True, epoch="ignored", window=W)


def e(seq: int | None = None, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "log", **kw}
    if seq is not None:
        d["seq"] = seq
    return d


def shape(releases: list[Release]) -> list[Any]:
    """Events as their seq, gaps as ("gap", from, to)."""
    return [r.seq if r.event is not None else ("gap", r.gap_from, r.seq) for r in releases]


def offer_all(s: Sequencer, seqs: list[int], now: float = 0.0) -> list[Any]:
    out: list[Any] = []
    for seq in seqs:
        out.extend(shape(s.offer(e(seq), now)))
    return out


# -------------------------------------------------------------- broker mode


def test_broker_mode_numbers_events_in_arrival_order() -> None:
    s = Sequencer(engine=False, epoch="k3f9", window=W)
    assert s.epoch == "k3f9"
    assert s.last_seq == 0
    events = [e(message=str(i)) for i in range(5)]
    for i, ev in enumerate(events, start=1):
        rel = s.offer(ev, now=float(i))
        assert rel == [Release(i, ev)]
        assert rel[0].event is ev
        assert s.last_seq == i
    assert s.pending == {} and s.deadline is None
    assert s.expire(1e9) == []


def test_broker_mode_rejects_seq() -> None:
    s = Sequencer(engine=False, epoch="k3f9", window=W)
    s.offer(e(), 0)
    with pytest.raises(Reject) as info:
        s.offer(e(2), 0)
    assert info.value.reason == "unexpected_seq"
    assert s.last_seq == 1


# -------------------------------------------------------------- engine mode


def test_engine_mode_uses_engine_epoch_and_releases_in_order() -> None:
    s = engine()
    assert s.epoch == ENGINE_EPOCH == "e"
    assert s.last_seq == 0
    for seq in range(1, 6):
        ev = e(seq)
        assert s.offer(ev, 0) == [Release(seq, ev)]
    assert s.last_seq == 5 and s.first_seq == 1
    assert s.deadline is None


def test_engine_mode_rejects_missing_seq() -> None:
    s = engine()
    s.offer(e(1), 0)
    with pytest.raises(Reject) as info:
        s.offer(e(), 0)
    assert info.value.reason == "missing_seq"


@pytest.mark.parametrize("delivered, dup", [([1, 2, 3], 2), ([1, 2, 3], 1), ([1, 2, 3], 3), ([1, 3], 3), ([4], 4)])
def test_engine_duplicate_seq(delivered: list[int], dup: int) -> None:
    s = engine()
    offer_all(s, delivered)
    before = (dict(s.pending), s.next_seq)
    with pytest.raises(Duplicate):
        s.offer(e(dup), 0)
    assert (dict(s.pending), s.next_seq) == before


@pytest.mark.parametrize(
    "order, released_per_offer",
    [
        ([1, 3, 2], [[1], [], [2, 3]]),
        ([1, 4, 3, 2, 5], [[1], [], [], [2, 3, 4], [5]]),
        ([1, 5, 4, 3, 2], [[1], [], [], [], [2, 3, 4, 5]]),
        ([2, 1], [[], [1, 2]]),
        ([3, 2, 1], [[], [], [1, 2, 3]]),
    ],
)
def test_engine_reorder_within_window(order: list[int], released_per_offer: list[list[int]]) -> None:
    s = engine()
    got = [shape(s.offer(e(seq), now=0.1 * i)) for i, seq in enumerate(order)]
    assert got == released_per_offer
    assert s.pending == {} and s.deadline is None
    assert s.expire(100.0) == []


def test_deadline_is_armed_by_the_first_waiting_event() -> None:
    s = engine()
    s.offer(e(1), 10.0)
    assert s.deadline is None
    s.offer(e(3), 10.0)
    assert s.deadline == pytest.approx(10.0 + W)
    s.offer(e(4), 10.3)  # a later arrival does not push the deadline back
    assert s.deadline == pytest.approx(10.0 + W)
    s.offer(e(2), 10.4)  # the hole fills: nothing waits any more
    assert s.deadline is None


def test_expiry_releases_gap_then_drains() -> None:
    s = engine()
    assert offer_all(s, [1, 3, 4]) == [1]
    assert s.expire(W - 0.01) == []
    rel = s.expire(W)
    assert shape(rel) == [("gap", 2, 2), 3, 4]
    assert rel[0] == Release(2, None, 2)
    assert s.next_seq == 5 and s.pending == {} and s.deadline is None
    assert shape(s.offer(e(5), 1.0)) == [5]


def test_expiry_of_wide_gap() -> None:
    s = engine()
    offer_all(s, [1, 10])
    assert shape(s.expire(W)) == [("gap", 2, 9), 10]


def test_late_seq_after_gap_and_duplicate_outside_it() -> None:
    s = engine()
    offer_all(s, [1, 2, 6])
    s.expire(W)
    for seq in (3, 4, 5):
        with pytest.raises(Reject) as info:
            s.offer(e(seq), 1.0)
        assert info.value.reason == "late_seq"
    for seq in (1, 2, 6):
        with pytest.raises(Duplicate):
            s.offer(e(seq), 1.0)


def test_stale_seq_below_first() -> None:
    s = engine()
    assert offer_all(s, [5]) == []
    assert shape(s.expire(W)) == [5]
    assert s.first_seq == 5
    for seq in (1, 4):
        with pytest.raises(Reject) as info:
            s.offer(e(seq), 1.0)
        assert info.value.reason == "stale_seq"
    with pytest.raises(Duplicate):
        s.offer(e(5), 1.0)
    assert shape(s.offer(e(6), 1.0)) == [6]


def test_first_event_above_one_waits_one_window_then_starts_there() -> None:
    s = engine()
    assert s.offer(e(3), 0.0) == []
    assert s.next_seq is None and s.last_seq == 0
    assert s.deadline == pytest.approx(W)
    assert s.expire(W - 0.001) == []
    assert shape(s.expire(W)) == [3]  # no gap before the first seq
    assert s.first_seq == 3 and s.last_seq == 3
    assert shape(s.offer(e(4), 1.0)) == [4]


def test_lower_seq_arriving_in_first_window_becomes_first() -> None:
    s = engine()
    assert offer_all(s, [5, 4]) == []
    assert shape(s.expire(W)) == [4, 5]
    assert s.first_seq == 4


def test_seq_one_arriving_in_first_window_starts_immediately() -> None:
    s = engine()
    assert offer_all(s, [3]) == []
    assert shape(s.offer(e(1), 0.2)) == [1]
    assert s.first_seq == 1
    assert shape(s.offer(e(2), 0.3)) == [2, 3]


def test_duplicate_of_a_waiting_first_event() -> None:
    s = engine()
    offer_all(s, [7])
    with pytest.raises(Duplicate):
        s.offer(e(7), 0.1)


def test_max_pending_overflow_forces_release() -> None:
    s = engine()
    offer_all(s, [1])
    out: list[Any] = []
    for seq in range(3, 3 + MAX_PENDING):  # MAX_PENDING waiting: still fine
        out.extend(shape(s.offer(e(seq), 0.0)))
    assert out == [] and len(s.pending) == MAX_PENDING
    overflow = shape(s.offer(e(3 + MAX_PENDING), 0.0))
    assert overflow == [("gap", 2, 2)] + list(range(3, 4 + MAX_PENDING))
    assert s.pending == {} and s.deadline is None


def test_max_pending_overflow_before_the_sequence_started() -> None:
    s = engine()
    for seq in range(2, 2 + MAX_PENDING):
        assert s.offer(e(seq), 0.0) == []
    out = shape(s.offer(e(2 + MAX_PENDING), 0.0))
    assert out == list(range(2, 3 + MAX_PENDING))
    assert s.first_seq == 2


def test_expire_without_pending_is_a_no_op() -> None:
    s = engine()
    assert s.expire(0.0) == []
    offer_all(s, [1, 2])
    assert s.expire(1e9) == []


def test_one_expiry_releases_every_gap_that_waited_a_full_window() -> None:
    # BUG (sequencer.py expire/_release_oldest): expire() only releases up to
    # the first hole; seq 5 below waited the full window too but is re-armed
    # for another window, so with k holes the last event waits k windows.
    s = engine()
    offer_all(s, [1, 3, 5], now=0.0)
    assert shape(s.expire(W + 1.0)) == [("gap", 2, 2), 3, ("gap", 4, 4), 5]
    assert s.pending == {} and s.deadline is None
