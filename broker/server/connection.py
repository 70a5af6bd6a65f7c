"""One open stream (an SSE response or a WebSocket) and its transitions.

A `Connection`'s state changes only through its own methods: `write()`
(slow-consumer bookkeeping and counting around one send), `wrote()` (count
a write made elsewhere: the hub's direct writes), `park()` (wait for the
client until woken or a deadline), `hand_back()` (end a park: the task has
work), `close_soon()` (an admin close or the drain). The hub's watchdog
reads `write_started` and sets `slow`; nothing else writes its fields.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ..core.errors import SlowConsumer
from ..core.limits import Principal

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
        "subscriptions",
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
        self.subscriptions = 0
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

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "transport": self.transport,
            "remote": self.remote,
            "path": self.path,
            "user": self.principal.user,
            "tenant": self.principal.tenant,
            "opened": int(self.opened * 1000),
            "delivered": self.delivered,
            "subscriptions": self.subscriptions,
            "slow": self.slow,
        }
