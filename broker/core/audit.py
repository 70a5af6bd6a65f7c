"""The audit stream (DESIGN.md §7): one message per security-relevant fact,
kept in a bounded ring so an admin's stream resumes like any other.

- `AuditLog.record()` appends a fact (`ACTIONS`; fields `ts`, `action`,
  `user`, `tenant`, `transport`, `remote`, `connection`, `workflow_id`,
  `detail`, null where none applies), encoded once.
- `AuditReader` is what one admin stream reads: the facts after its cursor
  that pass its filter (`actions`, `tenant`, `user`). A fresh stream starts
  at the head (live); a cursor `<epoch>.<offset>` this log handed out
  resumes right after it; one fallen off the ring gets a `gap` (how many
  facts were lost) and continues with the oldest kept; one of another
  epoch, malformed or ahead of the head is answered as fresh, after a
  `gap` with an unknown count (`missed` null).

Pure: no I/O, no clock (`ts` is passed in).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .entry import dumps_exact
from .errors import InvalidArgument
from .ring import Ring

ACTIONS = (
    "connection.opened",
    "connection.closed",
    "auth.failed",
    "access.denied",
    "limit.refused",
    "slow_consumer.closed",
    "admin.connection_closed",
    "control.requested",
    "zmq.auth_failed",
    "config.reloaded",
)
FIELDS = ("user", "tenant", "transport", "remote", "connection", "workflow_id", "detail")
MAX_DETAIL = 512


class AuditEntry:
    """One fact: its body (JSON, encoded once) and SSE frame."""

    __slots__ = ("offset", "action", "user", "tenant", "body", "cursor", "size", "seq", "_sse")

    def __init__(self, epoch: str, offset: int, body: dict[str, Any]) -> None:
        self.offset = offset
        self.seq = offset  # the ring's order key
        self.action: str = body["action"]
        self.user: str | None = body["user"]
        self.tenant: str | None = body["tenant"]
        self.cursor = f"{epoch}.{offset}"
        # Exact size: the ring holds thousands (orjson's own buffer is 4 KiB or more).
        self.body = dumps_exact({"kind": "audit", "cursor": self.cursor, **body})
        self.size = len(self.body) * 2 + 200
        self._sse: bytes | None = None

    @property
    def kind(self) -> str:
        return "audit"

    @property
    def ws_body(self) -> bytes:
        """The body without its `cursor`: a WebSocket message of one fact
        carries the cursor on the outside, beside `sub` (once, not twice)."""
        return _without_cursor(self.body, b'{"kind":"audit",', self.cursor)

    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = b"id: %s\nevent: audit\ndata: %s\n\n" % (self.cursor.encode(), self.body)
        return self._sse


class AuditGap:
    """Facts a reader could not get (fallen off the ring, or unknown)."""

    __slots__ = ("body", "cursor")

    kind = "gap"

    def __init__(self, cursor: str, missed: int | None) -> None:
        self.cursor = cursor
        self.body = orjson.dumps({"kind": "gap", "cursor": cursor, "missed": missed})

    @property
    def ws_body(self) -> bytes:
        return _without_cursor(self.body, b'{"kind":"gap",', self.cursor)

    def sse(self) -> bytes:
        return b"id: %s\nevent: gap\ndata: %s\n\n" % (self.cursor.encode(), self.body)


def _without_cursor(body: bytes, head: bytes, cursor: str) -> bytes:
    """`body` as built above (`head`, then `"cursor":"<cursor>",`) without
    that key: a cursor holds no character JSON escapes."""
    key = b'"cursor":"' + cursor.encode() + b'",'
    assert body.startswith(head + key), body[:80]
    return head + body[len(head) + len(key) :]


class AuditLog:
    def __init__(self, epoch: str, ring_events: int = 10000) -> None:
        self.epoch = epoch
        self.ring: Ring[AuditEntry] = Ring(ring_events, None)
        self.recorded = 0

    def record(self, action: str, ts_ms: int, **fields: Any) -> AuditEntry:
        """Append one fact; `fields` among FIELDS (the rest null)."""
        assert action in ACTIONS, action
        body: dict[str, Any] = {"ts": ts_ms, "action": action}
        for key in FIELDS:
            value = fields.get(key)
            if key == "detail" and isinstance(value, str) and len(value) > MAX_DETAIL:
                value = value[:MAX_DETAIL] + "…"
            body[key] = value
        entry = AuditEntry(self.epoch, self.ring.next_index + 1, body)
        self.ring.append(entry)
        self.recorded += 1
        return entry

    @property
    def head_cursor(self) -> str:
        return f"{self.epoch}.{self.ring.next_index}"


@dataclass(frozen=True, slots=True)
class AuditFilter:
    actions: frozenset[str] | None = None
    tenant: str | None = None
    user: str | None = None

    def matches(self, e: AuditEntry) -> bool:
        return (
            (self.actions is None or e.action in self.actions)
            and (self.tenant is None or e.tenant == self.tenant)
            and (self.user is None or e.user == self.user)
        )

    @classmethod
    def parse(cls, actions: Iterable[str] | None, tenant: object, user: object) -> AuditFilter:
        chosen = None
        if actions is not None:
            chosen = frozenset(actions)
            unknown = chosen - set(ACTIONS)
            if unknown or not chosen:
                bad = sorted(unknown)[0][:64] if unknown else ""
                raise InvalidArgument(f"unknown audit action {bad!r}: one of " + ", ".join(ACTIONS))
        for key, value in (("tenant", tenant), ("user", user)):
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidArgument(f"'{key}' must be a non-empty string")
        return cls(chosen, tenant if isinstance(tenant, str) else None, user if isinstance(user, str) else None)

    @classmethod
    def from_query(cls, args: Mapping[str, str]) -> AuditFilter:
        raw = args.get("actions")
        actions = [a.strip() for a in raw.split(",") if a.strip()] if raw is not None else None
        return cls.parse(actions, args.get("tenant"), args.get("user"))

    @classmethod
    def from_ws(cls, raw: object) -> AuditFilter:
        if not isinstance(raw, dict):
            raise InvalidArgument("'audit' must be an object (its filter: actions, tenant, user)")
        unknown = set(raw) - {"actions", "tenant", "user"}
        if unknown:
            raise InvalidArgument(f"unknown key '{sorted(unknown)[0][:64]}' in an audit filter")
        actions = raw.get("actions")
        if actions is not None and (not isinstance(actions, list) or not all(isinstance(a, str) for a in actions)):
            raise InvalidArgument("'actions' must be a list of audit actions")
        return cls.parse(actions, raw.get("tenant"), raw.get("user"))


class AuditReader:
    """One admin stream of the audit log (the interface of a stream reader:
    `pull()`, `done`, `resume_cursor`)."""

    wants_history = False  # its ring is all there is

    __slots__ = ("log", "filter", "index", "done", "_gap")

    def __init__(self, log: AuditLog, flt: AuditFilter, cursor: str | None = None) -> None:
        self.log = log
        self.filter = flt
        self.done = False  # the audit stream never ends
        ring = log.ring
        self.index = ring.next_index
        self._gap: AuditGap | None = None
        if cursor is None:
            return
        epoch, _, offset = cursor.rpartition(".")
        # At most 19 digits, as every cursor (core/cursor.py): int() of a
        # longer string is quadratic, and refused past 4,300 digits.
        malformed = not offset.isascii() or not offset.isdigit() or len(offset) > 19
        if epoch != log.epoch or malformed or int(offset) > ring.next_index:
            self._gap = AuditGap(log.head_cursor, None)
            return
        after = int(offset)  # offsets start at 1: the entry at index i has offset i + 1
        if after < ring.first_index:
            self._gap = AuditGap(f"{log.epoch}.{ring.first_index}", ring.first_index - after)
            after = ring.first_index
        self.index = after

    @property
    def resume_cursor(self) -> str:
        return f"{self.log.epoch}.{self.index}"

    @property
    def behind(self) -> int:
        """Audit facts recorded that it has not read yet."""
        return max(0, self.log.ring.next_index - self.index)

    def written(self) -> None:
        """The adapter's write is done (readers' common interface; an audit
        stream has no burst to skip, so nothing changes)."""

    def pull(self) -> list[AuditEntry | AuditGap]:
        out: list[AuditEntry | AuditGap] = []
        if self._gap is not None:
            out.append(self._gap)
            self._gap = None
        ring = self.log.ring
        if self.index < ring.first_index:  # fell off while this reader was behind
            out.append(AuditGap(f"{self.log.epoch}.{ring.first_index}", ring.first_index - self.index))
            self.index = ring.first_index
        if self.index == ring.next_index:
            return out
        matches = self.filter.matches
        out.extend(e for e in ring.entries_from(self.index) if matches(e))
        self.index = ring.next_index
        return out
