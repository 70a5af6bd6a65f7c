"""Stream messages and their wire encodings, built once per event.

An `Entry` is one released event (or gap) as every subscriber sees it. Its
JSON body is encoded once at ingest; its SSE frames are built on first use
and cached, so a thousand subscribers cost one encoding, not a thousand
(DESIGN.md §5, FIELD-NOTES "pre-encode each event once").

A `Message` is a message made for one reader (snapshot, resync, end, a
reader-side gap): same interface, encoded on demand.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

from .envelope import LOG_LEVELS

NO_LOGS = (0, 0, 0, 0, 0)  # per level: debug, info, warning, error, critical


def level_slot(level: int) -> int:
    """Index of a LOG_LEVELS value in a log_counts tuple."""
    return level // 10 - 1


def sse_frame(event_id: str, kind: str, body: bytes) -> bytes:
    # orjson never emits a raw newline, so `data:` is always one line.
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), kind.encode(), body)


# A stored entry's columns: workflow_id, epoch, seq, seq_from, kind,
# task_id, state, level (a LOG_LEVELS value, 0 for none).
StoredFields = tuple[str, str, int, int, str, "str | None", "str | None", int]


_NO_MSG: dict[str, Any] = {}  # restored(): the fields come apart from any message


def dumps_exact(obj: Any) -> bytes:
    """orjson.dumps for bytes that live long: orjson returns its working
    buffer (4 KiB or more, seen with 3.13) without shrinking it, so keep an
    exact-size copy."""
    return bytes(memoryview(orjson.dumps(obj)))


class Entry:
    """One event in a workflow ring and the node journal."""

    __slots__ = (
        "workflow_id",
        "tenant",
        "ancestors",
        "epoch",
        "seq",
        "seq_from",
        "kind",
        "task_id",
        "state",
        "level",
        "terminal",
        "after_terminal",
        "body",
        "size",
        "offset",
        "cursor",
        "log_counts",
        "event_id",
        "_sse",
        "_sse_multi",
    )

    def __init__(
        self,
        msg: dict[str, Any],
        *,
        tenant: str,
        ancestors: tuple[str, ...] = (),
        terminal: bool = False,
        after_terminal: bool = False,
        seq_from: int | None = None,
        body: bytes | None = None,
        fields: StoredFields | None = None,
    ) -> None:
        """A live entry: its fields read from `msg`, its body encoded from
        it. With `body` and `fields` (`restored()`), an entry read back
        from the store, `msg` unused."""
        if fields is None:
            level = msg.get("level")
            self.workflow_id: str = msg["workflow_id"]
            self.epoch: str = msg["epoch"]
            self.seq: int = msg["seq"]
            self.seq_from = self.seq if seq_from is None else seq_from
            self.kind: str = msg["kind"]
            self.task_id: str | None = msg.get("task_id")
            self.state: str | None = msg.get("state")
            self.level = LOG_LEVELS[level] if level is not None else 0
            self.event_id: str | None = msg.get("id")  # for the store's dedup restore
        else:
            (
                self.workflow_id,
                self.epoch,
                self.seq,
                self.seq_from,
                self.kind,
                self.task_id,
                self.state,
                self.level,
            ) = fields
            self.event_id = None  # a stored entry's id is in the dedup window (restored apart)
        self.tenant = tenant
        self.ancestors = ancestors  # the workflow's parent, grandparent, …
        self.terminal = terminal
        self.after_terminal = after_terminal
        self.body = dumps_exact(msg) if body is None else body
        # Accounted size: the body, the SSE frame cached beside it once
        # anyone streams it, and a rough fixed cost of the object.
        self.size = 2 * len(self.body) + 200
        self.offset = 0  # journal offset, set when journaled
        # The workflow's running count of log lines per level up to and
        # including this entry (shared tuple, set by BrokerState): a reader
        # that skips ahead knows exactly how many lines it skipped.
        self.log_counts: tuple[int, ...] = NO_LOGS
        self.cursor = f"{self.epoch}:{self.seq}"
        self._sse: bytes | None = None
        self._sse_multi: bytes | None = None

    @classmethod
    def restored(
        cls,
        body: bytes,
        *,
        tenant: str,
        ancestors: tuple[str, ...] = (),
        terminal: bool = False,
        after_terminal: bool = False,
        fields: StoredFields | None = None,
    ) -> Entry:
        """An entry read back from the store: `body` is exactly the bytes
        streamed when it was live, so a resume after a restart sends the
        same bytes (store/, core/restore.py). Its fields are the store's
        columns (`fields`), or else read from the body."""
        if fields is None:
            msg = orjson.loads(body)
            level = msg.get("level")
            fields = (
                msg["workflow_id"],
                msg["epoch"],
                msg["seq"],
                msg["from"] if msg["kind"] == "gap" else msg["seq"],
                msg["kind"],
                msg.get("task_id"),
                msg.get("state"),
                LOG_LEVELS[level] if level is not None else 0,
            )
        return cls(
            _NO_MSG,
            tenant=tenant,
            ancestors=ancestors,
            terminal=terminal,
            after_terminal=after_terminal,
            body=body,
            fields=fields,
        )

    def sse(self) -> bytes:
        """SSE frame for a single-workflow stream (id = epoch:seq)."""
        frame = self._sse
        if frame is None:
            frame = self._sse = sse_frame(self.cursor, self.kind, self.body)
        return frame

    def sse_multi(self, node_epoch: str) -> bytes:
        """SSE frame for a multi-workflow stream (id = journal cursor)."""
        frame = self._sse_multi
        if frame is None:
            frame = self._sse_multi = sse_frame(f"{node_epoch}.{self.offset}", self.kind, self.body)
        return frame


class Message:
    """A message made for one reader: snapshot, resync, end, or a reader gap."""

    __slots__ = ("kind", "workflow_id", "cursor", "journal_cursor", "body")

    def __init__(self, msg: dict[str, Any], cursor: str, journal_cursor: str = "") -> None:
        self.kind: str = msg["kind"]
        self.workflow_id: str = msg["workflow_id"]
        self.cursor = cursor
        self.journal_cursor = journal_cursor
        self.body = orjson.dumps(msg)

    def sse(self) -> bytes:
        return sse_frame(self.cursor, self.kind, self.body)

    def sse_multi(self, node_epoch: str) -> bytes:
        return sse_frame(self.journal_cursor, self.kind, self.body)


Item = Entry | Message
