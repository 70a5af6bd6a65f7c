"""A broker's state rebuilt from its store after a restart (DESIGN.md §10).

The store (store/pg.py) keeps, per workflow, a row (`StoredWorkflow`: its
tenant, parent, epoch, sequencing mode, last seq, terminal seq, log counts,
and a snapshot as of `snapshot_seq`) and every accepted entry's exact body.
`restore()` turns what the store read back into live workflows before
ingest binds:

- the sequence goes on where it stopped: same epoch, next seq = last + 1
  (broker-sequenced workflows included), so a cursor taken before the
  restart resumes exactly after it;
- the snapshot is the saved one with the entries after `snapshot_seq`
  applied again (the writer saves a snapshot only once its entries are in
  the same transaction, so the two always agree);
- the ring holds the last entries read back (the caller bounds how many,
  so restore time stays bounded with many workflows); a cursor older than
  them is served from the store;
- terminal workflows keep the rest of their `terminal_ttl`;
- the ids of the dedup window are remembered with their age.

What no store holds: events that were waiting in a reorder buffer (never
released, never written) and multi-workflow (journal) cursors: the node
epoch is new, so those resume with `resync`.

Pure: no I/O; `now` (monotonic) and `wall` (seconds) are passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .entry import NO_LOGS, Entry, StoredFields, level_slot
from .ring import Ring
from .sequencer import Release, Sequencer
from .snapshot import TaskSnapshot, WorkflowSnapshot
from .state import BrokerState, IngestResult, Workflow


@dataclass(frozen=True, slots=True)
class StoredWorkflow:
    workflow_id: str
    tenant: str
    parent_id: str | None
    epoch: str
    engine: bool
    first_seq: int
    last_seq: int
    terminal_seq: int | None
    terminal_wall_ms: int | None
    log_counts: tuple[int, ...]
    snapshot: dict[str, Any] | None  # a `snapshot` message body as of snapshot_seq
    snapshot_seq: int


@dataclass(frozen=True, slots=True)
class StoredEntry:
    workflow_id: str
    seq: int
    body: bytes
    fields: StoredFields | None = None  # the store's columns (None: read from the body)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    workflows: int
    terminal: int
    entries: int
    ids: int


@dataclass(frozen=True, slots=True)
class WorkflowRow:
    """What a batch updates of one workflow's row (snapshot None: keep
    the one saved, unless the workflow is a new incarnation)."""

    workflow_id: str
    tenant: str
    parent_id: str | None
    epoch: str
    engine: bool
    first_seq: int
    last_seq: int
    state: str
    created: int | None
    updated: int
    terminal_seq: int | None
    terminal_wall: int | None
    log_counts: str
    snapshot: bytes | None  # a `snapshot` message body, JSON
    snapshot_seq: int
    # A new incarnation (not in the store yet): the batch first deletes
    # what the store holds under this id and epoch (an engine-sequenced
    # workflow started again after eviction: its epoch is "e" again) and
    # the old row. Not a column.
    fresh: bool = False


SNAPSHOT_EVERY = 256  # a workflow's snapshot is saved at least every this many events …
SNAPSHOT_PERIOD = 5.0  # … or this many seconds (while it changes), and at its end
# A busy workflow's row is written at most this often (with its snapshot, or
# alone when no snapshot is due), not in every batch: at 1,000 busy
# workflows a row per batch was nearly a row update per event. New
# incarnations and terminal workflows are written at once. A row behind
# its events is caught up at restore from the events after its last_seq
# (`_fill`), which the restore always reads.
ROW_PERIOD = 1.0


def workflow_rows(
    state: BrokerState, batch: list[Entry], now: float, wall: float
) -> tuple[list[WorkflowRow], list[tuple[Workflow, int]]]:
    """The workflows' rows a batch updates: as of the batch's last entry of
    each (what will be committed), with a snapshot where the workflow has
    nothing newer queued and is due one. Returns the rows and the
    (workflow, seq) whose snapshot they carry."""
    last: dict[str, Entry] = {}
    for e in batch:
        last[e.workflow_id] = e
    rows: list[WorkflowRow] = []
    saved: list[tuple[Workflow, int]] = []
    for wid, e in last.items():
        wf = state.workflows.get(wid)
        if wf is None or wf.epoch != e.epoch:
            continue  # evicted (or a later incarnation) meanwhile: its row stays as it was
        snap = wf.snapshot
        seq = e.seq
        caught_up = wf.ring.last() is e  # nothing newer of it is queued
        terminal = wf.terminal_seq is not None and wf.terminal_seq <= seq
        snapshot = None
        if caught_up and (
            terminal or not wf.saved_seq or seq - wf.saved_seq >= SNAPSHOT_EVERY or now - wf.saved_at >= SNAPSHOT_PERIOD
        ):
            snapshot = snapshot_json(wf)
            saved.append((wf, seq))
        elif wf.stored and not terminal and now - wf.row_at < ROW_PERIOD:
            continue  # written lately; its events say the rest (restore)
        terminal_wall = None
        if terminal and wf.terminal_at is not None:
            terminal_wall = int((wall - (now - wf.terminal_at)) * 1000)
        rows.append(
            WorkflowRow(
                workflow_id=wid,
                tenant=wf.tenant,
                parent_id=wf.parent_id,
                epoch=wf.epoch,
                engine=wf.seq.engine,
                first_seq=wf.seq.first_seq or 1,
                last_seq=seq,
                state=snap.state,
                created=snap.created,
                updated=snap.updated or int(wall * 1000),
                terminal_seq=wf.terminal_seq if terminal else None,
                terminal_wall=terminal_wall,
                log_counts=orjson.dumps(list(e.log_counts)).decode(),
                snapshot=snapshot,
                snapshot_seq=snap.seq if snapshot is not None else 0,
                fresh=not wf.stored,
            )
        )
    return rows, saved


def mark_committed(
    state: BrokerState, rows: Iterable[WorkflowRow], saved: Iterable[tuple[Workflow, int]], now: float
) -> None:
    """A batch with `rows` (and the snapshots `saved`) is committed."""
    for wf, seq in saved:
        wf.saved_seq, wf.saved_at = seq, now
    for r in rows:
        live = state.workflows.get(r.workflow_id)
        if live is not None and live.epoch == r.epoch:
            live.stored = True
            live.row_at = now


def snapshot_json(wf: Workflow) -> bytes:
    """The snapshot the store keeps (a `snapshot` message body)."""
    return orjson.dumps(wf.snapshot.to_message("snapshot", wf.epoch))


def snapshot_from_message(msg: dict[str, Any]) -> WorkflowSnapshot:
    snap = WorkflowSnapshot(msg["workflow_id"], msg["tenant"], msg.get("parent_id"))
    snap.state = msg["state"]
    snap.created = msg.get("created")
    snap.updated = msg.get("updated")
    snap.seq = msg["seq"]
    snap.message = msg.get("message")
    snap.result = msg.get("result")
    snap.error = msg.get("error")
    tasks = snap.tasks
    for tid, t in msg.get("tasks", {}).items():
        task = TaskSnapshot(tid, t["created"])
        task.state = t["state"]
        task.progress = t["progress"]
        task.attempt = t["attempt"]
        task.started = t["started"]
        task.finished = t["finished"]
        task.updated = t["updated"]
        task.message = t["message"]
        task.result = t["result"]
        task.error = t["error"]
        tasks[tid] = task
    return snap


def restore(
    state: BrokerState,
    workflows: Iterable[StoredWorkflow],
    entries: Sequence[StoredEntry],
    ids: Iterable[tuple[str, str, int]],
    now: float,
    wall: float,
) -> RestoreResult:
    """Rebuild `workflows` into an empty `state`. `entries` are in
    (workflow, seq) order: for each workflow, every entry after its
    snapshot and at most a ring's worth before that. `ids`: (tenant, event
    id, server_ts ms) of the dedup window, newest first."""
    assert not state.workflows, "restore into a fresh state only"
    by_wf: dict[str, list[StoredEntry]] = {}
    for e in entries:
        by_wf.setdefault(e.workflow_id, []).append(e)
    limits = state.limits
    restored = terminal = count = 0
    rows = list(workflows)
    for row in rows:
        seq = Sequencer(engine=row.engine, epoch=row.epoch, window=limits.reorder_window)
        seq.epoch = row.epoch
        seq.first_seq = row.first_seq
        seq.next_seq = row.last_seq + 1
        wf = Workflow(row.workflow_id, row.tenant, row.parent_id, seq, Ring(limits.ring_events, limits.ring_bytes))
        if row.snapshot is not None:
            wf.snapshot = snapshot_from_message(row.snapshot)
        wf.log_counts = row.log_counts or NO_LOGS
        wf.terminal_seq = row.terminal_seq
        wf.updated_at = now
        wf.stored = True
        stored = by_wf.get(row.workflow_id, [])
        _fill(wf, stored, row)
        count += len(stored)
        if row.terminal_seq is not None:
            ended_ago = max(0.0, wall - (row.terminal_wall_ms or 0) / 1000)
            wf.terminal_at = now - ended_ago
            terminal += 1
        state.workflows[wf.id] = wf
        restored += 1
    # Trees: link each to its parent now that all are there (core/state.py
    # decides the cross-tenant rule); the ancestors fixed, the ring entries
    # get them too.
    for row in rows:
        wf = state.workflows[row.workflow_id]
        if wf.parent_id is not None and not wf.ancestors:
            state._adopt(wf)
    for row in rows:
        wf = state.workflows[row.workflow_id]
        for entry in wf.ring:
            entry.ancestors = wf.ancestors
        if len(wf.ring):
            state.holding[wf.id] = None
            state.ring_bytes += wf.ring.bytes
    # Terminal ones in the order they ended (the TTL) and as least recently
    # updated (eviction under max_workflows).
    ended = sorted((wf for wf in state.workflows.values() if wf.terminal), key=lambda w: w.terminal_at or 0.0)
    for wf in ended:
        state.terminal[wf.id] = None
        state.terminal_lru[wf.id] = None
    # The journal starts empty. Offset 1 stands for "before it": every
    # restored workflow started there, and a terminal one ended there, so
    # multi-workflow readers tell them from workflows yet to come (a
    # `workflows=` / `parent=` stream of ended ones ends; a log stream's
    # gap counts only what follows: core/reader.py).
    journal = state.journal
    journal.first_index = journal.next_index = 1
    for wf in state.workflows.values():
        wf.first_offset = 1
        if wf.terminal:
            wf.terminal_offset = 1
    kept = 0
    mine = state.node_id + "-"
    for tenant, event_id, ts_ms in reversed(list(ids)):  # oldest first: the window forgets from that end
        prefix = "" if tenant == "default" else tenant + "\x00"
        state.ids.add(prefix + event_id, now - max(0.0, wall - ts_ms / 1000))
        kept += 1
        # Ids this node made (`<node>-<n>`) go on after the last one, so
        # none is made twice (core/state.py).
        if event_id.startswith(mine) and (n := event_id[len(mine) :]).isascii() and n.isdigit():
            state._next_id = max(state._next_id, int(n))
    state.ids.expire(now)
    if state.ring_bytes > limits.total_bytes:
        state._trim()
    state.counters["workflows_restored"] += restored
    return RestoreResult(restored, terminal, count, kept)


def _fill(wf: Workflow, stored: list[StoredEntry], row: StoredWorkflow) -> None:
    """Put the stored entries into the ring (the last `ring_events` of
    them) and apply those after the snapshot to it."""
    ring = wf.ring
    keep = stored[-ring.max_events :]
    snap = wf.snapshot
    terminal_seq = row.terminal_seq
    entries: list[Entry] = []
    first_kept = len(stored) - len(keep)
    # The row may be behind its events (ROW_PERIOD): those after its
    # last_seq move the numbering and the log counts on.
    last_seq = max(row.last_seq, stored[-1].seq) if stored else row.last_seq
    wf.seq.next_seq = last_seq + 1
    counts = list(wf.log_counts)
    for k, e in enumerate(stored):
        gap_from = _gap_from(e)
        if gap_from is not None:  # a straggler from it is late, as before the restart
            wf.seq.gaps.append((gap_from, e.seq))
        after_terminal = terminal_seq is not None and e.seq > terminal_seq
        replay = e.seq > row.snapshot_seq and not after_terminal
        beyond = e.seq > row.last_seq
        if k < first_kept and not replay and not beyond:
            continue  # neither in the ring nor to replay
        entry = Entry.restored(
            e.body, tenant=wf.tenant, terminal=e.seq == terminal_seq, after_terminal=after_terminal, fields=e.fields
        )
        if beyond and entry.kind == "log" and not after_terminal:
            counts[level_slot(entry.level)] += 1
        if replay:
            if entry.kind == "gap":
                snap.seq = entry.seq
            else:
                msg = orjson.loads(e.body)
                snap.apply(msg, entry.seq, msg["ts"])
        if k >= first_kept:
            entries.append(entry)
    wf.log_counts = tuple(counts)
    # Each entry's running log counts, from the workflow's total backwards.
    for entry in reversed(entries):
        entry.log_counts = tuple(counts)
        if entry.kind == "log" and not entry.after_terminal:
            counts[level_slot(entry.level)] -= 1
    # Absolute ring indexes start at the count of events before the first
    # one held, so `dropped` says whether `since=0` still reaches the
    # workflow's first seq (an engine's may be above 1).
    if entries and entries[0].seq_from <= row.first_seq:
        first, ring.dropped_seq = 0, 0
    else:
        ring.dropped_seq = entries[0].seq_from - 1 if entries else last_seq
        first = max(1, ring.dropped_seq - row.first_seq + 1)
    ring.first_index = ring.next_index = first
    for entry in entries:
        ring.append(entry)
    if snap.seq < last_seq and not entries:
        snap.seq = last_seq


def _gap_from(e: StoredEntry) -> int | None:
    """The first seq of a stored `gap` entry; None for any other entry."""
    if e.fields is not None:
        return e.fields[3] if e.fields[4] == "gap" else None
    if not e.body.startswith(b'{"kind":"gap"'):  # gap_body's first key (core/messages.py)
        return None
    from_seq: int = orjson.loads(e.body)["from"]
    return from_seq


def skip_unwritten(state: BrokerState, margin: int, now: float, wall: float) -> int:
    """After an unclean stop (kill -9, a crash): entries may have been
    streamed that the store never got — at most `margin` of them (the
    spill queue's bound). A broker-sequenced workflow would hand their
    seqs to new events, and a subscriber holding one of those cursors
    would skip the new ones silently. So each active broker-sequenced
    workflow's numbering goes on `margin` seqs later, behind a `gap`
    covering the seqs that may have been lost (written to the store like
    any entry: call this with `state.spill` set), and the broker's event
    ids skip as far. Engine-sequenced workflows need nothing: the engine's
    seqs are canonical (a lost range is a gap once later seqs arrive).
    Returns the workflows skipped."""
    state._wall = wall
    result = IngestResult()
    skipped = 0
    for wf in list(state.workflows.values()):
        seq = wf.seq
        if seq.engine or wf.terminal or seq.next_seq is None:
            continue
        first = seq.next_seq
        last = first + margin - 1
        seq.next_seq = last + 1
        state._apply(wf, [Release(last, None, first)], now, result)
        skipped += 1
    state._next_id += margin
    state.counters["restart_skips"] += skipped
    return skipped
