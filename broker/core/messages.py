"""The control messages of a stream, each built in one place (DESIGN.md §5).

`snapshot` / `resync` (a workflow's state), `gap` (events a subscriber will
not get), `end` (the workflow finished) and `error`. Readers, the
sequencer's released holes and both transports build them only through the
functions here, so a field added to one reaches every stream alike.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .entry import Message
from .errors import BrokerError

if TYPE_CHECKING:  # type-only: state.py imports this module
    from .state import Workflow

SNAPSHOT = "snapshot"
RESYNC = "resync"


def gap_body(wf_id: str, epoch: str, first: int, last: int, dropped: int) -> dict[str, Any]:
    """The body of a `gap` covering seqs `first`..`last`; it occupies `last`'s
    seq, so a subscriber resuming after it continues with the next event."""
    return {
        "kind": "gap",
        "workflow_id": wf_id,
        "epoch": epoch,
        "seq": last,
        "from": first,
        "to": last,
        "dropped": dropped,
    }


def gap_message(wf_id: str, epoch: str, first: int, last: int, dropped: int, journal_cursor: str = "") -> Message:
    """A `gap` made for one reader (it fell behind a log stream)."""
    return Message(gap_body(wf_id, epoch, first, last, dropped), f"{epoch}:{last}", journal_cursor)


def end_message(wf_id: str, epoch: str, seq: int, state: str | None, journal_cursor: str = "") -> Message:
    """`end`: the workflow reached a terminal state at `seq`; the stream closes."""
    msg = {"kind": "end", "workflow_id": wf_id, "epoch": epoch, "seq": seq, "state": state}
    return Message(msg, f"{epoch}:{seq}", journal_cursor)


def workflow_end(wf: Workflow, journal_cursor: str = "") -> Message:
    """The `end` of a terminal workflow."""
    assert wf.terminal_seq is not None
    return end_message(wf.id, wf.epoch, wf.terminal_seq, wf.snapshot.state, journal_cursor)


def state_message(
    wf: Workflow, kind: str = SNAPSHOT, tasks: frozenset[str] | None = None, journal_cursor: str = ""
) -> Message:
    """A `snapshot` (first message of a stream opened without a cursor) or a
    `resync` (a fresh snapshot replacing everything before it)."""
    body = wf.snapshot.to_message(kind, wf.epoch, tasks)
    return Message(body, f"{wf.epoch}:{wf.snapshot.seq}", journal_cursor)


def error_body(err: BrokerError, sub: str | None = None) -> dict[str, Any]:
    """An `error` message's body (the stream closes after it; on WebSocket,
    a per-subscription or per-request error that leaves the connection open)."""
    body: dict[str, Any] = {"kind": "error", "code": err.code, "message": err.message}
    if sub is not None:
        body["sub"] = sub
    return body
