"""A bounded, append-only window over a sequence of entries.

Used twice: as a workflow's ring (bounded by `buffer.ring_events` and
`buffer.ring_bytes`) and as the node journal (bounded by
`buffer.journal_events`). Readers hold an absolute *index* (how many entries
were ever appended before the one they want next), never a copy of entries:
a reader whose index is below `first_index` has fallen off the end.

Pure data structure: no I/O, no clock.
"""

from __future__ import annotations

import bisect
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    size: int
    seq: int


T = TypeVar("T", bound=Sized)

_COMPACT_AT = 1024


class Ring(Generic[T]):
    __slots__ = ("max_events", "max_bytes", "_items", "_head", "first_index", "next_index", "bytes", "dropped_seq")

    def __init__(self, max_events: int, max_bytes: int | None = None) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        # A list with a moving head: O(1) append and drop, O(k) slice of the
        # last k entries, which is what every reader asks for.
        self._items: list[T] = []
        self._head = 0
        self.first_index = 0
        self.next_index = 0
        self.bytes = 0
        self.dropped_seq = 0  # the seq of the last entry dropped (0: none)

    def __len__(self) -> int:
        return len(self._items) - self._head

    @property
    def dropped(self) -> int:
        """How many entries have fallen off the old end."""
        return self.first_index

    def append(self, item: T) -> int:
        """Append; drop the oldest beyond the bounds; return the item's index."""
        index = self.next_index
        items = self._items
        items.append(item)
        self.next_index = index + 1
        self.bytes += item.size
        # Hot path (twice per event: ring and journal): plain arithmetic, no
        # method calls unless something must be dropped.
        max_bytes = self.max_bytes
        while (count := len(items) - self._head) > 1 and (
            count > self.max_events or (max_bytes is not None and self.bytes > max_bytes)
        ):
            self._drop_oldest()
        return index

    def drop_oldest(self) -> None:
        """Drop the oldest entry (there must be one): the memory budget's
        trim (BrokerState), beyond the ring's own bounds."""
        self._drop_oldest()

    def _drop_oldest(self) -> None:
        old = self._items[self._head]
        self.bytes -= old.size
        self.dropped_seq = old.seq
        self._items[self._head] = None  # type: ignore[call-overload]  # release it now, not at compaction
        self._head += 1
        self.first_index += 1
        if self._head >= _COMPACT_AT and self._head * 2 >= len(self._items):
            del self._items[: self._head]
            self._head = 0

    def first(self) -> T | None:
        return self._items[self._head] if len(self) else None

    def last(self) -> T | None:
        return self._items[-1] if len(self) else None

    def at(self, index: int) -> T:
        """The entry with absolute index `index` (first_index <= index < next_index)."""
        if not self.first_index <= index < self.next_index:
            raise IndexError(index)
        return self._items[self._head + index - self.first_index]

    def entries_from(self, index: int) -> list[T]:
        """Entries with absolute index >= `index` (which must be >= first_index)."""
        start = self._head + max(index, self.first_index) - self.first_index
        return self._items[start:]

    def index_after_seq(self, seq: int) -> int:
        """Absolute index of the first entry whose seq is greater than `seq`."""
        pos = bisect.bisect_right(self._items, seq, lo=self._head, key=lambda e: e.seq)
        return self.first_index + pos - self._head

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._items[self._head :])
