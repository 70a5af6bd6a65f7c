"""The garbage collector's policy and its pauses, made visible.

Measured on the bench machine (docs/benchmarks.md): a full (generation 2)
collection walks every tracked object at ≈ 0.65 µs each, so with 5,000
streams open (≈ 200 objects each in Hypercorn, Quart and trio) and full
rings it stops the event loop for 0.5–0.8 s. With CPython's defaults a
growing heap gets such a collection every time it grows by a quarter, which
made the many-workflows latency's p99 those pauses.

So: what exists once the broker has started (modules, config, the app) is
frozen out of collections (`gc.freeze()`), and a full collection needs 100
young-generation collections instead of 10 (≈ 70,000 net new objects,
besides CPython's own rule of 25 % growth since the last one). Cyclic
garbage still goes: young cycles in generations 0/1 as before, old ones at
the next full collection. Every collection's pause is counted and the
longest kept; `/v1/admin/stats` shows them under `gc`.
"""

from __future__ import annotations

import gc
import time
from typing import Any

THRESHOLDS = (700, 10, 100)


class GcStats:
    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pause_total = [0.0, 0.0, 0.0]
        self.pause_max = [0.0, 0.0, 0.0]
        self._started = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = info["generation"]
        pause = time.perf_counter() - self._started
        self.collections[gen] += 1
        self.pause_total[gen] += pause
        if pause > self.pause_max[gen]:
            self.pause_max[gen] = pause

    def to_json(self) -> dict[str, Any]:
        return {
            f"gen{g}": {
                "collections": self.collections[g],
                "pause_total_ms": round(self.pause_total[g] * 1000, 1),
                "pause_max_ms": round(self.pause_max[g] * 1000, 1),
            }
            for g in range(3)
        }


def install() -> GcStats:
    """Apply the policy (call once, after start-up) and start counting."""
    stats = GcStats()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    gc.callbacks.append(stats.callback)
    return stats


def uninstall(stats: GcStats) -> None:
    """Undo `install` (the broker may run in-process, e.g. under tests)."""
    if stats.callback in gc.callbacks:
        gc.callbacks.remove(stats.callback)
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
