"""Per-workflow sequencing: one sequence space, epochs, dedup by seq, reorder.

A workflow's first event fixes its mode (DESIGN.md §3):

- engine-sequenced (the event carried `seq`): the engine's seq is canonical.
  Epoch is "e", so cursors survive a broker restart. An event ahead of the
  next expected seq waits in a reorder buffer for up to `reorder_window`
  seconds, then is released anyway behind a `gap` covering what is missing.
  A workflow whose first seen event is not seq 1 waits one window too before
  its sequence starts, so lower seqs arriving out of order are not lost.
- broker-sequenced: the broker numbers events 1, 2, 3… as they arrive, under
  a fresh random epoch (a restart without a store makes a new one, so stale
  cursors are detected).

`offer()` and `expire()` return what is released, in order, as `Release`
items; the caller applies them. Pure: `now` is passed in, no I/O.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from .errors import Reject

ENGINE_EPOCH = "e"
MAX_PENDING = 1024  # events one workflow may hold in its reorder buffer


class Duplicate(Exception):
    """The event was already accepted (same seq); it is dropped and counted."""


class Release(NamedTuple):
    seq: int
    event: dict[str, Any] | None  # None: a gap covering gap_from..seq
    gap_from: int = 0


class Sequencer:
    __slots__ = (
        "engine",
        "epoch",
        "window",
        "first_seq",
        "next_seq",
        "pending",
        "arrived",
        "deadline",
        "gaps",
    )

    def __init__(self, *, engine: bool, epoch: str, window: float) -> None:
        self.engine = engine
        self.epoch = ENGINE_EPOCH if engine else epoch
        self.window = window
        self.first_seq: int | None = None if engine else 1
        self.next_seq: int | None = None if engine else 1
        self.pending: dict[int, dict[str, Any]] = {}
        # seq -> arrival time, in arrival order (so the first is the oldest).
        self.arrived: dict[int, float] = {}
        self.deadline: float | None = None
        # Recent ranges released as gaps, so a straggler from one is reported
        # as late rather than as a duplicate.
        self.gaps: deque[tuple[int, int]] = deque(maxlen=16)

    @property
    def last_seq(self) -> int:
        return 0 if self.next_seq is None else self.next_seq - 1

    def offer(self, event: dict[str, Any], now: float) -> list[Release]:
        seq = event.get("seq")
        if not self.engine:
            if seq is not None:
                raise Reject("unexpected_seq", "workflow is broker-sequenced: events must not carry seq")
            assert self.next_seq is not None
            self.next_seq += 1
            return [Release(self.next_seq - 1, event)]
        if seq is None:
            raise Reject("missing_seq", "workflow is engine-sequenced: every event needs seq")
        if self.next_seq is not None:
            assert self.first_seq is not None
            if seq < self.first_seq:
                raise Reject("stale_seq", f"seq {seq} is older than the workflow's first seq {self.first_seq}")
            if seq < self.next_seq:
                for lo, hi in self.gaps:
                    if lo <= seq <= hi:
                        raise Reject("late_seq", f"seq {seq} arrived after its gap was released")
                raise Duplicate()
        if seq in self.pending:
            raise Duplicate()
        self.pending[seq] = event
        self.arrived[seq] = now
        if self.next_seq is None and seq == 1:
            self.first_seq = self.next_seq = 1
        out = self._drain()
        if len(self.pending) > MAX_PENDING:
            out.extend(self._release_oldest())
        self._arm()
        return out

    def expire(self, now: float) -> list[Release]:
        """Release everything that has waited a full reorder window.

        Events are released in seq order, so an event that waited long enough
        also releases the lower seqs (and gaps) in front of it.
        """
        if self.deadline is None or now < self.deadline:
            return []
        out: list[Release] = []
        horizon = now - self.window
        while self.arrived and next(iter(self.arrived.values())) <= horizon:
            out.extend(self._release_oldest())
        self._arm()
        return out

    def _arm(self) -> None:
        arrived = self.arrived
        self.deadline = next(iter(arrived.values())) + self.window if arrived else None

    def _release_oldest(self) -> list[Release]:
        lowest = min(self.pending)
        out: list[Release] = []
        if self.next_seq is None:
            self.first_seq = self.next_seq = lowest
        elif lowest > self.next_seq:
            out.append(Release(lowest - 1, None, self.next_seq))
            self.gaps.append((self.next_seq, lowest - 1))
            self.next_seq = lowest
        out.extend(self._drain())
        return out

    def _drain(self) -> list[Release]:
        out: list[Release] = []
        nxt = self.next_seq
        if nxt is None:
            return out
        pending = self.pending
        arrived = self.arrived
        while nxt in pending:
            out.append(Release(nxt, pending.pop(nxt)))
            del arrived[nxt]
            nxt += 1
        self.next_seq = nxt
        return out
