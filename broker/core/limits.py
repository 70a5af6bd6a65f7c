"""Who a connection belongs to, and the connection limits (DESIGN.md §6).

`Principal` is the one identity abstraction: `ANONYMOUS` with
auth.mode = "none" (may do everything), else a verified token's holder
(user = `sub`, tenant = `tenant` claim, and the token's `Grant`: scopes and
`workflows` claim), built in one place, the server's `principal_of()`.

`ConnectionTable.admit()` decides, for a new connection:

- `limits.global` reached → `LimitReached` (HTTP 503; WS closes 4029);
- the principal's tenant at `limits.per_tenant` → `ResourceExhausted` (429);
- the principal's user at `limits.per_user` → admitted, and the ids of that
  user's oldest connections to close are returned (the newest wins: a user
  who opens a new tab keeps working).

Anonymous principals have no user or tenant identity: only the global limit
applies to them.

`SocketBudget` counts every accepted socket (streams, plain requests, idle
keep-alive connections, connections that never send a request) against a
budget below the process's open-file limit; `budget_for()` sizes it and
checks `limits.global` against it. Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice

from .claims import Grant
from .errors import LimitReached, ResourceExhausted


@dataclass(frozen=True)
class Principal:
    user: str | None = None
    tenant: str | None = None
    grant: Grant | None = None  # None: no authentication, nothing is restricted
    expires: float | None = None  # the token's `exp` (wall-clock seconds)

    @property
    def anonymous(self) -> bool:
        return self.user is None and self.tenant is None

    @classmethod
    def of(cls, grant: Grant, expires: float | None = None) -> Principal:
        return cls(grant.user, grant.tenant, grant, expires)

    def has(self, scope: str) -> bool:
        """Whether it holds `scope` (subscribe, publish, control, admin)."""
        return self.grant is None or self.grant.has(scope)

    def may_see(self, tenant: str, workflow_id: str) -> bool:
        return self.grant is None or self.grant.may_see(tenant, workflow_id)


ANONYMOUS = Principal()
# A connection admitted before it said who it is (a WebSocket waiting for
# its `auth` message): counted against `limits.global`, allowed nothing.
UNIDENTIFIED = Principal(grant=Grant("", "", frozenset(), frozenset()))


class ConnectionTable:
    def __init__(self, *, global_limit: int, per_user: int, per_tenant: int) -> None:
        self.global_limit = global_limit
        self.per_user = per_user
        self.per_tenant = per_tenant
        self._owner: dict[int, Principal] = {}
        # Per user: connection ids, oldest first.
        self._by_user: dict[str, OrderedDict[int, None]] = {}
        self._by_tenant: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def check(self, principal: Principal) -> None:
        """Raise if a new connection of `principal` would be refused."""
        if len(self._owner) >= self.global_limit:
            raise LimitReached(f"connection limit reached ({self.global_limit})")
        tenant = principal.tenant
        if tenant is not None and self._by_tenant.get(tenant, 0) >= self.per_tenant:
            raise ResourceExhausted(f"tenant connection limit reached ({self.per_tenant})")

    def admit(self, conn_id: int, principal: Principal) -> list[int]:
        """Register a connection; return the ids of connections to close."""
        self.check(principal)
        self._owner[conn_id] = principal
        if principal.tenant is not None:
            self._by_tenant[principal.tenant] = self._by_tenant.get(principal.tenant, 0) + 1
        evict: list[int] = []
        if principal.user is not None:
            conns = self._by_user.setdefault(principal.user, OrderedDict())
            conns[conn_id] = None
            # Evicted ones stay counted until they leave through release(), so
            # a burst of new connections evicts successively older ones.
            evict = list(islice(conns, max(0, len(conns) - self.per_user)))
        return evict

    def release(self, conn_id: int) -> None:
        principal = self._owner.pop(conn_id, None)
        if principal is None:
            return
        if principal.tenant is not None:
            left = self._by_tenant[principal.tenant] - 1
            if left:
                self._by_tenant[principal.tenant] = left
            else:
                del self._by_tenant[principal.tenant]
        if principal.user is not None:
            conns = self._by_user[principal.user]
            conns.pop(conn_id, None)
            if not conns:
                del self._by_user[principal.user]

    def counts(self) -> dict[str, object]:
        return {
            "total": len(self._owner),
            "users": {u: len(c) for u, c in self._by_user.items()},
            "tenants": dict(self._by_tenant),
        }


# File descriptors kept out of the socket budget: the ZMQ context and its
# sockets, the listening sockets, epoll, logs, the store's connections.
FD_RESERVE = 64
# Sockets kept for plain requests (health checks, admin, ingest) even when
# `limits.global` streams are open.
PLAIN_HEADROOM = 32


class SocketBudget:
    """Open accepted sockets against a limit: accept only while `has_room()`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.peak = 0

    def has_room(self) -> bool:
        return self.open < self.limit

    def opened(self) -> None:
        self.open += 1
        if self.open > self.peak:
            self.peak = self.open

    def closed(self) -> None:
        self.open -= 1


@dataclass(frozen=True)
class Budget:
    sockets: int  # accepted sockets at most (SocketBudget's limit)
    global_limit: int  # limits.global as it can be honoured
    lowered: bool  # global_limit is below the configured one


def budget_for(nofile: int, global_limit: int) -> Budget:
    """The socket budget an open-file limit of `nofile` allows, and the
    `limits.global` (streams) it can honour: every stream is a socket, and
    plain requests keep PLAIN_HEADROOM of their own."""
    sockets = max(1, nofile - FD_RESERVE)
    honoured = max(1, sockets - PLAIN_HEADROOM)
    if global_limit <= honoured:
        return Budget(sockets, global_limit, False)
    return Budget(sockets, honoured, True)
