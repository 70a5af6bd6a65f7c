"""What a subscriber knows, from the messages it got: sans-io, no clock.

`Message` is one stream message, typed by its `kind`; `SseDecoder` turns
the lines of an SSE body into them; `StreamState` follows a subscription
(its resume cursor, whether it is over) and `WorkflowView` the state of
each workflow it watches, folding events into the snapshot the broker
sent with the broker's own rules (core/snapshot.py), so what a client
shows is what `GET /v1/workflows/{id}` would say.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..core.restore import snapshot_from_message
from ..core.snapshot import WorkflowSnapshot

# The kinds that carry a workflow's event (they change its state or log).
EVENT_KINDS = frozenset({"state", "progress", "log", "event"})
# A snapshot of a workflow: the first message of a stream without a
# cursor (`snapshot`), or one replacing everything before it (`resync`).
SNAPSHOT_KINDS = frozenset({"snapshot", "resync"})
# Error codes after which the same subscription, resumed from its cursor,
# can work: the broker was busy, closing, or closed this one as slow.
RETRYABLE_CODES = frozenset({"resource_exhausted", "unavailable", "deadline_exceeded", "internal"})


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a stream. `kind`: snapshot, resync, state, progress,
    log, event, gap, end or error. `data`: its JSON body as the broker sent
    it (the event's envelope fields for the event kinds). `cursor`: where
    the subscription resumes after it (None for the messages of a WebSocket
    batch of a multi-workflow subscription but its last: the broker gives
    that cursor once per batch)."""

    kind: str
    data: Mapping[str, Any]
    cursor: str | None = None

    @property
    def workflow_id(self) -> str | None:
        return self.data.get("workflow_id")

    @property
    def seq(self) -> int | None:
        return self.data.get("seq")

    @property
    def epoch(self) -> str | None:
        return self.data.get("epoch")

    @property
    def task_id(self) -> str | None:
        return self.data.get("task_id")

    @property
    def is_event(self) -> bool:
        """An event of a workflow (state, progress, log, event)."""
        return self.kind in EVENT_KINDS


class SubscriptionError(Exception):
    """The broker refused the subscription, or ended it with an error a
    retry would not mend (a bad argument, an unknown workflow, a token it
    does not accept). `code` is the broker's error code, `status` the HTTP
    status (SSE) or the WebSocket close code, when there was one."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        self.code = code
        self.message = message
        self.status = status
        super().__init__(f"{code}: {message}" + (f" ({status})" if status is not None else ""))


class SseDecoder:
    """The lines of an SSE body (without their line ends) → messages, per
    the EventSource rules the broker's streams use: `id`, `event`, `data`
    fields, a comment (`:`, the keepalive) ignored, a blank line ends one."""

    __slots__ = ("_id", "_event", "_data")

    def __init__(self) -> None:
        self._id: str | None = None
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> Message | None:
        if not line:
            if not self._data:
                self._event = None
                return None
            body = orjson.loads("\n".join(self._data))
            kind = self._event or (body.get("kind") if isinstance(body, dict) else None) or "message"
            msg = Message(kind, body, self._id)
            self._event, self._data = None, []
            return msg
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


def ws_messages(frame: str | bytes) -> Iterator[Message]:
    """A WebSocket text frame of a subscription → its messages: one, or
    each event of a `batch` (which carries the resume cursor once, for
    after its last event; single-workflow events get their own from their
    epoch and seq)."""
    body = orjson.loads(frame)
    cursor = body.get("cursor")
    if body.get("kind") != "batch":
        yield Message(body.get("kind", ""), body, cursor)
        return
    events = body["events"]
    single = cursor is not None and ":" in cursor
    for i, ev in enumerate(events):
        last = i == len(events) - 1
        own = f"{ev['epoch']}:{ev['seq']}" if single and "epoch" in ev and "seq" in ev else None
        yield Message(ev.get("kind", ""), ev, cursor if last else own)


@dataclass
class StreamState:
    """Where a subscription stands: the cursor it resumes from and
    whether it is over. `single`: one workflow (over at its `end`);
    `workflows`: the listed ones (over once each ended); else never over
    by a message (a tenant never ends; a `parent=` SSE stream answers 204
    on its resume once its tree has ended)."""

    cursor: str | None = None
    single: bool = False
    workflows: frozenset[str] | None = None
    ended: set[str] = field(default_factory=set)
    done: bool = False

    def update(self, msg: Message) -> None:
        if msg.cursor is not None:
            self.cursor = msg.cursor
        if msg.kind == "end":
            wid = msg.workflow_id
            if wid is not None:
                self.ended.add(wid)
            if self.single or (self.workflows is not None and self.workflows <= self.ended):
                self.done = True


def error_of(msg: Message) -> SubscriptionError:
    data = msg.data
    return SubscriptionError(str(data.get("code", "internal")), str(data.get("message", "")))


class WorkflowView:
    """The state of each workflow a subscription watches
    (`workflows[id]`: a core WorkflowSnapshot, `.state`, `.tasks[task_id]`
    with `.state`, `.progress`, `.attempt`, …), kept current by `apply()`:
    a `snapshot` or `resync` replaces what was known of its workflow, an
    event is folded in (once: an event at or before the known seq of the
    same epoch changes nothing), `end` marks it ended."""

    def __init__(self) -> None:
        self.workflows: dict[str, WorkflowSnapshot] = {}
        self.epochs: dict[str, str] = {}
        self.ended: set[str] = set()

    def apply(self, msg: Message) -> WorkflowSnapshot | None:
        """Fold `msg` in; the workflow it concerns (None: not a workflow's)."""
        wid = msg.workflow_id
        if wid is None:
            return None
        data = msg.data
        if msg.kind in SNAPSHOT_KINDS:
            snap = self.workflows[wid] = snapshot_from_message(dict(data))
            self.epochs[wid] = str(data.get("epoch"))
            if snap.terminal:
                self.ended.add(wid)
            else:
                self.ended.discard(wid)
            return snap
        known = self.workflows.get(wid)
        if known is not None and self.epochs.get(wid) == data.get("epoch"):
            snap = known
        else:
            # A workflow first seen through its events (a multi-workflow
            # stream that it joined, or a new incarnation of its id).
            snap = self.workflows[wid] = WorkflowSnapshot(wid, data.get("tenant", "default"), data.get("parent_id"))
            self.epochs[wid] = str(data.get("epoch"))
            self.ended.discard(wid)
        seq = data.get("seq")
        if msg.kind in EVENT_KINDS and isinstance(seq, int) and seq > snap.seq:
            snap.apply(dict(data), seq, data.get("ts") or snap.updated or 0)
        elif msg.kind == "gap" and isinstance(seq, int) and seq > snap.seq:
            snap.seq = seq
        elif msg.kind == "end":
            self.ended.add(wid)
        return snap
