"""The store's trio side: open and restore at start, then one task that
owns the write path (DESIGN.md §10; docs/store.md).

- `open_store()` connects (a pool of `store.pool_size`), migrates, and
  reads back what a restart restores (core/restore.py) — all before ingest
  binds, so no event can arrive for a workflow not restored yet.
- `Store.serve()` is the only writer: every entry ingest releases is queued
  (core/spill.py, bounded by `spill_events` / `spill_bytes`) and written in
  batches of up to `batch_events`, at the latest `flush_ms` after the last
  batch, one transaction each (entries, their workflows' rows, and a
  snapshot for each workflow that is caught up and due one). Ingest never
  waits: while PostgreSQL is down or slow the queue grows within its bound
  and drains in order when it returns; past the bound an entry is counted
  and logged, never silently lost.
- `wait_committed()`: a durable publish waits until its entries are
  committed; concurrent ones share the next transaction (group commit).

Every database call runs in a worker thread behind a CapacityLimiter the
size of the pool (psycopg's async API is asyncio-only: FIELD-NOTES), within
a deadline; each statement also has `statement_timeout`.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import trio
from psycopg_pool import ConnectionPool, PoolTimeout

from ..config import StoreConfig
from ..core.entry import Entry
from ..core.errors import Unavailable
from ..core.restore import RestoreResult, WorkflowRow, mark_committed, restore, skip_unwritten, workflow_rows
from ..core.spill import SpillQueue
from ..core.state import BrokerState, Workflow
from ..logs import ids
from . import pg

log = logging.getLogger("broker.store")

_T = TypeVar("_T")

RETRY_FIRST, RETRY_MAX = 0.2, 5.0  # seconds between attempts while the database is down
LATENCIES_KEPT = 1024  # recent commit times, for stats
HISTORY_PAGE = 500  # entries a resume reads from the store at a time
BEHIND_BATCHES = 10  # a batch holds up to this many batch_events while the queue is longer
PING_EVERY = 5.0  # seconds: an idle writer checks the database this often


class StoreUnavailable(Unavailable):
    """The database could not be reached or did not answer in time (503
    where a request needed it)."""


class StoreRefused(Unavailable):
    """The database answered, and refused the statement (a bug, or data it
    cannot take): retrying the same statement would fail the same way."""


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    status: str  # "up" or "down"
    queued: int
    queued_bytes: int
    queue_peak: int
    written: int
    dropped: int
    refused: int
    batches: int
    failures: int
    last_error: str
    commit_ms_p50: float
    commit_ms_p99: float
    restore: dict[str, Any]


class Store:
    def __init__(self, config: StoreConfig, pool: ConnectionPool) -> None:
        self.config = config
        self.pool = pool
        self.limiter = trio.CapacityLimiter(config.pool_size)
        self.queue = SpillQueue(config.spill_events, config.spill_bytes)
        self.status = "up"
        self.last_error = ""
        self.batches = 0
        self.failures = 0
        self._kick = trio.Event()
        self._committed = trio.Event()
        self._durable_waiting = 0
        self._dropped_logged = 0
        self._latencies: list[float] = []
        # The metrics (server/metrics.py): a batch's commit, a durable publish's wait, in seconds.
        self.on_commit: Callable[[float], None] | None = None
        self.on_durable: Callable[[float], None] | None = None
        self.restore_info: dict[str, Any] = {}
        self.refused = 0  # entries the database refused (never stored)
        self._refused: deque[tuple[int, int]] = deque(maxlen=64)  # their queue positions [lo, hi)
        self._checked = 0.0  # when the database last answered (a write or a ping)

    # ------------------------------------------------------------- calls

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """`fn(conn, *args)` on a pooled connection in a worker thread, within
        the deadline; StoreUnavailable if the database fails or is too slow."""
        deadline = self.config.statement_timeout * 2 + 1

        def run() -> _T:
            with self.pool.connection(timeout=self.config.statement_timeout) as conn:
                return fn(conn, *args, **kwargs)

        try:
            with trio.fail_after(deadline):
                # Abandoned on timeout: the thread ends when its statement
                # does (statement_timeout, or the TCP user timeout of a dead
                # server), and only then frees its limiter slot.
                return await trio.to_thread.run_sync(run, limiter=self.limiter, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise StoreUnavailable(f"no answer within {deadline:g} s") from None
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
            raise StoreUnavailable(_one_line(exc)) from None  # the connection, the server: retry
        except psycopg.errors.QueryCanceled as exc:
            raise StoreUnavailable(_one_line(exc)) from None  # statement_timeout: slow, not wrong
        except psycopg.Error as exc:
            raise StoreRefused(_one_line(exc)) from None

    # ------------------------------------------------------------ writes

    def kick(self) -> None:
        """Write what is queued now (a durable publish is waiting)."""
        self._kick.set()

    async def wait_committed(self, target: int, first: int = 0, timeout: float | None = None) -> bool:
        """True once the first `target` entries ever queued are committed;
        False after `timeout` (a durable publish: `store.durable_timeout`),
        or if one of the entries from position `first` on was refused by
        the database (never stored)."""
        self._durable_waiting += 1
        began = trio.current_time()
        try:
            self.kick()
            with trio.move_on_after(self.config.durable_timeout if timeout is None else timeout):
                while self.queue.done < target:
                    await self._committed.wait()
                return not any(lo < target and hi > first for lo, hi in self._refused)
            return False
        finally:
            self._durable_waiting -= 1
            if self.on_durable is not None and timeout is None:  # a durable publish's commit latency
                self.on_durable(trio.current_time() - began)

    async def serve(self, state: BrokerState, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The write loop (the one task that writes)."""
        cfg = self.config
        queue = self.queue
        retry = RETRY_FIRST
        task_status.started()
        while True:
            if not len(queue) or (len(queue) < cfg.batch_events and not self._durable_waiting):
                with trio.move_on_after(cfg.flush_ms / 1000):
                    await self._kick.wait()
                self._kick = trio.Event()
            self._log_dropped()
            if not len(queue):
                if trio.current_time() - self._checked >= PING_EVERY:
                    await self._ping()  # idle: /readyz must still tell a database that went away
                continue
            # Behind (more queued than a batch): larger transactions, so the
            # per-commit cost (a WAL flush) is shared by more events.
            batch = queue.peek(min(len(queue), cfg.batch_events * BEHIND_BATCHES))
            now = trio.current_time()
            wall = time.time()
            rows, saved = workflow_rows(state, batch, now, wall)
            began = trio.current_time()
            try:
                await self.call(_write, batch, int(wall * 1000), rows)
            except StoreUnavailable as exc:
                self._down(exc)
                await trio.sleep(retry)
                retry = min(RETRY_MAX, retry * 2)
                continue
            except StoreRefused as exc:
                # Written again it would fail again, and hold up everything
                # behind it: set aside (counted, logged), never retried.
                self.failures += 1
                self.refused += len(batch)
                self.last_error = str(exc)
                log.error("store: the database refused a batch of %d events (%s): not stored", len(batch), exc)
                self._refused.append((queue.done, queue.done + len(batch)))
                queue.committed(len(batch))
                self._committed.set()
                self._committed = trio.Event()
                continue
            took = trio.current_time() - began
            self._checked = trio.current_time()
            if self.status != "up":
                log.warning("store: up again; writing the %d events that waited", len(queue))
            self.status, retry = "up", RETRY_FIRST
            queue.committed(len(batch))
            self.batches += 1
            mark_committed(state, rows, saved, now)
            if self.on_commit is not None:
                self.on_commit(took)
            lat = self._latencies
            lat.append(took * 1000)
            if len(lat) > LATENCIES_KEPT:
                del lat[: len(lat) - LATENCIES_KEPT]
            self._committed.set()
            self._committed = trio.Event()

    def _down(self, exc: Exception) -> None:
        self.failures += 1
        if self.status == "up":
            log.error("store: down (%s); %d events wait in the spill queue", exc, len(self.queue))
        self.status, self.last_error = "down", str(exc)

    async def _ping(self) -> None:
        self._checked = trio.current_time()
        try:
            await self.call(pg.ping)
        except (StoreUnavailable, StoreRefused) as exc:
            self._down(exc)
            return
        if self.status != "up":
            log.warning("store: up again")
            self.status = "up"

    async def end_run(self, node_id: str) -> None:
        """A clean stop: everything accepted is committed (the next start
        need not skip sequence numbers: core/restore.py skip_unwritten)."""
        try:
            await self.call(pg.end_run, node_id)
        except (StoreUnavailable, StoreRefused) as exc:
            log.error("store: could not record the clean stop: %s", exc)

    async def history_page(self, wf: Workflow, after: int, limit: int = HISTORY_PAGE) -> list[Entry]:
        """The stored entries of `wf` (its epoch) after seq `after`, in
        order, at most `limit`; [] if the store cannot be read now (logged)."""
        try:
            return await self.entries(wf.id, wf.epoch, wf.tenant, wf.terminal_seq, after, limit, wf.ancestors)
        except (StoreUnavailable, StoreRefused) as exc:
            log.warning("store: history of %r unavailable: %s", wf.id, exc, extra=ids(workflow=wf.id))
            return []

    async def entries(
        self,
        wid: str,
        epoch: str,
        tenant: str,
        terminal: int | None,
        after: int,
        limit: int,
        ancestors: tuple[str, ...] = (),
    ) -> list[Entry]:
        """A workflow's stored entries after seq `after` (StoreUnavailable)."""
        rows = await self.call(pg.history, wid, epoch, after, limit)
        return [
            Entry.restored(
                r.body,
                tenant=tenant,
                ancestors=ancestors,
                terminal=r.seq == terminal,
                after_terminal=terminal is not None and r.seq > terminal,
                fields=r.fields,
            )
            for r in rows
        ]

    def _log_dropped(self) -> None:
        dropped = self.queue.dropped
        if dropped != self._dropped_logged:
            log.error(
                "store: spill queue full (%d events, %d bytes): %d events not stored (%d in all)",
                len(self.queue),
                self.queue.bytes,
                dropped - self._dropped_logged,
                dropped,
            )
            self._dropped_logged = dropped

    async def serve_retention(self) -> None:
        """Prune what is older than `store.retention`, in small batches."""
        while True:
            await trio.sleep(60)
            cutoff = int((time.time() - self.config.retention) * 1000)
            try:
                more = True
                while more:  # small batches, never one long transaction
                    more = await self.call(pg.prune, cutoff, 5000)
                    await trio.sleep(0.05)
            except (StoreUnavailable, StoreRefused) as exc:
                # Down, or the statement refused (a role without DELETE):
                # the broker goes on, and retention tries again next round.
                log.warning("store: retention skipped: %s", exc)

    def statistics(self) -> StoreStatistics:
        lat = sorted(self._latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else 0.0

        q = self.queue
        return StoreStatistics(
            status=self.status,
            queued=len(q),
            queued_bytes=q.bytes,
            queue_peak=q.peak,
            written=q.done,
            dropped=q.dropped,
            refused=self.refused,
            batches=self.batches,
            failures=self.failures,
            last_error=self.last_error,
            commit_ms_p50=pct(0.5),
            commit_ms_p99=pct(0.99),
            restore=self.restore_info,
        )

    def close(self) -> None:
        self.pool.close(timeout=1.0)


def _write(conn: Any, batch: list[Entry], stored_at: int, rows: list[WorkflowRow]) -> None:
    pg.write_batch(conn, pg.copy_rows(batch, stored_at), rows)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _store_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first StoreUnavailable / StoreRefused inside `group`, else the group."""
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif isinstance(exc, (StoreUnavailable, StoreRefused)):
            return exc
    return group


async def open_store(config: StoreConfig, state: BrokerState) -> Store:
    """Connect, migrate, restore `state` (empty: before ingest binds).
    StoreUnavailable / pg.SchemaTooNew if that cannot be done."""
    try:
        pool = await trio.to_thread.run_sync(
            pg.open_pool, config.dsn, config.pool_size, config.statement_timeout, config.statement_timeout
        )
    except (psycopg.Error, PoolTimeout) as exc:
        raise StoreUnavailable(f"cannot connect: {_one_line(exc)}") from None
    store = Store(config, pool)
    collecting = gc.isenabled()
    try:
        applied = await store.call(pg.migrate)
        if applied:
            log.info("store: schema migrated to version %d", applied[-1])
        began = trio.current_time()
        lim = state.limits
        now_ms = int(time.time() * 1000)
        ids: list[Any] = []
        # What the restore reads and builds (rows, entries, snapshots: about
        # a million objects for 10,000 workflows) is kept: collections in
        # between would walk the growing heap again and again for nothing.
        # The one after start-up (server/gc_policy.install) cleans up.
        gc.disable()

        async def read_ids() -> None:
            ids.extend(
                await store.call(pg.load_ids, now_ms=now_ms, dedup_ids=lim.dedup_window, dedup_age=state.ids.max_age)
            )

        try:
            async with trio.open_nursery() as nursery:  # two connections at once
                nursery.start_soon(read_ids)
                got = await store.call(
                    pg.load,
                    now_ms=now_ms,
                    terminal_ttl=lim.terminal_ttl,
                    ring_events=lim.ring_events,
                    restore_events=config.restore_events,
                )
        except BaseExceptionGroup as group:
            # A read failed (both, often, alike): its own error, which the
            # caller reports in one line, not the nursery's group of them.
            raise _store_error(group) from None
        loaded = trio.current_time() - began
        result: RestoreResult = restore(state, got.workflows, got.entries, ids, trio.current_time(), time.time())
        if collecting:
            gc.enable()
        took = trio.current_time() - began
        store.restore_info = {
            "workflows": result.workflows,
            "terminal": result.terminal,
            "entries": result.entries,
            "ids": result.ids,
            "read_s": round(loaded, 3),
            "total_s": round(took, 3),
        }
        for wf in state.workflows.values():
            wf.saved_seq = wf.snapshot.seq
            wf.saved_at = trio.current_time()
        log.info(
            "store: restored %d workflows (%d terminal), %d entries, %d ids in %.2f s",
            result.workflows,
            result.terminal,
            result.entries,
            result.ids,
            took,
        )
        clean = await store.call(pg.begin_run, state.node_id)
    except BaseException:
        if collecting:
            gc.enable()
        store.close()
        raise
    state.spill = store.queue
    if clean is False:
        # The last run did not stop cleanly: what it streamed but never
        # wrote must not get its sequence numbers reused.
        skipped = skip_unwritten(state, config.spill_events, trio.current_time(), time.time())
        store.restore_info["unclean"] = True
        store.restore_info["skipped"] = skipped
        log.warning(
            "store: the last run of node %r did not stop cleanly: %d broker-sequenced workflows go on "
            "%d seqs later, behind a gap (seqs that may have been streamed but were never written)",
            state.node_id,
            skipped,
            config.spill_events,
        )
    return store
