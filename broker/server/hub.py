"""The trio side of the core: ingest, wakeups, connections, draining.

`Hub` wraps the sans-io `BrokerState`. Ingest adapters call `ingest()` /
`ingest_batch()`; the state applies the frames and names the workflows that
got new entries, the core's `WakeSchedule` decides which of them to wake
now (core/wake.py: fan-out intervals, write passes under load), and those
keys join one queue, each at most once, which the flusher task works
through in time slices (its listeners' direct writes included), so no
wake of thousands of writes holds the loop and a key touched again while
queued costs no extra write. Subscribers never hold copies of events:
they wake, pull from the rings through their reader, write, and wait
again. Streams that have ended wait for their turn to tear down
(`end_later`): the streams still open get their events first.

One wake mechanism: a listener is a callback registered on a key
(`listen()`). SSE streams and WebSocket sessions listen for their whole
life (the callback writes directly, or hands the connection back to its
task); `wait()` is a listener that sets an event. Listeners leave with
their stream, so connect/disconnect cycles leave nothing behind.

A `Connection` (server/connection.py) is one open stream; its transitions
are its own methods (write, park, hand back, close).

One clock: `trio.current_time()` for every duration, handed to the core as
`now`; wall time (`server_ts`, admin display) read once per ingest batch or
connection. Everything here runs in the one trio thread; no locks.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import trio
from werkzeug.datastructures import Headers

from ..config import Config
from ..core.audit import AuditLog
from ..core.control import ControlRequest, RequestRate, check_request, control_body
from ..core.errors import (
    BrokerError,
    InvalidArgument,
    LimitReached,
    NotFound,
    PermissionDenied,
    Reject,
    ResourceExhausted,
    ShuttingDown,
    SlowConsumer,
    Unauthenticated,
    Unavailable,
)
from ..core.history import (
    check_epoch,
    from_ring,
    history_body,
    list_body,
    list_memory,
    merge_stored,
    parse_history_query,
    parse_list_query,
)
from ..core.limits import ANONYMOUS, ConnectionTable, Principal, SocketBudget
from ..core.reader import WorkflowReader
from ..core.state import BrokerState, FrameIngest, IngestResult, Limits
from ..core.subscribe import (
    AUDIT,
    JOURNAL,
    NEW_WORKFLOW,
    Opened,
    Subscription,
    open_subscription,
    require,
    workflow_not_found,
)
from ..core.wake import WakeSchedule
from ..logs import ids
from .connection import Connection, ConnectionCounters
from .control import ControlChannel
from .curve import CurveServer
from .gc_policy import FullCollections, GcStats
from .identity import Identity
from .metrics import Metrics

if TYPE_CHECKING:  # psycopg is imported only when a store is configured
    from ..store.writer import Store
    from .probe import Probe

log = logging.getLogger("broker.hub")
audit_log = logging.getLogger("broker.audit")

# Events of a large batch applied between two looks at the clock.
SLICE_EVENTS = 64

# Seconds of wakes the flusher makes before it lets the other tasks run:
# PASS_SLICE, or while wakes stay queued as long as the others took since
# its previous slice (at most MAX_SLICE). Trio runs every ready task once
# a round, so with hundreds of streams ending at once a fixed slice would
# give the deliveries a few percent of the loop; this gives them half.
PASS_SLICE = 0.005
MAX_SLICE = 0.025
# Streams whose end is written wait for their teardown (Hypercorn's close
# path, their task's exit: ≈ 0.3 ms of broker CPU each on the bench
# machine, twenty writes' worth) to be let through: ENDS_IDLE a round
# when no wake was queued for ENDS_QUIET seconds and none waits for a
# write pass, else ENDS_BUSY_RATE a second (≈ 10 % of a core), and while
# the broker runs behind (write passes) ENDS_BEHIND_RATE, so thousands of
# streams ending together never delay the events of the others (the gaps
# between write passes are the ingest's, not theirs).
ENDS_IDLE = 32
ENDS_BUSY_RATE = 250.0
ENDS_BEHIND_RATE = 100.0
ENDS_QUIET = 0.05

__all__ = ["JOURNAL", "NEW_WORKFLOW", "Hub", "HubStatistics", "limits_from_config"]


def limits_from_config(config: Config) -> Limits:
    b = config.buffer
    return Limits(
        ring_events=b.ring_events,
        ring_bytes=b.ring_bytes,
        total_bytes=b.total_bytes,
        journal_events=b.journal_events,
        journal_bytes=b.journal_bytes,
        max_tasks=b.max_tasks,
        max_workflows=b.max_workflows,
        terminal_ttl=b.terminal_ttl,
        reorder_window=config.order.reorder_window_ms / 1000.0,
        dedup_window=config.order.dedup_window,
        max_frame_bytes=config.ingest.max_frame_bytes,
    )


@dataclass(frozen=True, slots=True)
class HubStatistics:
    """A frozen view of the hub, for tests and /v1/admin/stats."""

    connections: int
    by_transport: Mapping[str, int]
    listeners: int  # callbacks registered on keys (streams, sessions' subscriptions, waits)
    listened_keys: int
    watched_keys: int  # keys with subscribers (what wake batching counts)
    wake_times: int  # keys whose last wake is remembered
    deferred_wakes: int
    behind: bool  # the ingest has a backlog: wakes go in write passes
    write_passes: int
    deferred_by_load: int
    delivered: Mapping[str, int]
    streams: Mapping[str, int]
    draining: bool


class _RateLimitedLog:
    """At most `burst` reject log lines per `period`; the rest are summed."""

    __slots__ = ("period", "burst", "window_start", "logged", "suppressed")

    def __init__(self, period: float = 10.0, burst: int = 10) -> None:
        self.period = period
        self.burst = burst
        self.window_start = -period
        self.logged = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if now - self.window_start >= self.period:
            if self.suppressed:
                log.warning("ingest: %d more rejects not logged in the last %.0fs", self.suppressed, self.period)
            self.window_start, self.logged, self.suppressed = now, 0, 0
        if self.logged < self.burst:
            self.logged += 1
            return True
        self.suppressed += 1
        return False


class Hub:
    def __init__(self, config: Config, state: BrokerState | None = None) -> None:
        self.config = config
        self.identity = Identity(config.auth)  # ConfigError if an auth key is unusable
        self.stream = config.stream  # what the transports read of the config
        self.state = state or BrokerState(config.node.id, limits_from_config(config))
        self.schedule = WakeSchedule()
        # key -> listeners: token id -> callback(key). The one wake mechanism.
        self._listeners: dict[str, dict[int, Callable[[str], None]]] = {}
        self._watching: set[tuple[str, int]] = set()  # (key, token id) of listeners that are subscribers
        self._schedule_changed = trio.Event()
        self._flusher_due: float | None = None  # when the flusher wakes by itself
        # Keys to wake, in order, each at most once: the flusher wakes them
        # in slices. A key touched again while queued adds no write: its
        # subscribers pull everything new when it comes up.
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        # Watched keys with entries not woken yet → when the first of them
        # came (the publish→write histogram: one observation per key wake).
        self._touched_at: dict[str, float] = {}
        self._pass_left: set[str] = set()  # keys of the running write pass not woken yet
        self._pass_took = 0.0  # seconds their wakes took
        self._slice_ended: float | None = None  # when the last slice left keys queued
        self._ends: deque[Callable[[], None]] = deque()  # ended streams waiting to end (their release)
        self._last_busy = -1e9  # when the flusher last had wakes queued
        self._end_tokens = 0.0  # ENDS_BUSY_RATE's bucket
        self._end_refill = 0.0
        self.connections: dict[int, Connection] = {}
        lim = config.limits
        self.table = ConnectionTable(global_limit=lim.global_, per_user=lim.per_user, per_tenant=lim.per_tenant)
        self._conn_ids = itertools.count(1)
        self.counts = ConnectionCounters()
        self.delivered = self.counts.delivered  # events written, by transport
        # Stream-side counters (shared with the readers: coalesced, resyncs,
        # gaps), plus writes, direct_writes, slow_consumer_closed, …
        self.counters = self.counts.streams
        self._draining = False
        self._no_connections = trio.Event()
        self._reject_log = _RateLimitedLog()
        self.ingest_endpoint = ""
        self.sockets: SocketBudget | None = None  # accepted sockets (set by run.serve: server/listen.py)
        self.body_bytes = 0  # request bodies being read, all requests together (http.py)
        self.body_bytes_peak = 0
        self.gc_stats: GcStats | None = None  # set by run.serve (gc_policy)
        self.ingest_curve: CurveServer | None = None  # set by run.serve when ingest requires CURVE
        self.control_curve: CurveServer | None = None  # … and when the control socket does
        self.control: ControlChannel | None = None  # set by run.serve when control.bind is set
        self.control_rate = RequestRate()  # control requests per principal
        self.audit_log = AuditLog(self.state.node_epoch, config.audit.ring_events)
        self.audit_counts: Counter[str] = Counter()  # facts recorded, by action (metrics)
        self.probe: Probe | None = None  # the data-path probe (set by run.serve: server/probe.py)
        self.metrics = Metrics()  # GET /metrics (server/metrics.py)
        self.metrics.attach(self)
        self.reloads = self.reload_failures = 0  # SIGHUP reloads (run.reload)
        self.full_collections: FullCollections | None = None  # ditto: counts ended stream requests
        self.store: Store | None = None  # set by run.serve with store.backend = "postgres"

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def node_epoch(self) -> str:
        return self.state.node_epoch

    @property
    def cors_origins(self) -> tuple[str, ...]:
        return self.config.http.cors_origins

    def principal_of(self, headers: Headers | Mapping[str, str], args: Mapping[str, str]) -> Principal:
        """Who a request is (server/identity.py, the one place that decides);
        Unauthenticated when auth is on and it has no valid token."""
        return self.identity.principal_of(headers, args)

    # --------------------------------------------------------------- ingest

    def ingest(self, frame: bytes, source: str) -> IngestResult:
        """One frame or HTTP body (one event or an array)."""
        now = trio.current_time()
        result = self.state.ingest_frame(frame, now, source, time.time())
        if result.rejected:
            self._log_rejects(result, source, now)
        self._wake(result.touched, result.created, now)
        return result

    def ingest_batch(
        self, frames: list[bytes], source: str, until: float | None = None, tenants: list[str | None] | None = None
    ) -> deque[FrameIngest]:
        """Frames drained together: one clock read, one round of wakeups.
        With `until`, a frame holding a large batch is applied SLICE_EVENTS
        events at a time and the work stops once the clock passes `until`:
        what is left (that frame, partly applied, and the ones after it)
        comes back, to `resume()` on the next turn. The ZMQ ingest then
        reports the turn (`ingest_turn()`). `tenants`, one per frame: the
        tenant its sender is bound to (a CURVE certificate's), or None."""
        begin = self.state.begin_frame
        if tenants is None:
            return self.resume(deque([begin(frame, source) for frame in frames]), until)
        return self.resume(deque([begin(f, source, t) for f, t in zip(frames, tenants, strict=True)]), until)

    def resume(self, works: deque[FrameIngest], until: float | None = None) -> deque[FrameIngest]:
        """Apply `works` in order (see `ingest_batch`); returns what is left."""
        now, wall = trio.current_time(), time.time()
        touched: set[str] = set()
        created = False
        step = self.state.ingest_step
        while works:
            work = works[0]  # parsed by its first step, not before
            done = step(work, now, wall, 0 if until is None else SLICE_EVENTS)
            result = work.result
            if result.touched:
                touched |= result.touched
                result.touched.clear()  # taken: woken below
            if result.created:
                created, result.created = True, False
            if done:
                works.popleft()
                if result.rejected:
                    self._log_rejects(result, work.source, now)
            if until is not None and works and trio.current_time() >= until:
                break
        self._wake(touched, created, now)
        return works

    async def ingest_sliced(self, frame: bytes, source: str, tenant: str | None = None) -> IngestResult:
        """`ingest()` for a body that may hold a large batch: applied in
        slices of PASS_SLICE seconds with the loop running in between (into
        `tenant`, the publisher's, when it is authenticated)."""
        work = self.state.begin_frame(frame, source, tenant)
        works = deque([work])
        result = work.result
        while True:
            self.resume(works, trio.current_time() + PASS_SLICE)
            if not works:
                return result
            await trio.lowlevel.checkpoint()

    def ingest_turn(self, backlog: bool, lag: float) -> None:
        """A turn of the ZMQ ingest is over. `backlog` (it stopped at its
        time or batch limit: more is queued) and `lag` (how late it began)
        say whether the broker runs behind, which moves wakes into write
        passes (core/wake.py)."""
        self._enqueue_due(self.schedule.ingest_turn, trio.current_time(), backlog, lag)
        self._flusher_check()  # catching up may have moved a pass earlier

    def ingest_idle(self) -> None:
        """The ZMQ ingest has drained its queue and waits for input: if it
        was behind, it has caught up."""
        self._enqueue_due(self.schedule.ingest_turn, trio.current_time(), False)
        self._flusher_check()

    def _enqueue_due(self, fn: Callable[..., list[str]], *args: Any) -> None:
        """Queue what a schedule call says is due; if that began a write
        pass, remember its keys: it is over when they are all woken."""
        running = self.schedule.pass_running
        keys = fn(*args)
        if not running and self.schedule.pass_running:
            self._pass_left = set(self.schedule.pass_keys)
            self._pass_took = 0.0
        self._enqueue(keys)

    def hold_body_bytes(self, n: int) -> bool:
        """Count `n` more bytes of request bodies being read; False (and
        nothing counted) if that would pass `http.max_pending_body_bytes`."""
        if self.body_bytes + n > self.config.http.max_pending_body_bytes:
            return False
        self.body_bytes += n
        self.body_bytes_peak = max(self.body_bytes_peak, self.body_bytes)
        return True

    def release_body_bytes(self, n: int) -> None:
        self.body_bytes -= n

    def reject_message(self, detail: str, source: str) -> None:
        """Count and log (rate-limited) a message refused before any frame
        of it was parsed (too many parts: server/zmq_ingest.py)."""
        rej = Reject("too_large", detail)
        self.state.record_reject(rej, time.time(), source, b"")
        if self._reject_log.allow(trio.current_time()):
            log.warning("ingest reject (%s): %s: %s", source, rej.reason, rej.detail)

    def _log_rejects(self, result: IngestResult, source: str, now: float) -> None:
        for index, rej in result.rejected:
            if self._reject_log.allow(now):
                log.warning("ingest reject (%s, event %d): %s: %s", source, index, rej.reason, rej.detail)

    def tick(self) -> None:
        now = trio.current_time()
        result = self.state.tick(now, time.time())
        self._wake(result.touched, result.created, now)

    async def serve_ticker(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reorder-window expiry, TTL eviction: run often enough for the window."""
        period = max(0.01, min(0.1, self.state.limits.reorder_window / 5))
        task_status.started()
        while True:
            await trio.sleep(period)
            self.tick()

    # ---------------------------------------------------------------- wakes

    def _wake(self, touched: Iterable[str], created: bool, now: float) -> None:
        if not touched:
            return
        schedule = self.schedule
        keys = schedule.touched(touched, now)
        keys += schedule.touched((JOURNAL,), now)
        since, watched = self._touched_at, schedule.watchers
        for key in touched:
            if key in watched and key not in since:
                since[key] = now
        if JOURNAL in watched and JOURNAL not in since:
            since[JOURNAL] = now
        self._enqueue(keys)
        if created:
            # Rare, and waited on with a deadline: never deferred, first in line.
            if NEW_WORKFLOW not in self._queued:
                self._queued.add(NEW_WORKFLOW)
                self._queue.appendleft(NEW_WORKFLOW)
                self._schedule_changed.set()
        self._flusher_check()

    def _flusher_check(self) -> None:
        """Wake the flusher if a deferred wake is now due before the time
        it sleeps until."""
        due = self.schedule.next_due()
        if due is not None and (self._flusher_due is None or due < self._flusher_due):
            self._schedule_changed.set()

    def _enqueue(self, keys: Iterable[str]) -> None:
        """Hand keys to wake to the flusher, which wakes them in slices with
        the ingest running in between; a key already queued stays where it
        is (one write will carry all it got meanwhile)."""
        queued = self._queued
        added = False
        for key in keys:
            if key not in queued:
                queued.add(key)
                self._queue.append(key)
                added = True
        if added:
            self._schedule_changed.set()

    def _call_listeners(self, key: str) -> None:
        listeners = self._listeners.get(key)
        if not listeners:
            return
        for callback in list(listeners.values()):
            try:
                callback(key)
            except Exception:  # a bug must not take ingest down with it
                log.exception("listener of %r failed", key)

    async def serve_flusher(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver every wake: the keys queued (`_enqueue`), and those the
        schedule deferred when they fall due, `PASS_SLICE` seconds of wakes
        (their direct writes included) at a time, the ingest and the other
        tasks running between slices, so no wake of thousands of writes
        holds the loop. A write pass is over when the queue is empty."""
        task_status.started()
        schedule = self.schedule
        while True:
            if schedule.pass_running and not self._pass_left:  # its keys are all woken
                schedule.end_pass(trio.current_time(), self._pass_took)
            if self._queue:
                self._last_busy = trio.current_time()
                self._release_ends()
                await self._run_slice()
                continue
            if self._ends:
                # Deferred wakes fall due meanwhile too (the queue is empty).
                self._enqueue_due(schedule.expire, trio.current_time())
                if self._queue:
                    continue
                if not self._release_ends():
                    # Busy lately: at the busy rate, unless wakes come first.
                    self._schedule_changed = trio.Event()
                    due = schedule.next_due()
                    until = trio.current_time() + 1 / ENDS_BUSY_RATE
                    with trio.move_on_at(until if due is None else min(due, until)):
                        await self._schedule_changed.wait()
                    continue
                await trio.lowlevel.checkpoint()  # they run; then the next ones
                continue
            due = self._flusher_due = schedule.next_due()
            self._schedule_changed = trio.Event()
            if due is None:
                await self._schedule_changed.wait()
                continue
            with trio.move_on_at(due):
                await self._schedule_changed.wait()
            self._flusher_due = None
            self._enqueue_due(schedule.expire, trio.current_time())

    def _release_ends(self) -> int:
        """Let ended streams tear down (ENDS_IDLE, ENDS_BUSY_RATE); how many."""
        ends = self._ends
        if not ends:
            return 0
        now = trio.current_time()
        behind = self.schedule.behind
        if now - self._last_busy >= ENDS_QUIET and not behind:
            n = ENDS_IDLE
        else:
            rate = ENDS_BEHIND_RATE if behind else ENDS_BUSY_RATE
            tokens = min(ENDS_IDLE, self._end_tokens + (now - self._end_refill) * rate)
            n = int(tokens)
            self._end_tokens = tokens - n
        self._end_refill = now
        n = min(n, len(ends))
        for _ in range(n):
            self._release(ends.popleft())
        return n

    @staticmethod
    def _release(release: Callable[[], None]) -> None:
        try:
            release()
        except Exception:  # a bug must not take the flusher down with it
            log.exception("ending a stream failed")

    def end_later(self, release: Callable[[], None]) -> None:
        """An ended stream's teardown waits for its turn: `release()` is
        called when it comes (ENDS_IDLE, ENDS_BUSY_RATE), so the streams
        still open get their events first. Draining, at once."""
        if self._draining:
            self._release(release)
            return
        self._ends.append(release)
        self._schedule_changed.set()

    async def _run_slice(self) -> None:
        """Wake queued keys, oldest first, for `PASS_SLICE` seconds; then let
        the other tasks run. The wakes of a write pass's keys are timed
        (without the time the ingest ran in between): the next pass waits
        as long. Deferred wakes that fall due meanwhile join the queue."""
        queue, queued, pass_left = self._queue, self._queued, self._pass_left
        since, publish_to_write = self._touched_at, self.metrics.publish_to_write.observe
        began = now = trio.current_time()
        away = 0.0 if self._slice_ended is None else began - self._slice_ended
        until = began + min(max(PASS_SLICE, away), MAX_SLICE)
        while queue and now < until:
            key = queue.popleft()
            queued.discard(key)
            start = now
            self._call_listeners(key)
            now = trio.current_time()
            first = since.pop(key, None)
            if first is not None:  # its subscribers are written (directly) or handed their writes
                publish_to_write(now - first)
            if key in pass_left:
                pass_left.discard(key)
                self._pass_took += now - start
        self._slice_ended = now if queue else None
        await trio.lowlevel.checkpoint()
        self._enqueue_due(self.schedule.expire, trio.current_time())  # during a pass: only fan-out keys

    def listen(self, key: str, token: object, callback: Callable[[str], None], *, subscriber: bool = False) -> None:
        """Call `callback(key)` on every wakeup of `key` (and once when the
        drain starts) until `unlisten(key, token)`; `token` identifies the
        listener. A `subscriber` reads the key's entries: it counts toward
        the key's fan-out interval (core/wake.py), and an unwatched key is
        never woken."""
        listeners = self._listeners.get(key)
        if listeners is None:
            listeners = self._listeners[key] = {}
        token_id = id(token)
        listeners[token_id] = callback
        if subscriber and (key, token_id) not in self._watching:
            self._watching.add((key, token_id))
            self.schedule.watch(key)

    def unlisten(self, key: str, token: object) -> None:
        token_id = id(token)
        listeners = self._listeners.get(key)
        if listeners is not None and listeners.pop(token_id, None) is not None:
            if not listeners:
                del self._listeners[key]
            if (key, token_id) in self._watching:
                self._watching.discard((key, token_id))
                self.schedule.unwatch(key)
                if key not in self.schedule.watchers:
                    self._touched_at.pop(key, None)

    async def wait(self, key: str, timeout: float) -> bool:
        """Wait for new entries under `key` (a workflow id, JOURNAL or
        NEW_WORKFLOW), the start of draining, or `timeout`. True if woken.

        Call it right after a pull that found nothing, with no checkpoint
        in between, so no wakeup can be missed."""
        if self._draining:
            return True
        woken = trio.Event()
        token = object()
        # A subscriber: an unwatched key is never woken (core/wake.py).
        self.listen(key, token, lambda _key: woken.set(), subscriber=True)
        try:
            with trio.move_on_after(timeout):
                await woken.wait()
        finally:
            self.unlisten(key, token)
        return woken.is_set()

    # -------------------------------------------------------- subscriptions

    def open(self, sub: Subscription, principal: Principal, *, waited: bool = False) -> Opened | None:
        """Place `sub` on the state as `principal` may read it
        (core/subscribe.py); None while its workflow is unknown to it.
        `waited`: it was unknown when the stream asked (every event then)."""
        return open_subscription(
            self.state,
            sub,
            principal,
            coalesce_after=self.stream.coalesce_after,
            counters=self.counters,
            stored=self.store is not None,
            waited=waited,
        )

    async def history(self, principal: Principal, wid: str, args: Mapping[str, str]) -> bytes:
        """GET /v1/workflows/{id}/history (core/history.py): from the ring,
        else from the store; another tenant's workflow is an unknown one."""
        q = parse_history_query(args)
        wf = self.state.get(wid)
        store = self.store
        if wf is not None and principal.may_see(wf.tenant, wf.id):
            check_epoch(q, wf.epoch)
            page = from_ring(wf, q.after, q.limit)
            if page is None:
                if store is None:
                    oldest = wf.oldest_cursor_seq()
                    raise InvalidArgument(
                        f"'since' {q.after} is older than the ring; oldest available since is {oldest}"
                    )
                page = await store.entries(wf.id, wf.epoch, wf.tenant, wf.terminal_seq, q.after, q.limit)
            return history_body(wf.epoch, page, q.limit, q.filter)
        if wf is None and store is not None:
            from ..store import pg  # psycopg: only with a store

            # Evicted from memory (terminal past its TTL): the store has it.
            head = await store.call(pg.workflow_head, wid)
            if head is not None and principal.may_see(head[0], wid):
                tenant, epoch, _last, terminal = head
                check_epoch(q, epoch)
                page = await store.entries(wid, epoch, tenant, terminal, q.after, q.limit)
                return history_body(epoch, page, q.limit, q.filter)
        raise NotFound(f"workflow '{wid}' not found")

    async def list_workflows(self, principal: Principal, args: Mapping[str, str]) -> dict[str, Any]:
        """GET /v1/workflows (core/history.py): newest first, from memory or
        with a store from it (live workflows as memory knows them)."""
        q = parse_list_query(args, principal)
        if self.store is None:
            page = list_memory(self.state, q, principal)
        else:
            from ..store import pg  # psycopg: only with a store

            rows = await self.store.call(
                pg.list_workflows,
                tenant=q.tenant,
                states=sorted(q.states) if q.states is not None else None,
                parent=q.parent,
                after=q.after,
                limit=q.limit + 1,
                active=q.active,
            )
            page = merge_stored(self.state, q, principal, rows)
        return list_body(page, q.limit)

    async def fill_history(self, reader: object) -> None:
        """Feed a reader that resumes from before its ring the next page of
        entries from the store (core/reader.py HISTORY); an empty page (the
        store has none, or is down) turns into a `resync`."""
        if not isinstance(reader, WorkflowReader) or not reader.wants_history:
            return
        page = await self.store.history_page(reader.wf, reader.seq) if self.store is not None else []
        self.counters["history_pages"] += 1
        reader.feed(page)

    async def open_when_known(
        self, sub: Subscription, conn: Connection, receive: Callable[[], Awaitable[Any]] | None = None
    ) -> Opened:
        """`open()`, waiting up to `stream.unknown_workflow_wait` for a
        single-workflow subscription's first event (clients subscribe right
        after starting a workflow). NotFound after that, ShuttingDown when
        the drain starts meanwhile, Unavailable if `conn` (admitted for the
        wait) is closed meanwhile (an admin, `limits.per_user`)."""
        principal = conn.principal
        opened = self.open(sub, principal)
        if opened is None:
            conn.watch(None, sub)  # the admins see what it waits for
            async with trio.open_nursery() as watching:
                if receive is not None:  # the client leaving ends the wait (and frees its socket) at once
                    watching.start_soon(_until_disconnect, receive, conn)
                with trio.move_on_after(self.stream.unknown_workflow_wait):
                    while (opened := self.open(sub, principal, waited=True)) is None and not self._draining:
                        if conn.closing:
                            break
                        # A close does not wake this wait: look again every so often.
                        await self.wait(NEW_WORKFLOW, 0.5)
                watching.cancel_scope.cancel()
            if opened is None and conn.closing:  # raised here, not inside the nursery (an ExceptionGroup)
                raise Unavailable("the connection was closed while it waited for its workflow")
        if opened is None:
            if self._draining:
                raise ShuttingDown("the broker is shutting down")
            raise workflow_not_found(sub)
        conn.watch(opened.reader)
        return opened

    # ------------------------------------------------------------- watchdog

    async def serve_watchdog(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mark connections whose current write made no progress for
        stream.slow_consumer_timeout. The stream itself can't act while its
        write is blocked: if the write completes later it sends `error`
        (SSE) or closes 4008 (WS); if it never does, the kernel aborts the
        connection (TCP_USER_TIMEOUT, set on the listening socket in run.py)."""
        timeout = self.stream.slow_consumer_timeout
        period = max(0.05, min(1.0, timeout / 4))
        task_status.started()
        while True:
            await trio.sleep(period)
            horizon = trio.current_time() - timeout
            for conn in self.connections.values():
                started = conn.write_started
                if started is not None and started <= horizon and not conn.slow:
                    conn.slow = True
                    conn.close_reason = "slow_consumer"
                    self.counters["slow_consumer_closed"] += 1
                    self.audit("slow_consumer.closed", conn, detail=f"no write progress for {timeout:g} s")
                    log.info(
                        "connection %d (%s %s): no write progress for %ss: slow consumer",
                        conn.id,
                        conn.transport,
                        conn.remote,
                        timeout,
                        extra=ids(conn.id),
                    )

    def refuse_new(self) -> None:
        """Shutdown, first step: new streams and HTTP publishes get 503 (and
        /readyz says draining) while the ingest applies its last frames;
        open streams go on until `begin_drain`."""
        self._draining = True

    def begin_drain(self) -> None:
        """Shutdown: every stream flushes what it has and ends."""
        self._draining = True
        while self._ends:
            self._release(self._ends.popleft())
        for conn in self.connections.values():
            conn.close_soon("shutdown")
        for key in list(self._listeners):
            self._call_listeners(key)  # waits end; streams see the drain

    # ---------------------------------------------------------- connections

    def check_capacity(self, principal: Principal = ANONYMOUS) -> None:
        """Raise ShuttingDown or LimitReached (503: `limits.global`) or
        ResourceExhausted (429: `limits.per_tenant`) before a stream starts."""
        if self._draining:
            raise ShuttingDown("the broker is shutting down")
        self.table.check(principal)

    def open_connection(self, transport: str, remote: str, path: str, principal: Principal = ANONYMOUS) -> Connection:
        conn = Connection(self.counts, next(self._conn_ids), transport, remote, path, principal)
        if self._draining:
            # The drain began while this stream was being set up (after
            # check_capacity): it must flush and end like the others.
            conn.closing = True
        rate = self.config.limits.events_per_second
        if rate:
            conn.rate, conn.tokens, conn.refilled = float(rate), float(rate), trio.current_time()
        for old in self.table.admit(conn.id, principal):
            self.kick(old, "limits.per_user")  # the user's oldest connection goes
        self.connections[conn.id] = conn
        self.audit("connection.opened", conn, detail=path)
        return conn

    async def request_control(self, principal: Principal, req: ControlRequest, remote: str = "") -> str:
        """Publish a control request (DESIGN §8) for `principal` (from
        `remote`, for the rate of anonymous ones); its request id once sent.
        403 without scope `control`, 503 with no control channel, 404 for
        a workflow it cannot see, 409 once it ended, 429 over the rate."""
        require(principal, "control")
        if self.control is None:
            raise Unavailable("the control channel is not configured on this broker (control.bind)")
        check_request(self.state, principal, req)
        self.control_rate.take(principal.user or f"anonymous@{remote}", trio.current_time())
        request_id = req.request_id or uuid.uuid4().hex
        body = control_body(req, request_id, principal.user, int(time.time() * 1000))
        await self.control.publish(req.workflow_id, body)
        self.counters["control_requests"] += 1
        self.audit(
            "control.requested",
            user=principal.user,
            tenant=principal.tenant,
            remote=remote,
            workflow_id=req.workflow_id,
            detail=f"{req.kind} {request_id}",
        )
        log.info(
            "control %s of %r (task %s) requested by %s (%s): %s",
            req.kind,
            req.workflow_id,
            req.task_id,
            principal.user or "anonymous",
            remote,
            request_id,
            extra=ids(workflow=req.workflow_id),
        )
        return request_id

    def assign(self, conn: Connection, principal: Principal) -> None:
        """The principal of a connection admitted before it said who it is
        (a WebSocket's `auth` message): counted as that principal's from
        now on — ResourceExhausted at `limits.per_tenant` (the caller
        closes it), its user's oldest connection closed at `limits.per_user`."""
        self.table.release(conn.id)
        evict = self.table.admit(conn.id, principal)
        conn.set_principal(principal)
        for old in evict:
            self.kick(old, "limits.per_user")

    def stream_request_ended(self, began: float) -> None:
        """A request to a stream endpoint (SSE or WebSocket, served or
        refused) that began at `began` (trio clock) has ended: its objects
        may be cyclic garbage now (gc_policy.py)."""
        if self.full_collections is not None:
            self.full_collections.ended(began)

    def close_connection(self, conn: Connection) -> None:
        if self.connections.pop(conn.id, None) is not None:
            reason = conn.close_reason or ("token expired" if conn.expired else "ended")
            self.audit("connection.closed", conn, detail=reason)
        self.table.release(conn.id)
        if not self.connections:
            self._no_connections.set()

    async def wait_streams_closed(self) -> None:
        """Wait until no stream is open (used while draining)."""
        while self.connections:
            self._no_connections = trio.Event()
            await self._no_connections.wait()

    def kick(self, conn_id: int, reason: str = "admin") -> bool:
        """Ask a connection to close; False if there is none with that id."""
        conn = self.connections.get(conn_id)
        if conn is None:
            return False
        conn.close_soon(reason)
        return True

    # ---------------------------------------------------------------- audit

    def audit(self, action: str, conn: Connection | None = None, **fields: Any) -> None:
        """Record a security-relevant fact (core/audit.py): the audit ring,
        one log line, and a wake for the admins' audit streams. `conn`
        gives the user, tenant, transport, remote and connection id."""
        if conn is not None:
            p = conn.principal
            fields = {
                "user": p.user,
                "tenant": p.tenant,
                "transport": conn.transport,
                "remote": conn.remote,
                "connection": conn.id,
                **fields,
            }
        self.audit_counts[action] += 1
        entry = self.audit_log.record(action, int(time.time() * 1000), **fields)
        audit_log.info("%s", entry.body.decode())
        self._enqueue(self.schedule.touched((AUDIT,), trio.current_time()))

    def refused(self, err: BrokerError, transport: str, remote: str, principal: Principal | None = None) -> None:
        """Audit a refusal a client was answered with, if it is one of
        security's: no valid token, a missing scope, a limit."""
        if isinstance(err, Unauthenticated):
            action = "auth.failed"
        elif isinstance(err, PermissionDenied):
            action = "access.denied"
        elif isinstance(err, (LimitReached, ResourceExhausted)) and not isinstance(err, SlowConsumer):
            action = "limit.refused"
        else:
            return
        who = principal or ANONYMOUS
        self.audit(action, user=who.user, tenant=who.tenant, transport=transport, remote=remote, detail=err.message)

    # ----------------------------------------------------------- statistics

    def oldest_write_age(self) -> float:
        """Seconds the longest-blocked write in progress has waited (0.0: none)."""
        started = [c.write_started for c in self.connections.values() if c.write_started is not None]
        return trio.current_time() - min(started) if started else 0.0

    def statistics(self) -> HubStatistics:
        wake = self.schedule.statistics()
        return HubStatistics(
            connections=len(self.connections),
            by_transport=MappingProxyType(dict(Counter(c.transport for c in self.connections.values()))),
            listeners=sum(len(v) for v in self._listeners.values()),
            listened_keys=len(self._listeners),
            watched_keys=wake.watched_keys,
            wake_times=wake.wake_times,
            deferred_wakes=wake.deferred,
            behind=wake.behind,
            write_passes=wake.passes,
            deferred_by_load=wake.deferred_by_load,
            delivered=MappingProxyType(dict(self.delivered)),
            streams=MappingProxyType(dict(self.counters)),
            draining=self._draining,
        )

    def stats(self) -> dict[str, Any]:
        """GET /v1/admin/stats."""
        out = self.state.stats()
        st = self.statistics()
        out["connections"] = {
            "total": st.connections,
            "sse": 0,  # each transport, also when none of its kind is open
            "ws": 0,
            **st.by_transport,
            **{k: v for k, v in self.table.counts().items() if k != "total"},
        }
        out["waiters"] = st.listeners
        out["watched_keys"] = st.watched_keys
        out["wakes"] = {
            "deferred": st.deferred_wakes,
            "behind": st.behind,
            "write_passes": st.write_passes,
            "deferred_by_load": st.deferred_by_load,
        }
        out["delivered"] = dict(st.delivered)
        out["streams"] = dict(st.streams)
        out["draining"] = st.draining
        if self.sockets is not None:
            out["sockets"] = {"open": self.sockets.open, "peak": self.sockets.peak, "budget": self.sockets.limit}
        out["request_bodies"] = {"bytes": self.body_bytes, "peak_bytes": self.body_bytes_peak}
        if self.store is not None:
            out["store"] = dataclasses.asdict(self.store.statistics())
        if self.gc_stats is not None:
            out["gc"] = self.gc_stats.to_json()
        if self.full_collections is not None:
            out["gc_freezes"] = self.full_collections.freezes
        curve = self.ingest_curve
        if self.control is not None:
            out["control"] = {"endpoint": self.control.endpoint, "published": self.control.published}
        out["security"] = {
            "auth": self.identity.mode,
            "zmq_curve": curve is not None,
            "zmq_auth_failures": 0 if curve is None else curve.failures,
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
        }
        # What SIGHUP may change, as in force now (run.reload).
        lim = self.config.limits
        out["in_force"] = {
            "limits": {
                "global": lim.global_,
                "per_user": lim.per_user,
                "per_tenant": lim.per_tenant,
                "events_per_second": lim.events_per_second,
            },
            "log_level": logging.getLevelName(logging.getLogger().level).lower(),
        }
        return out


async def _until_disconnect(receive: Callable[[], Awaitable[Any]], conn: Connection) -> None:
    """While a stream waits for its workflow: the client's disconnect
    (after the request, `receive()` returns nothing else) closes it."""
    message = await receive()
    if message.get("type") == "http.disconnect":
        conn.close_soon("client gone")  # the wait sees it within its 0.5 s look
