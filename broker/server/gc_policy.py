"""The garbage collector's policy and its pauses, made visible.

Measured on the bench machine (docs/benchmarks.md): a collection walks its
generations' tracked objects at ≈ 0.65 µs each. Two kinds of pause hurt
stream latency:

- Full (generation 2) collections walk every tracked object: with 5,000
  streams open (≈ 200 objects each in Hypercorn and trio) and full rings,
  0.4–0.8 s. With CPython's defaults one runs every 10 × 10 young
  collections (and whenever the heap grew by a quarter), i.e. every few
  seconds under load. Yet the only garbage a full collection finds here is
  what closed connections leave (≈ 27 objects in reference cycles per
  closed stream, measured) and the odd evicted workflow: ring entries and
  events are freed by reference counting. So automatic full collections are
  off (threshold 1,000,000) and the broker runs one itself
  (`FullCollections`, from `run.serve`) once enough stream requests (SSE or
  WebSocket, served or refused; counted in http.py) have ended since the
  last one — max(`MIN_CLOSED`, a quarter of the connections still open) —
  or `FULL_EVERY` seconds have passed, whichever is first; and then in a
  second with no ingest, if one comes within `MAX_WAIT`. Short-lived
  connections' garbage goes in the young collections, which still run; what
  a long-lived plain HTTP connection (keep-alive) leaves waits for the
  next full collection, `FULL_EVERY` at the latest.
- Generation 1 collections walk the survivors of the young collections
  since the last one: every ring entry survives, so with CPython's
  threshold of 10 each took ≈ 10 ms at 5,000 events/s — one per second,
  enough to set the p99. Threshold 2 makes them ≈ 3 ms (more often; the
  same total work).

- What lives long is frozen out of collections (`gc.freeze()`): what
  exists once the broker has started, and then every `FREEZE_EVERY`
  seconds, right after a young collection, whatever has survived so far.
  A full collection then walks only what is younger than the last freeze.
  Without this, 100,000 workflows (≈ 1.2 M tracked objects: ring entries,
  snapshots, sequencers) made each full collection a 0.7–1.9 s pause, and
  a client could set one off every few seconds with cheap bad requests
  (each counts as an ended stream request). Measured with 100,000
  workflows loaded: docs/protocol.md "Limits and timeouts".
- Cyclic garbage that was frozen (a stream that lived longer than
  `FREEZE_EVERY`, then closed: ≈ 27 objects, and whatever buffers they
  still reference) is only found by a complete collection
  (`gc.unfreeze()` first), which walks everything: every `FULL_EVERY`
  seconds, and sooner once `MIN_CLOSED` such long-lived streams have
  ended, but never within `COMPLETE_FLOOR` seconds of the last one (in a
  quiet second if one comes within `MAX_WAIT`). Measured: 1,000 streams
  of a 5,000-event burst left 0.4–0.8 GB allocated until one ran. A
  client can bring one forward only by holding a thousand streams past a
  freeze, and at most once per `COMPLETE_FLOOR`.

Every collection's pause is counted, the longest kept, and the cyclic
garbage freed counted; `/v1/admin/stats` shows them under `gc`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import trio

THRESHOLDS = (700, 2, 1_000_000)  # full collections: see FullCollections
MIN_CLOSED = 1000  # closed connections that make a full collection due
FULL_EVERY = 600.0  # seconds: at most this long between full collections
MAX_WAIT = 30.0  # seconds a due full collection may wait for a quiet moment
FREEZE_EVERY = 5.0  # seconds between freezes of what has survived (see above)
COMPLETE_FLOOR = 60.0  # seconds at least between two complete collections


class GcStats:
    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_total = [0.0, 0.0, 0.0]
        self.pause_max = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]  # unreachable objects freed (cyclic garbage)
        self._started = 0.0
        self.on_pause: Callable[[int, float], None] | None = None  # (generation, seconds): the metrics

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = info["generation"]
        pause = time.perf_counter() - self._started
        self.collections[gen] += 1
        self.collected[gen] += info.get("collected", 0)
        self.pause_total[gen] += pause
        if pause > self.pause_max[gen]:
            self.pause_max[gen] = pause
        if self.on_pause is not None:
            self.on_pause(gen, pause)

    def to_json(self) -> dict[str, Any]:
        return {
            f"gen{g}": {
                "collections": self.collections[g],
                "pause_total_ms": round(self.pause_total[g] * 1000, 1),
                "pause_max_ms": round(self.pause_max[g] * 1000, 1),
                "collected": self.collected[g],
            }
            for g in range(3)
        }


# Brokers running in this process with the policy applied (they may run
# in-process, e.g. under tests, and stop in any order) and the thresholds
# the first of them found.
_installed: list[GcStats] = []
_original_thresholds: tuple[int, int, int] = gc.get_threshold()


def install() -> GcStats:
    """Apply the policy (call once per broker, after start-up) and start counting."""
    global _original_thresholds
    stats = GcStats()
    if not _installed:
        _original_thresholds = gc.get_threshold()
    _installed.append(stats)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    gc.callbacks.append(stats.callback)
    return stats


def uninstall(stats: GcStats) -> None:
    """Undo `install`; the last broker to stop restores the collector."""
    if stats.callback in gc.callbacks:
        gc.callbacks.remove(stats.callback)
    if stats in _installed:
        _installed.remove(stats)
        if not _installed:
            gc.set_threshold(*_original_thresholds)
            gc.unfreeze()


class FullCollections:
    """When the broker runs a full collection (sans-io: the caller counts
    closed connections, supplies the clock and the ingest count, and runs
    `gc.collect()` when `check` says so).

    A collection falls due once `min_closed` connections — or a quarter of
    those still open, if more — have closed since the last one (it walks
    what is younger than the last freeze), or `every` seconds have passed
    since the last complete one (`complete` is then True: the caller
    unfreezes first, and it walks everything). A due collection waits for
    a quiet second (no event ingested or written since the previous
    check: the caller's `activity` count did not move), so the pause does
    not land on live traffic, but never longer than `max_wait` seconds.
    Between them, `freeze_due()` says when to freeze what has survived."""

    def __init__(
        self,
        now: float,
        min_closed: int = MIN_CLOSED,
        every: float = FULL_EVERY,
        max_wait: float = MAX_WAIT,
        freeze_every: float = FREEZE_EVERY,
        complete_floor: float = COMPLETE_FLOOR,
    ) -> None:
        self.min_closed = min_closed
        self.every = every
        self.max_wait = max_wait
        self.freeze_every = freeze_every
        self.complete_floor = complete_floor
        self.closed = 0  # connections closed since the last full collection
        self.closed_frozen = 0  # of those (and before) since the last complete one: lived past a freeze
        self.last = now  # the last complete collection
        self.last_freeze = now
        self.due_since: float | None = None
        self.complete = False  # the collection due is a complete one
        self.freezes = 0  # freezes since start (each after a collection)
        self._ingested = -1

    def check(self, open_connections: int, now: float, ingested: int) -> bool:
        """Call about once a second: True means collect now (then `done`)."""
        quiet = ingested == self._ingested
        self._ingested = ingested
        if self.due_since is None:
            if now - self.last >= self.every or (
                self.closed_frozen >= self.min_closed and now - self.last >= self.complete_floor
            ):
                self.due_since, self.complete = now, True
            elif self.closed >= max(self.min_closed, open_connections // 4):
                self.due_since, self.complete = now, False
            else:
                return False
        return quiet or now - self.due_since >= self.max_wait

    def done(self, now: float) -> None:
        """The collection `check` asked for ran (and a freeze after it)."""
        self.closed = 0
        if self.complete:
            self.last = now
            self.closed_frozen = 0
        self.last_freeze = now
        self.freezes += 1
        self.due_since = None
        self.complete = False

    def ended(self, began: float) -> None:
        """A stream request that began at `began` (the policy's clock) ended:
        if a freeze came since, its garbage was frozen with it."""
        self.closed += 1
        if began <= self.last_freeze:
            self.closed_frozen += 1

    def freeze_due(self, now: float) -> bool:
        return now - self.last_freeze >= self.freeze_every

    def froze(self, now: float) -> None:
        self.last_freeze = now
        self.freezes += 1


async def serve_full_collections(
    policy: FullCollections, open_connections: Callable[[], int], ingested: Callable[[], int]
) -> None:
    """Run the collections `policy` asks for (checked every second; the
    collection itself is the pause), and freeze what survives."""
    while True:
        await trio.sleep(1.0)
        now = trio.current_time()
        if policy.check(open_connections(), now, ingested()):
            if policy.complete:
                gc.unfreeze()
            gc.collect()
            gc.freeze()
            policy.done(trio.current_time())
        elif policy.freeze_due(now):
            gc.collect(1)  # the young generations: what is garbage already goes first
            gc.freeze()
            policy.froze(trio.current_time())
