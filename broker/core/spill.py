"""The store's queue of accepted entries not yet committed (DESIGN.md §10).

Ingest pushes every entry it releases; the store writer (store/writer.py)
reads a batch from the front with `peek()`, and only once that batch is
committed calls `committed()` to drop it. So an entry leaves the queue only
when it is on disk, and the bound is exact: at most `max_events` entries
and `max_bytes` bytes of bodies wait, whether PostgreSQL is slow, down, or
merely between two flushes. Past the bound the entry is not queued:
`dropped` counts it, and the caller logs (ingest never waits).

Positions are counted from the start: `pushed` entries have ever been
queued (dropped ones excluded), `done` of them are committed. A durable
publish waits until `done` reaches the `pushed` it saw after its own
events went in.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

from .entry import Entry


class SpillQueue:
    __slots__ = ("max_events", "max_bytes", "_items", "bytes", "pushed", "done", "dropped", "peak")

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._items: deque[Entry] = deque()
        self.bytes = 0
        self.pushed = 0
        self.done = 0
        self.dropped = 0
        self.peak = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(self, entry: Entry) -> bool:
        """Queue `entry`; False (counted in `dropped`) past the bound."""
        size = len(entry.body)
        if len(self._items) >= self.max_events or self.bytes + size > self.max_bytes:
            self.dropped += 1
            return False
        self._items.append(entry)
        self.bytes += size
        self.pushed += 1
        if len(self._items) > self.peak:
            self.peak = len(self._items)
        return True

    def peek(self, n: int) -> list[Entry]:
        """The first `n` entries (fewer if fewer wait), still queued."""
        return list(islice(self._items, n))

    def committed(self, n: int) -> None:
        """The first `n` entries are on disk: drop them."""
        items = self._items
        for _ in range(n):
            self.bytes -= len(items.popleft().body)
        self.done += n
