"""Duplicate suppression by event id (DESIGN.md §3).

An id is remembered for `max_age` seconds (10 minutes), and at most
`max_ids` ids are remembered (oldest forgotten first): memory stays bounded
by configuration whatever the ingest rate. Pure: `now` is passed in.
"""

from __future__ import annotations

from collections import OrderedDict


class IdWindow:
    __slots__ = ("max_ids", "max_age", "_seen")

    def __init__(self, max_ids: int, max_age: float = 600.0) -> None:
        self.max_ids = max_ids
        self.max_age = max_age
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._seen

    def add(self, event_id: str, now: float) -> None:
        self._seen.pop(event_id, None)  # a re-added id moves to the young end
        self.add_new(event_id, now)

    def add_new(self, event_id: str, now: float) -> None:
        """`add` for an id known not to be in the window (the hot path)."""
        seen = self._seen
        seen[event_id] = now
        if len(seen) > self.max_ids:
            seen.popitem(last=False)

    def expire(self, now: float) -> None:
        horizon = now - self.max_age
        seen = self._seen
        while seen:
            oldest = next(iter(seen.values()))
            if oldest > horizon:
                break
            seen.popitem(last=False)
