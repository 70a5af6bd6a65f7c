"""When the subscribers of a key are woken: at once, or later with more per write.

Every wakeup costs one write per subscriber of the key (a syscall each; on
the bench machine ≈ 8–30 µs of broker CPU, more on a slow day). The events
themselves cost nothing more to send together: a subscriber pulls
everything pending into one write, with progress coalesced (DESIGN §6). So
the number of writes a second is what this schedule decides, in two ways:

- **Fan-out.** A key is woken at most every `watchers × write_cost`
  seconds: with five subscribers that is 0.1 ms (no batching at all); with
  1,000 it is 20 ms, and the events of those 20 ms go out in one write
  per subscriber.
- **Load.** When the ingest runs behind (a turn drained a full batch, so
  more is queued), wakes are not sent one by one as events come in: the
  keys touched are collected and woken together in one *write pass* when
  the ingest has caught up, or at the latest `max_delay` after the
  previous pass ended — and never before the ingest has had at least as
  long as that pass took. Under overload each subscriber is written at
  most once per pass however many events its key got, so writes a second
  fall to what the CPU can do, the ingest is drained first, and an
  event's delay stays bounded by about two passes instead of growing
  with the backlog.

The adapter (server/hub.py) calls `touched()` with the keys an ingest
turn gave new entries, `ingest_turn()` after every turn of the ZMQ drain,
and `expire()` when `next_due()` comes; each returns the keys to wake now.

Pure: no I/O; `now` (seconds, any monotonic clock) is always passed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# Seconds of broker CPU one subscriber write costs, with headroom (a direct
# write measured ≈ 8 µs on the 2-core bench machine on a good day).
WRITE_COST = 20e-6
# Under load, the longest an event's wake waits for the ingest to catch up.
MAX_DELAY = 0.05


@dataclass(frozen=True, slots=True)
class WakeStatistics:
    watched_keys: int  # keys with at least one subscriber
    wake_times: int  # keys whose last wake is remembered (bounded by watched keys)
    deferred: int  # keys with a wake waiting (fan-out interval or load)
    behind: bool  # the ingest has a backlog: wakes go in write passes
    passes: int  # write passes so far
    deferred_by_load: int  # key wakes that waited for a write pass


class WakeSchedule:
    def __init__(self, *, write_cost: float = WRITE_COST, max_delay: float = MAX_DELAY) -> None:
        self.write_cost = write_cost
        self.max_delay = max_delay
        self.watchers: Counter[str] = Counter()  # subscribers per key
        self._last: dict[str, float] = {}  # when each watched key was last woken
        self._due: dict[str, float] = {}  # fan-out: key → when its deferred wake is due
        self._dirty: set[str] = set()  # load: keys waiting for the next write pass
        self.behind = False
        self._pass_not_before = 0.0  # the ingest's share after a pass
        self._pass_started: float | None = None
        self._behind_since = 0.0
        self.passes = 0
        self.deferred_by_load = 0

    # ------------------------------------------------------------ watchers

    def watch(self, key: str) -> None:
        """A subscriber starts reading `key`."""
        self.watchers[key] += 1

    def unwatch(self, key: str) -> None:
        left = self.watchers[key] - 1
        if left > 0:
            self.watchers[key] = left
            return
        del self.watchers[key]
        # Nobody reads it: its interval is 0, its last wake moot (and
        # workflows come and go: the maps must not grow with them).
        self._last.pop(key, None)
        self._due.pop(key, None)
        self._dirty.discard(key)

    # --------------------------------------------------------------- wakes

    def touched(self, keys: Iterable[str], now: float) -> list[str]:
        """`keys` got new entries: the ones to wake now (the rest wait)."""
        out: list[str] = []
        watchers = self.watchers
        for key in keys:
            n = watchers.get(key)
            if not n:
                continue
            if self.behind:
                if key not in self._dirty:
                    self._dirty.add(key)
                    self.deferred_by_load += 1
                continue
            last = self._last.get(key)
            if last is None or now - last >= n * self.write_cost:
                self._last[key] = now
                out.append(key)
            elif key not in self._due:
                self._due[key] = last + n * self.write_cost
        return out

    def ingest_turn(self, now: float, backlog: bool) -> list[str]:
        """After a turn of the ingest drain; `backlog`: it drained a full
        batch (more is queued). The keys to wake now: a write pass when
        the ingest caught up, or when one is due while it is behind."""
        if backlog:
            if not self.behind:
                self.behind = True
                self._behind_since = now
                self._pass_not_before = now + self.max_delay
                # Fan-out wakes already deferred join the next pass.
                self._dirty.update(self._due)
                self._due.clear()
                return []
            if self._dirty and now >= self._pass_not_before:
                return self.begin_pass(now)
            return []
        if self.behind:
            self.behind = False
            return self.begin_pass(now)
        return []

    def begin_pass(self, now: float) -> list[str]:
        """Every key waiting for a write pass, to wake now; call
        `end_pass()` once their writes are done."""
        keys = list(self._dirty)
        self._dirty.clear()
        for key in keys:
            self._last[key] = now
        if keys:
            self.passes += 1
            self._pass_started = now
        return keys

    def end_pass(self, now: float) -> None:
        """The writes of the pass begun last are done: the ingest gets at
        least as long as they took (and `max_delay` at least) before the
        next pass."""
        if self._pass_started is None:
            return
        took = now - self._pass_started
        self._pass_started = None
        self._pass_not_before = now + max(self.max_delay, took)

    def next_due(self) -> float | None:
        """When `expire()` has keys to wake, or None."""
        due = min(self._due.values()) if self._due else None
        if self._dirty and (due is None or self._pass_not_before < due):
            due = self._pass_not_before
        return due

    def expire(self, now: float) -> list[str]:
        """The deferred wakes due by `now`. A write pass falls due here
        when the ingest stopped reporting turns while behind (its queue
        emptied between turns), so nothing waits longer than `max_delay`."""
        out: list[str] = []
        if self._due:
            for key, at in list(self._due.items()):
                if at <= now:
                    del self._due[key]
                    self._last[key] = now
                    out.append(key)
        if self._dirty and now >= self._pass_not_before:
            self.behind = False
            out += self.begin_pass(now)
        return out

    def statistics(self) -> WakeStatistics:
        return WakeStatistics(
            watched_keys=len(self.watchers),
            wake_times=len(self._last),
            deferred=len(self._due) + len(self._dirty),
            behind=self.behind,
            passes=self.passes,
            deferred_by_load=self.deferred_by_load,
        )
