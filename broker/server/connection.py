"""One open stream (an SSE response or a WebSocket) and its transitions.

A `Connection`'s state changes only through its own methods: `write()`
(slow-consumer bookkeeping and counting around one send), `wrote()` (count
a write made elsewhere: the hub's direct writes), `park()` (wait for the
client until woken or a deadline), `hand_back()` (end a park: the task has
work), `close_soon()` (an admin close or the drain). The hub's watchdog
reads `write_started` and sets `slow`; nothing else writes its fields.

`subs` is what it reads, for the admins (`to_json`) and the metrics: an
SSE stream's one subscription (`watch()`), a WebSocket session's dict of
them (its own, shared). Each has a `reader` once placed, and a `pending`
model while it waits for its workflow.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import trio

from ..core.audit import AuditFilter, AuditReader
from ..core.envelope import LOG_LEVELS
from ..core.errors import SlowConsumer
from ..core.filters import Filter
from ..core.limits import Principal
from ..core.reader import MultiReader, WorkflowReader
from ..core.scope import WORKFLOWS, Scope
from ..core.subscribe import Subscription

T = TypeVar("T")


@dataclass(slots=True)
class ConnectionCounters:
    """What connections count, shared by all of them (the hub's)."""

    delivered: Counter[str] = field(default_factory=Counter)  # events written, by transport
    # writes, direct_writes, direct_partial; the readers add coalesced,
    # resyncs, gaps; the watchdog slow_consumer_closed.
    streams: Counter[str] = field(default_factory=Counter)


async def _call(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


Reader = WorkflowReader | MultiReader | AuditReader
LEVEL_NAMES = {v: k for k, v in LOG_LEVELS.items()}


class Watched(Protocol):
    """A subscription as a connection lists it (ws.WsSubscription is one)."""

    @property
    def reader(self) -> Reader | None: ...

    @property
    def pending(self) -> Subscription | None: ...


class Watch:
    """An SSE stream's one subscription (`Connection.watch`)."""

    __slots__ = ("reader", "pending")

    def __init__(self, reader: Reader | None, pending: Subscription | None = None) -> None:
        self.reader = reader
        self.pending = pending


NO_SUBS: Mapping[str, Watched] = MappingProxyType({})


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _words(values: frozenset[str] | None) -> list[str] | None:
    return None if values is None else sorted(values)


def filter_json(flt: Filter | AuditFilter) -> dict[str, Any]:
    if isinstance(flt, AuditFilter):
        return {"actions": _words(flt.actions), "tenant": flt.tenant, "user": flt.user}
    return {
        "view": flt.view,
        "types": _words(flt.types),
        "tasks": _words(flt.tasks),
        "states": _words(flt.states),
        "level": LEVEL_NAMES.get(flt.min_level),
        "coalesce": flt.coalesce,
    }


def _scope_json(scope: Scope) -> dict[str, Any]:
    return {scope.kind: sorted(scope.ids) if scope.kind == WORKFLOWS else scope.name}


def subscription_json(sub_id: str | None, watched: Watched) -> dict[str, Any]:
    """One subscription for the admins: what it reads (its scope, as the
    subscribe request names it), its filter, its cursor (where it would
    resume: what it has read so far), how far behind it is (`lag`: events
    of its workflow, or journal entries, not read yet) and whether it
    still waits for its workflow."""
    reader, pending = watched.reader, watched.pending
    out: dict[str, Any] = {"id": sub_id}
    if reader is None:
        assert pending is not None
        cursor = pending.cursor
        since = None if cursor.since is None else str(cursor.since)
        out.update(_scope_json(pending.scope))
        out.update(filter=filter_json(pending.filter), cursor=cursor.resume or since, lag=0, waiting=True)
        return out
    if isinstance(reader, WorkflowReader):
        out["workflow"] = reader.wf.id
    elif isinstance(reader, MultiReader):
        out.update(_scope_json(reader.scope))
    else:
        out["audit"] = True
    out.update(filter=filter_json(reader.filter), cursor=reader.resume_cursor, lag=reader.behind, waiting=False)
    return out


class Connection:
    """One open stream (an SSE response or a WebSocket)."""

    # One per open stream: no per-instance dict.
    __slots__ = (
        "id",
        "transport",
        "remote",
        "path",
        "opened",
        "principal",
        "expires_at",
        "delivered",
        "last_event",
        "subs",
        "closing",
        "close_reason",
        "write_started",
        "slow",
        "rate",
        "tokens",
        "refilled",
        "wake",
        "woken",
        "last_write",
        "_counters",
    )

    def __init__(
        self,
        counters: ConnectionCounters,
        conn_id: int,
        transport: str,
        remote: str,
        path: str,
        principal: Principal,
    ) -> None:
        self._counters = counters
        self.id = conn_id
        self.transport = transport  # "sse" or "ws"
        self.remote = remote
        self.path = path
        self.opened = time.time()
        self.principal = principal
        self.expires_at = math.inf  # trio clock: when its token expires (set_principal)
        self.set_principal(principal)
        self.delivered = 0
        self.last_event: float | None = None  # trio clock: its last write of events
        self.subs: Mapping[str, Watched] = NO_SUBS  # what it reads (the module docstring)
        # An admin's DELETE or the drain: the stream flushes and closes (SSE
        # without `end`, so the client reconnects with its cursor; WS 1000
        # or 1001).
        self.closing = False
        self.close_reason = ""  # why the broker closes it (audit): admin, limits.per_user, …
        # Slow consumers (DESIGN §6): when the current write started (trio
        # clock), None between writes; `slow` once a write made no progress
        # for stream.slow_consumer_timeout (set by the hub's watchdog).
        self.write_started: float | None = None
        self.slow = False
        # limits.events_per_second: a token bucket (rate 0 = unlimited).
        self.rate = 0.0
        self.tokens = 0.0
        self.refilled = 0.0
        # While parked: the scope `hand_back()` cancels, and whether it did.
        self.wake: trio.CancelScope | None = None
        self.woken = False
        self.last_write = trio.current_time()  # keepalive timing

    def set_principal(self, principal: Principal) -> None:
        """Who it is (at open, or a WebSocket `auth` refresh); it is closed
        when the token expires (DESIGN §7)."""
        self.principal = principal
        if principal.expires is None:
            self.expires_at = math.inf
        else:
            self.expires_at = trio.current_time() + (principal.expires - time.time())

    @property
    def expired(self) -> bool:
        return trio.current_time() >= self.expires_at

    # --------------------------------------------------------------- writes

    async def write(self, send: Callable[[T], Awaitable[None]], message: T, events: int = 0) -> None:
        """One write of `events` messages through `send`. Raises
        SlowConsumer if it made no progress for stream.slow_consumer_timeout
        but went through after all (the stream then says why it closes)."""
        self.write_started = trio.current_time()
        try:
            await send(message)
        finally:
            self.write_started = None
        self.last_write = trio.current_time()
        self.wrote(events)
        if self.slow:
            raise SlowConsumer("slow consumer: writes made no progress")

    def wrote(self, events: int, *, direct: bool = False) -> None:
        """Count a write of `events` messages (`direct`: made by the hub
        straight to the socket, server/direct.py)."""
        counters = self._counters
        if events:
            self.last_event = self.last_write
            self.delivered += events
            counters.delivered[self.transport] += events
            counters.streams["writes"] += 1
        if direct:
            counters.streams["direct_writes"] += 1

    async def write_leftover(self, flush: Callable[[], Awaitable[None]]) -> None:
        """Send what a direct write left over, the blocking way."""
        self._counters.streams["direct_partial"] += 1
        await self.write(_call, flush)

    # ---------------------------------------------------------------- waits

    async def park(self, deadline: float, receive: Callable[[], Awaitable[T]]) -> T | None:
        """Wait for the client's next message until `deadline` or until
        `hand_back()`: the message, or None (then `woken` says which)."""
        self.woken = False
        if self.closing:
            self.woken = True
            return None
        scope = self.wake = trio.CancelScope(deadline=deadline)
        try:
            with scope:
                return await receive()
        finally:
            self.wake = None
        return None

    def hand_back(self) -> None:
        """End a `park()` of this connection: its task has work to do."""
        if self.wake is not None:
            self.woken = True
            self.wake.cancel()

    def close_soon(self, reason: str = "") -> None:
        """An admin close or the drain: the stream flushes what it has and ends."""
        self.closing = True
        self.close_reason = self.close_reason or reason
        self.hand_back()

    @property
    def parked(self) -> bool:
        return self.wake is not None

    # --------------------------------------------------------------- pacing

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

    # ---------------------------------------------------------------- admin

    def watch(self, reader: Reader | None, pending: Subscription | None = None) -> None:
        """An SSE stream's subscription: waiting for its workflow
        (`pending`), then placed (`reader`)."""
        self.subs = {"": Watch(reader, pending)}

    def blocked(self, now: float) -> float:
        """Seconds its current write has been blocked (0.0: none)."""
        started = self.write_started
        return 0.0 if started is None else now - started

    def to_json(self) -> dict[str, Any]:
        """GET /v1/admin/connections: who, from where, since when, what it
        reads and how far behind it is."""
        now, wall = trio.current_time(), time.time()
        p = self.principal
        subs = [subscription_json(sub_id or None, w) for sub_id, w in self.subs.items()]
        last = self.last_event
        return {
            "id": self.id,
            "transport": self.transport,
            "principal": {"user": p.user, "tenant": p.tenant},
            "user": p.user,  # also at the top, as before the principal was
            "tenant": p.tenant,
            "remote": self.remote,
            "path": self.path,
            "opened": _iso(self.opened),
            "subscriptions": subs,
            "delivered": self.delivered,
            "last_event": None if last is None else _iso(wall - (now - last)),
            "lag": sum(s["lag"] for s in subs),
            "blocked": round(self.blocked(now), 3),
            "slow": self.slow,
            "closing": self.closing,
        }
