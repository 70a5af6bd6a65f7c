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
- **Load.** When the ingest runs behind — a turn drained a full batch (more
  is queued), or began `lag_behind` after the previous one with input
  waiting all along (the loop is busy) — wakes are not sent one by one as
  events come in: the keys touched are collected and woken together in
  one *write pass*, when the ingest has caught up or `max_delay` after the
  first of them, whichever is first; and never sooner than `max_delay`
  after the previous pass, nor, while the ingest has not caught up, sooner
  than that pass took (the ingest's share: at most half the loop writes
  while input waits; once it has caught up the writes take the rest, so a
  pass follows the last one as soon as it may). Under overload each
  subscriber is written at most once per pass however many events its key
  got, so writes a second fall to what the CPU can do, the ingest is
  drained first, and an event's delay stays bounded by about two passes
  instead of growing with the backlog. Keys with so many subscribers that
  their fan-out interval is `max_delay / 10` or more (250 at the default
  cost) keep that interval: they are batched already.

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
# Under load, the longest an event's wake waits for the ingest to catch up,
# and the least time between two write passes.
MAX_DELAY = 0.05
# A loop turn this late (seconds since the previous turn, with input
# waiting all along) means the broker runs behind.
LAG_BEHIND = 0.1


@dataclass(frozen=True, slots=True)
class WakeStatistics:
    watched_keys: int  # keys with at least one subscriber
    wake_times: int  # keys whose last wake is remembered (bounded by watched keys)
    deferred: int  # keys with a wake waiting (fan-out interval or load)
    behind: bool  # the ingest has a backlog: wakes go in write passes
    passes: int  # write passes so far
    deferred_by_load: int  # key wakes that waited for a write pass


class WakeSchedule:
    def __init__(
        self, *, write_cost: float = WRITE_COST, max_delay: float = MAX_DELAY, lag_behind: float = LAG_BEHIND
    ) -> None:
        self.write_cost = write_cost
        self.max_delay = max_delay
        self.lag_behind = lag_behind
        # A key whose own fan-out interval is this long keeps it while the
        # ingest runs behind: its writes are batched already, and waiting
        # for write passes would only make each one larger and later.
        self.fan_out_interval = max_delay / 10
        self.watchers: Counter[str] = Counter()  # subscribers per key
        self._last: dict[str, float] = {}  # when each watched key was last woken
        self._due: dict[str, float] = {}  # fan-out: key → when its deferred wake is due
        self._dirty: set[str] = set()  # load: keys waiting for the next write pass
        self._dirty_since = 0.0  # when the first of them went dirty
        self.behind = False  # the ingest runs behind: wakes wait for write passes
        self._caught_up = False  # behind, but the ingest has caught up: pass when spacing allows
        self._pass_not_before = 0.0  # the ingest's share after a pass
        self._pass_ended = -max_delay  # when the last pass's writes were done
        self._pass_started: float | None = None
        self.pass_keys: tuple[str, ...] = ()  # the keys of the pass begun last
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
            interval = n * self.write_cost
            if self.behind and interval < self.fan_out_interval:
                self._defer(key, now)
                continue
            last = self._last.get(key)
            if last is None or now - last >= interval:
                self._last[key] = now
                out.append(key)
            elif key not in self._due:
                self._due[key] = last + interval
        return out

    def _defer(self, key: str, now: float) -> None:
        if key not in self._dirty:
            if not self._dirty:
                self._dirty_since = now
            self._dirty.add(key)
            self.deferred_by_load += 1

    def ingest_turn(self, now: float, backlog: bool, lag: float = 0.0) -> list[str]:
        """After a turn of the ingest drain. `backlog`: the turn drained a
        full batch (more is queued); `lag`: how long since the previous
        turn began, when the ingest did not wait for input in between (a
        loop turn running behind). The keys to wake now: a write pass,
        when one is due."""
        if backlog or lag > self.lag_behind:
            self._caught_up = False
            if not self.behind:
                self.behind = True
                # Deferred wakes of keys with few subscribers join the pass.
                for key in [k for k in self._due if self.watchers[k] * self.write_cost < self.fan_out_interval]:
                    del self._due[key]
                    self._defer(key, now)
                return []
        elif self.behind:
            # Caught up: the pass goes now, or once the ingest has had its
            # share after the previous one (the timer, `expire()`).
            self._caught_up = True
        if self.behind and self._dirty and self._pass_started is None and now >= self._pass_due():
            return self.begin_pass(now)
        if self.behind and not self._dirty and self._caught_up:
            self.behind = self._caught_up = False
        return []

    def _pass_due(self) -> float:
        if self._caught_up:
            return self._pass_ended + self.max_delay
        return max(self._pass_not_before, self._dirty_since + self.max_delay)

    def begin_pass(self, now: float) -> list[str]:
        """Every key waiting for a write pass, to wake now; call
        `end_pass()` once their writes are done. Nothing while a pass is
        still running: keys touched meanwhile wait for the next one."""
        if self._pass_started is not None:
            return []
        keys = list(self._dirty)
        self._dirty.clear()
        for key in keys:
            self._last[key] = now
        if self._caught_up:
            self.behind = self._caught_up = False
        if keys:
            self.passes += 1
            self._pass_started = now
            self.pass_keys = tuple(keys)
        return keys

    def end_pass(self, now: float, took: float | None = None) -> None:
        """The writes of the pass begun last are done (`took`: the seconds
        they took, if not all the time since it began): the next pass
        waits `max_delay`, and as long as this one took unless the ingest
        has caught up meanwhile."""
        if self._pass_started is None:
            return
        if took is None:
            took = now - self._pass_started
        self._pass_started = None
        self.pass_keys = ()
        self._pass_ended = now
        self._pass_not_before = now + max(self.max_delay, took)

    def next_due(self) -> float | None:
        """When `expire()` has keys to wake, or None."""
        due = min(self._due.values()) if self._due else None
        if self._dirty and self._pass_started is None:
            at = self._pass_due()
            if due is None or at < due:
                due = at
        return due

    def expire(self, now: float) -> list[str]:
        """The deferred wakes due by `now`: fan-out intervals that ran out,
        and the write pass when it is due (the ingest may be waiting for
        input, or still busy: either way nothing waits longer)."""
        out: list[str] = []
        if self._due:
            for key, at in list(self._due.items()):
                if at <= now:
                    del self._due[key]
                    self._last[key] = now
                    out.append(key)
        if self._dirty and self._pass_started is None and now >= self._pass_due():
            out += self.begin_pass(now)
        return out

    @property
    def pass_running(self) -> bool:
        return self._pass_started is not None

    def statistics(self) -> WakeStatistics:
        return WakeStatistics(
            watched_keys=len(self.watchers),
            wake_times=len(self._last),
            deferred=len(self._due) + len(self._dirty),
            behind=self.behind,
            passes=self.passes,
            deferred_by_load=self.deferred_by_load,
        )
