"""The trio side of the core: wakeups, connections, draining.

`Hub` wraps the sans-io `BrokerState`. Ingest adapters call `hub.ingest()`;
it applies the frame and wakes exactly the subscribers of the workflows that
got new entries (one `trio.Event` per watched workflow, one for the journal,
one for "a workflow appeared"). Subscribers never hold copies of events:
they wake, pull from the rings through their reader, write, and wait again.

Waiter events are created on demand and removed as soon as nobody waits on
them, so connect/disconnect cycles leave nothing behind.

Everything here runs in the one trio thread; no locks are needed.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..config import Config
from ..core.errors import Unavailable
from ..core.limits import ANONYMOUS, ConnectionTable, Principal
from ..core.state import BrokerState, IngestResult, Limits
from .gc_policy import FullCollections, GcStats

log = logging.getLogger("broker.hub")

# Seconds of broker CPU one subscriber write costs, with headroom (a direct
# write measured ≈ 8 µs on the 2-core bench machine, one through the HTTP
# stack ≈ 95 µs): sets how often a busy workflow may wake its subscribers
# (see Hub._wake_key).
WRITE_COST = 20e-6

JOURNAL = "\x00journal"  # waiter key of multi-workflow streams
NEW_WORKFLOW = "\x00new"  # waiter key of streams waiting for an unknown workflow


def limits_from_config(config: Config) -> Limits:
    b = config.buffer
    return Limits(
        ring_events=b.ring_events,
        ring_bytes=b.ring_bytes,
        journal_events=b.journal_events,
        journal_bytes=b.journal_bytes,
        max_tasks=b.max_tasks,
        max_workflows=b.max_workflows,
        terminal_ttl=float(b.terminal_ttl),
        reorder_window=config.order.reorder_window_ms / 1000.0,
        dedup_window=config.order.dedup_window,
        max_frame_bytes=config.ingest.max_frame_bytes,
    )


@dataclass(slots=True)  # one per open stream: no per-instance dict
class Connection:
    id: int
    transport: str  # "sse" or "ws"
    remote: str
    path: str
    opened: float
    principal: Principal = ANONYMOUS
    delivered: int = 0
    subscriptions: int = 0
    # Set by an admin's DELETE: the stream flushes and closes (SSE without
    # `end`, so the client reconnects with its cursor; WS with 1000).
    closing: bool = False
    wait_key: str = ""
    # Slow consumers (DESIGN §6): when the current write started (trio
    # clock), None between writes; `slow` once a write made no progress for
    # stream.slow_consumer_timeout (set by the hub's watchdog).
    write_started: float | None = None
    slow: bool = False
    # limits.events_per_second: a token bucket (rate 0 = unlimited).
    rate: float = 0.0
    tokens: float = 0.0
    refilled: float = 0.0
    # While parked (Hub.park): the hub calls `deliver()` when the key has
    # new entries (it pulls and writes directly; False = the task must take
    # over) and cancels `wake` to hand the connection back to its task.
    deliver: Callable[[], bool] | None = None
    wake: trio.CancelScope | None = None
    woken: bool = False
    last_write: float = 0.0  # trio clock of the last write (keepalive timing)

    def hand_back(self) -> None:
        """End a `Hub.park` of this connection: its task has work to do."""
        if self.wake is not None:
            self.woken = True
            self.wake.cancel()

    async def pace(self, sent: int) -> None:
        """After a write of `sent` events, wait as limits.events_per_second
        requires. The reader keeps its place meanwhile: what piles up is
        coalesced (or becomes a resync) on the next write, never queued."""
        pause = self.pace_delay(sent)
        if pause:
            await trio.sleep(pause)

    def pace_delay(self, sent: int) -> float:
        """Take `sent` events from the token bucket; the seconds to wait
        before the next write (0.0: none)."""
        if not self.rate:
            return 0.0
        now = trio.current_time()
        self.tokens = min(self.rate, self.tokens + (now - self.refilled) * self.rate) - sent
        self.refilled = now
        if self.tokens < 0:
            self.tokens = max(self.tokens, -self.rate)  # at most a second of debt
            return -self.tokens / self.rate
        return 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "transport": self.transport,
            "remote": self.remote,
            "path": self.path,
            "opened": int(self.opened * 1000),
            "delivered": self.delivered,
            "subscriptions": self.subscriptions,
            "slow": self.slow,
        }


@dataclass
class _RateLimitedLog:
    """At most `burst` reject log lines per `period`; the rest are summed."""

    period: float = 10.0
    burst: int = 10
    window_start: float = 0.0
    logged: int = 0
    suppressed: int = 0

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
        self.state = state or BrokerState(config.node.id, limits_from_config(config))
        self._waiters: dict[str, trio.Event] = {}
        self._parked: dict[str, dict[int, Connection]] = {}  # key -> parked connections
        # key -> callbacks of subscriptions listening on it (WebSocket; see listen())
        self._listeners: dict[str, dict[int, Callable[[str], None]]] = {}
        self.watchers: Counter[str] = Counter()  # subscribers per wait key
        self._last_wake: dict[str, float] = {}
        self._deferred: dict[str, float] = {}  # key -> when its wakeup is due
        self._deferred_changed = trio.Event()
        self.connections: dict[int, Connection] = {}
        lim = config.limits
        self.table = ConnectionTable(
            global_limit=getattr(lim, "global"),  # a Python keyword, hence getattr
            per_user=lim.per_user,
            per_tenant=lim.per_tenant,
        )
        self._conn_ids = itertools.count(1)
        self.delivered: Counter[str] = Counter()  # events written, by transport
        self.counters: Counter[str] = Counter()  # stream-side counters
        self.draining = False
        self._no_connections = trio.Event()
        self._reject_log = _RateLimitedLog()
        self.ingest_endpoint = ""
        self.gc_stats: GcStats | None = None  # set by run.serve (gc_policy)
        self.full_collections: FullCollections | None = None  # ditto: counts ended stream requests

    # --------------------------------------------------------------- ingest

    def ingest(self, frame: bytes, source: str) -> IngestResult:
        result = self.state.ingest_frame(frame, time.monotonic(), source, time.time())
        if result.rejected:
            self._log_rejects(result, source)
        self._wake(result)
        return result

    def ingest_batch(self, frames: list[bytes], source: str) -> None:
        """Ingest frames drained together: one clock read, one round of wakeups."""
        now, wall = time.monotonic(), time.time()
        touched: set[str] = set()
        created = False
        ingest = self.state.ingest_frame
        for frame in frames:
            result = ingest(frame, now, source, wall)
            if result.rejected:
                self._log_rejects(result, source)
            touched |= result.touched
            created = created or result.created
        self._wake(IngestResult(touched=touched, created=created))

    def _log_rejects(self, result: IngestResult, source: str) -> None:
        now = time.monotonic()
        for index, rej in result.rejected:
            if self._reject_log.allow(now):
                log.warning("ingest reject (%s, event %d): %s: %s", source, index, rej.reason, rej.detail)

    def tick(self) -> None:
        self._wake(self.state.tick(time.monotonic(), time.time()))

    async def serve_ticker(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reorder-window expiry, TTL eviction: run often enough for the window."""
        period = max(0.01, min(0.1, self.state.limits.reorder_window / 5))
        task_status.started()
        while True:
            await trio.sleep(period)
            self.tick()

    def _wake(self, result: IngestResult) -> None:
        if not result.touched:
            return
        now = trio.current_time()
        for wid in result.touched:
            self._wake_key(wid, now)
        self._wake_key(JOURNAL, now)
        if result.created:
            self._wake_key(NEW_WORKFLOW, now)

    def _wake_key(self, key: str, now: float) -> None:
        """Wake the waiters of `key`, at most once per its wake interval.

        Every wakeup costs one write per subscriber (a syscall each: about
        20 µs here, profiled), so a workflow with many subscribers is woken
        at most every `watchers × WRITE_COST` seconds: events arriving in
        between go out together in the next write. With few subscribers the
        interval is a fraction of a millisecond, i.e. no batching at all."""
        ev = self._waiters.get(key)
        parked = self._parked.get(key)
        listeners = self._listeners.get(key)
        if ev is None and not parked and not listeners:
            return
        interval = self.watchers.get(key, 0) * WRITE_COST
        last = self._last_wake.get(key)
        if last is None or now - last >= interval:
            if ev is not None:
                del self._waiters[key]
                ev.set()
            if parked:
                self._deliver(parked)
            if listeners:
                self._notify(key, listeners)
            self._last_wake[key] = now
        elif key not in self._deferred:
            self._deferred[key] = last + interval
            self._deferred_changed.set()

    async def serve_flusher(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver the wakeups deferred by `_wake_key` when they fall due."""
        task_status.started()
        while True:
            if not self._deferred:
                self._deferred_changed = trio.Event()
                await self._deferred_changed.wait()
                continue
            due = min(self._deferred.values())
            self._deferred_changed = trio.Event()
            with trio.move_on_at(due):
                await self._deferred_changed.wait()
            now = trio.current_time()
            for key, at in list(self._deferred.items()):
                if at <= now:
                    del self._deferred[key]
                    self._last_wake.pop(key, None)
                    self._wake_key(key, now)
            # Forget wake times nobody needs any more (bounded memory).
            if len(self._last_wake) > 4 * len(self.watchers) + 1024:
                horizon = now - 1.0
                for key in [k for k, t in self._last_wake.items() if t < horizon]:
                    del self._last_wake[key]

    def watch(self, key: str) -> None:
        """A subscriber starts reading `key` (counts toward its wake interval)."""
        self.watchers[key] += 1

    def unwatch(self, key: str) -> None:
        left = self.watchers[key] - 1
        if left > 0:
            self.watchers[key] = left
        else:
            del self.watchers[key]
            # Nobody reads it: its wake interval is 0, its last wake moot
            # (and workflows come and go: the map must not grow with them).
            self._last_wake.pop(key, None)

    # ---------------------------------------------------------------- waits

    def listen(self, key: str, token: object, callback: Callable[[str], None]) -> None:
        """Call `callback(key)` on every wakeup of `key` until `unlisten`:
        a subscription that is not a task (WebSocket) hears of new entries
        this way and needs no wait of its own. `token` identifies it."""
        listeners = self._listeners.get(key)
        if listeners is None:
            listeners = self._listeners[key] = {}
        listeners[id(token)] = callback

    def unlisten(self, key: str, token: object) -> None:
        listeners = self._listeners.get(key)
        if listeners is not None:
            listeners.pop(id(token), None)
            if not listeners:
                del self._listeners[key]

    @staticmethod
    def _notify(key: str, listeners: dict[int, Callable[[str], None]]) -> None:
        for callback in list(listeners.values()):
            try:
                callback(key)
            except Exception:  # a bug must not take ingest down with it
                log.exception("listener of %r failed", key)

    @staticmethod
    def _deliver(parked: dict[int, Connection]) -> None:
        """Write new entries to parked connections right here (no task
        switch per subscriber); hand back those that need their task."""
        for conn in list(parked.values()):
            try:
                ok = conn.deliver()  # type: ignore[misc]
            except Exception:  # a bug must not take ingest down with it
                log.exception("connection %d: direct delivery failed", conn.id)
                ok = False
            if not ok:
                del parked[conn.id]
                conn.hand_back()

    async def park(self, conn: Connection, key: str, timeout: float, receive: Any) -> bool | None:
        """Like `wait()`, for a stream whose `conn.deliver` can write
        directly: while parked, the hub delivers new entries under `key`
        itself. Returns True when the task has work (a delivery handed the
        stream back: bytes left over, the stream ended, no direct socket;
        an admin close; draining), False after `timeout`, None when the
        client disconnected (the wait is on the request's ASGI `receive`).

        Same rule as `wait()`: call it right after a `pull()` that returned
        nothing, with no checkpoint in between."""
        if self.draining or conn.closing:
            return True
        parked = self._parked.get(key)
        if parked is None:
            parked = self._parked[key] = {}
        parked[conn.id] = conn
        conn.woken = False
        conn.wake = trio.CancelScope(deadline=trio.current_time() + timeout)
        try:
            with conn.wake:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
        finally:
            conn.wake = None
            parked.pop(conn.id, None)
            if not parked and self._parked.get(key) is parked:
                del self._parked[key]
        return conn.woken

    async def wait(self, key: str, timeout: float) -> bool:
        """Wait for new entries under `key` (a workflow id, JOURNAL or
        NEW_WORKFLOW), the start of draining, or `timeout`. True if woken.

        Call it right after a `pull()` that returned nothing, with no
        checkpoint in between, so no wakeup can be missed.
        """
        if self.draining:
            return True
        ev = self._waiters.get(key)
        if ev is None:
            ev = self._waiters[key] = trio.Event()
        try:
            with trio.move_on_after(timeout):
                await ev.wait()
                return True
            return False
        finally:
            if not ev.is_set() and ev.statistics().tasks_waiting == 0 and self._waiters.get(key) is ev:
                del self._waiters[key]

    async def serve_watchdog(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mark connections whose current write made no progress for
        stream.slow_consumer_timeout. The stream itself can't act while its
        write is blocked: if the write completes later it sends `error`
        (SSE) or closes 4008 (WS); if it never does, the kernel aborts the
        connection (TCP_USER_TIMEOUT, set on the listening socket in run.py)."""
        timeout = float(self.config.stream.slow_consumer_timeout)
        period = max(0.05, min(1.0, timeout / 4))
        task_status.started()
        while True:
            await trio.sleep(period)
            horizon = trio.current_time() - timeout
            for conn in self.connections.values():
                started = conn.write_started
                if started is not None and started <= horizon and not conn.slow:
                    conn.slow = True
                    self.counters["slow_consumer_closed"] += 1
                    log.info(
                        "connection %d (%s %s): no write progress for %ss: slow consumer",
                        conn.id,
                        conn.transport,
                        conn.remote,
                        timeout,
                    )

    def begin_drain(self) -> None:
        """Shutdown: every stream flushes what it has and ends."""
        self.draining = True
        for conn in self.connections.values():
            conn.closing = True  # streams check it once handed back
            conn.hand_back()
        for ev in self._waiters.values():
            ev.set()
        self._waiters.clear()

    # ---------------------------------------------------------- connections

    def check_capacity(self, principal: Principal = ANONYMOUS) -> None:
        """Raise Unavailable (503: shutting down, `limits.global`) or
        ResourceExhausted (429: `limits.per_tenant`) before a stream starts."""
        if self.draining:
            raise Unavailable("the broker is shutting down")
        self.table.check(principal)

    def open_connection(self, transport: str, remote: str, path: str, principal: Principal = ANONYMOUS) -> Connection:
        conn = Connection(next(self._conn_ids), transport, remote, path, time.time(), principal)
        rate = float(self.config.limits.events_per_second)
        if rate:
            conn.rate, conn.tokens, conn.refilled = rate, rate, trio.current_time()
        for old in self.table.admit(conn.id, principal):
            self.kick(old)  # limits.per_user: the user's oldest connection goes
        self.connections[conn.id] = conn
        return conn

    def stream_request_ended(self) -> None:
        """A request to a stream endpoint (SSE or WebSocket, served or
        refused) has ended: its objects may be cyclic garbage now."""
        if self.full_collections is not None:
            self.full_collections.closed += 1

    def close_connection(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        self.table.release(conn.id)
        if not self.connections:
            self._no_connections.set()

    async def wait_streams_closed(self) -> None:
        """Wait until no stream is open (used while draining)."""
        while self.connections:
            self._no_connections = trio.Event()
            await self._no_connections.wait()

    def kick(self, conn_id: int) -> bool:
        """Ask a connection to close; False if there is none with that id."""
        conn = self.connections.get(conn_id)
        if conn is None:
            return False
        conn.closing = True
        conn.hand_back()
        ev = self._waiters.pop(conn.wait_key, None)
        if ev is not None:
            ev.set()  # the others woken with it find nothing new and wait again
        return True

    def stats(self) -> dict[str, Any]:
        out = self.state.stats()
        by_transport = Counter(c.transport for c in self.connections.values())
        out["connections"] = {
            "total": len(self.connections),
            **by_transport,
            **{k: v for k, v in self.table.counts().items() if k != "total"},
        }
        out["waiters"] = (
            len(self._waiters)
            + sum(len(p) for p in self._parked.values())
            + sum(len(w) for w in self._listeners.values())
        )
        out["watched_keys"] = len(self.watchers)
        out["delivered"] = dict(self.delivered)
        out["streams"] = dict(self.counters)
        out["draining"] = self.draining
        if self.gc_stats is not None:
            out["gc"] = self.gc_stats.to_json()
        return out
