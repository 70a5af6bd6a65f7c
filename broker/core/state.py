"""The broker's state machine: ingest → sequencing → snapshots, rings, journal.

`BrokerState` owns every workflow (its `Sequencer`, `WorkflowSnapshot` and
ring), the node journal, the id dedup window, the counters and the bounded
list of recent rejects. The trio adapters call:

- `ingest_frame(frame, now, source, wall)` for each ZMQ frame or HTTP body;
- `tick(now, wall)` periodically (reorder-window expiry, terminal TTL eviction,
  dedup expiry);

and read the returned `IngestResult.touched` to wake subscribers of the
workflows that got new entries. Readers (core/reader.py) read rings and the
journal directly; nothing here knows about subscribers.

Must never import trio, zmq, quart or psycopg, nor read a clock: `now` (a
monotonic clock for every duration: reorder window, TTL, dedup age) and
optionally `wall` (wall-clock seconds for `server_ts`; defaults to `now`) are
passed in.
"""

from __future__ import annotations

import secrets
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .dedup import IdWindow
from .entry import NO_LOGS, Entry, level_slot
from .envelope import TERMINAL_STATES, MaybeBigInt, exact_items, parse_frame, validate
from .errors import Reject
from .messages import gap_body
from .ring import Ring
from .sequencer import Duplicate, Release, Sequencer
from .snapshot import WorkflowSnapshot
from .spill import SpillQueue

MAX_DEPTH = 64  # ancestors kept per workflow
EVICTED_ANCESTRY_KEPT = 10000
REJECTS_KEPT_PER_FRAME = 10  # listed in the recent rejects; all are counted

_EPOCH_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def random_epoch() -> str:
    """A short random token; never "e" (reserved for engine-sequenced)."""
    return "".join(secrets.choice(_EPOCH_ALPHABET) for _ in range(6))


# The broker's own tenant: its data-path probe (server/probe.py) lives
# there; listed only when asked for by name, not counted as ingested.
SYSTEM_TENANT = "_broker"


@dataclass(frozen=True)
class Limits:
    ring_events: int = 1024
    ring_bytes: int = 1048576
    total_bytes: int = 512 * 1048576  # every ring together
    journal_events: int = 100000
    journal_bytes: int = 64 * 1048576
    max_tasks: int = 10000
    max_workflows: int = 100000
    terminal_ttl: float = 600.0
    reorder_window: float = 0.5
    dedup_window: int = 100000
    max_frame_bytes: int = 1048576
    rejects_kept: int = 1000


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[tuple[int, Reject]] = field(default_factory=list)  # (index in frame, reject)
    touched: set[str] = field(default_factory=set)  # workflows with new entries
    created: bool = False  # a workflow became visible


class FrameIngest:
    """One frame (a ZMQ frame or an HTTP body) being applied, possibly in
    several steps (`BrokerState.ingest_step`): a batch of thousands of
    events must not hold the caller's loop. `result` accumulates;
    `touched` holds the workflows with new entries since the caller last
    took them."""

    __slots__ = ("frame", "source", "tenant", "items", "next", "kept", "result", "exact")

    def __init__(
        self, frame: bytes, source: str, items: list[Any] | Reject | None = None, tenant: str | None = None
    ) -> None:
        self.frame = frame
        self.source = source
        # The publisher's tenant when it is authenticated (its token's): every
        # event goes there, and one naming another is `tenant_mismatch`.
        self.tenant = tenant
        self.items = items  # None until parsed (by its first step)
        self.next = 0  # index of the next item to apply
        self.kept = 0  # rejects of this frame listed in the recent rejects
        self.result = IngestResult()
        self.exact: list[Any] | None = None  # the items read exactly, once needed (envelope.MaybeBigInt)

    def validated(self, index: int) -> dict[str, Any]:
        """Item `index` validated against the frame read exactly (a float
        that may have been an integer beyond 64 bits: envelope.MaybeBigInt)."""
        if self.exact is None:
            try:
                self.exact = exact_items(self.frame)
            except (ValueError, RecursionError):  # deeper than Python's parser goes
                raise Reject("invalid_field", "a payload too deep to check its integers exactly") from None
        return validate(self.exact[index], exact=True)

    @property
    def size(self) -> int:
        """Events (items) in the frame: 1 for a frame refused whole (0 until parsed)."""
        if self.items is None:
            return 0
        return 1 if isinstance(self.items, Reject) else len(self.items)


class Workflow:
    __slots__ = (
        "id",
        "tenant",
        "parent_id",
        "ancestors",
        "seq",
        "snapshot",
        "ring",
        "terminal_seq",
        "terminal_at",
        "terminal_offset",
        "first_offset",
        "updated_at",
        "log_counts",
        "saved_seq",
        "saved_at",
        "row_at",
        "stored",
    )

    def __init__(self, wid: str, tenant: str, parent_id: str | None, seq: Sequencer, ring: Ring[Entry]) -> None:
        self.id = wid
        self.tenant = tenant
        self.parent_id = parent_id
        # Parent, grandparent, …: fixed when the parent becomes known, so a
        # `parent=` stream keeps grandchildren even after a middle workflow
        # has been evicted.
        self.ancestors: tuple[str, ...] = ()
        self.seq = seq
        self.snapshot = WorkflowSnapshot(wid, tenant, parent_id)
        self.ring = ring
        self.terminal_seq: int | None = None
        self.terminal_at: float | None = None
        self.terminal_offset = 0  # journal offset of the terminal event
        self.first_offset = 0  # journal offset of its first entry
        self.updated_at = 0.0
        self.log_counts: tuple[int, ...] = NO_LOGS  # streamed log lines so far, per level
        # The store's snapshot of it: as of which seq, written when (the
        # writer's clock); see store/writer.py.
        self.saved_seq = 0
        self.saved_at = -1e9
        self.row_at = -1e9  # its row last written (core/restore.py ROW_PERIOD)
        # Its row is in the store (written once, or restored from it): a
        # workflow not stored yet replaces what the store holds under its
        # id (an earlier incarnation's), see core/restore.py workflow_rows.
        self.stored = False

    @property
    def epoch(self) -> str:
        return self.seq.epoch

    @property
    def visible(self) -> bool:
        """Streamable: at least one event has been released."""
        return self.snapshot.seq > 0

    @property
    def terminal(self) -> bool:
        return self.terminal_seq is not None

    def oldest_cursor_seq(self) -> int:
        """The smallest `since` that still resumes without loss."""
        first = self.ring.first()
        if first is None:  # nothing held: everything up to the last dropped is gone
            return self.ring.dropped_seq
        return first.seq_from - 1


class BrokerState:
    def __init__(
        self,
        node_id: str,
        limits: Limits | None = None,
        *,
        make_epoch: Callable[[], str] = random_epoch,
    ) -> None:
        self.node_id = node_id
        self.limits = limits or Limits()
        self.make_epoch = make_epoch
        self.node_epoch = make_epoch()
        self.workflows: dict[str, Workflow] = {}
        # Every workflow under each ancestor (all depths), for `parent=` streams.
        self.subtree: dict[str, set[str]] = {}
        # Ancestry of recently evicted workflows: a child that starts after
        # its parent was evicted still belongs to its grandparent's tree.
        self.evicted_ancestry: OrderedDict[str, tuple[str, tuple[str, ...]]] = OrderedDict()  # (tenant, ancestors)
        # Terminal workflows, twice: in the order they ended (for the TTL) and
        # least recently updated first (for eviction under max_workflows).
        self.terminal: OrderedDict[str, None] = OrderedDict()
        self.terminal_lru: OrderedDict[str, None] = OrderedDict()
        # Workflows with events waiting in their reorder buffer.
        self.reordering: set[str] = set()
        self.journal: Ring[Entry] = Ring(self.limits.journal_events, self.limits.journal_bytes)
        # buffer.total_bytes: the bytes of every ring together, and the
        # workflows holding any, least recently updated first (trimmed first).
        self.ring_bytes = 0
        self.holding: OrderedDict[str, None] = OrderedDict()
        self.ids = IdWindow(self.limits.dedup_window)
        self.rejects: deque[dict[str, Any]] = deque(maxlen=self.limits.rejects_kept)
        self.counters: Counter[str] = Counter()
        self.rejected_by_reason: Counter[str] = Counter()
        self._next_id = 0
        self._wall = 0.0  # wall clock of the current call, for server_ts
        # With a store: every released entry, until it is committed
        # (core/spill.py; store/writer.py drains it).
        self.spill: SpillQueue | None = None

    # ---------------------------------------------------------------- ingest

    def ingest_frame(
        self, frame: bytes, now: float, source: str = "zmq", wall: float | None = None, tenant: str | None = None
    ) -> IngestResult:
        """Apply a whole frame at once."""
        work = self.begin_frame(frame, source, tenant)
        self.ingest_step(work, now, wall)
        return work.result

    def begin_frame(self, frame: bytes, source: str = "zmq", tenant: str | None = None) -> FrameIngest:
        """A frame to apply with `ingest_step`: parsed by the first step,
        its events validated as they are applied (into `tenant` when the
        publisher has one)."""
        return FrameIngest(frame, source, tenant=tenant)

    def ingest_step(self, work: FrameIngest, now: float, wall: float | None = None, max_events: int = 0) -> bool:
        """Apply the next `max_events` events of `work` (0: all the rest);
        True once the frame is done."""
        self._wall = now if wall is None else wall
        result = work.result
        items = work.items
        if items is None:
            items = work.items = parse_frame(work.frame, self.limits.max_frame_bytes)
        if isinstance(items, Reject):
            if not work.next:
                work.next = 1
                self._reject(result, 0, items, True, work.source, work.frame)
            return True
        index = work.next
        stop = len(items) if max_events <= 0 else min(len(items), index + max_events)
        while index < stop:
            try:
                try:
                    ev = validate(items[index])
                except MaybeBigInt:
                    ev = work.validated(index)
                if work.tenant is not None:
                    named = ev.setdefault("tenant", work.tenant)
                    if named != work.tenant:
                        raise Reject("tenant_mismatch", "the event names another tenant than its publisher's")
                self._ingest_event(ev, now, result)
            except (RecursionError, TypeError, ValueError) as exc:
                # An input the checks above did not foresee: refuse the
                # event, never the ingest (a bug, so say what it was).
                rej = Reject("invalid_field", f"could not be applied: {type(exc).__name__}")
                self._reject(result, index, rej, work.kept < REJECTS_KEPT_PER_FRAME, work.source, work.frame)
                work.kept += 1
            except Reject as rej:
                self._reject(result, index, rej, work.kept < REJECTS_KEPT_PER_FRAME, work.source, work.frame)
                work.kept += 1
            except Duplicate:
                result.duplicates += 1
                self.counters["duplicates"] += 1
            index += 1
        work.next = index
        return index >= len(items)

    def _reject(self, result: IngestResult, index: int, rej: Reject, keep: bool, source: str, frame: bytes) -> None:
        result.rejected.append((index, rej))
        if keep:
            self.record_reject(rej, self._wall, source, frame, index)
        else:  # a batch full of bad events: count them all, list the first few
            self.counters["rejected"] += 1
            self.rejected_by_reason[rej.reason] += 1

    def record_reject(self, rej: Reject, now: float, source: str, frame: bytes, index: int = 0) -> None:
        """Count and keep a reject (also for frames refused before decoding);
        `now` is wall-clock seconds."""
        self.counters["rejected"] += 1
        self.rejected_by_reason[rej.reason] += 1
        self.rejects.append(
            {
                "ts": int(now * 1000),
                "source": source,
                "reason": rej.reason,
                "detail": rej.detail,
                "index": index,
                "sample": frame[:256].decode("utf-8", "replace"),
            }
        )

    def _ingest_event(self, ev: dict[str, Any], now: float, result: IngestResult) -> None:
        wid = ev["workflow_id"]
        wf = self.workflows.get(wid)
        tenant = ev.get("tenant")
        if wf is not None and tenant is not None and tenant != wf.tenant:
            raise Reject("tenant_mismatch", f"workflow '{wid}' belongs to another tenant")
        # Event ids are unique within a tenant: one tenant's ids can neither
        # shadow another's events as duplicates nor tell that they exist.
        owner = wf.tenant if wf is not None else (tenant or "default")
        prefix = "" if owner == "default" else owner + "\x00"  # no id holds a control character
        event_id = ev.get("id")
        if event_id is not None and prefix + event_id in self.ids:
            raise Duplicate()
        if wf is None:
            wf = self._create(wid, ev, now)
        task_id = ev.get("task_id")
        if task_id is not None and len(wf.snapshot.tasks) >= self.limits.max_tasks and task_id not in wf.snapshot.tasks:
            raise Reject("too_many_tasks", f"workflow '{wid}' has buffer.max_tasks ({self.limits.max_tasks}) tasks")
        releases = wf.seq.offer(ev, now)
        if event_id is None:
            # Skip ids an engine already used, so no two events share one.
            while True:
                self._next_id += 1
                event_id = f"{self.node_id}-{self._next_id}"
                if prefix + event_id not in self.ids:
                    break
            ev["id"] = event_id
        self.ids.add_new(prefix + event_id, now)  # checked above: not in the window
        result.accepted += 1
        # The broker's own probe events (server/probe.py) are not the users'.
        self.counters["ingested" if wf.tenant != SYSTEM_TENANT else "probe_events"] += 1
        if wf.seq.pending:
            self.reordering.add(wid)
        else:
            self.reordering.discard(wid)
        if releases:
            self._apply(wf, releases, now, result)

    def _create(self, wid: str, ev: dict[str, Any], now: float) -> Workflow:
        if len(self.workflows) >= self.limits.max_workflows and not self._evict_one():
            raise Reject("too_many_workflows", f"buffer.max_workflows ({self.limits.max_workflows}) reached")
        seq = Sequencer(engine="seq" in ev, epoch=self.make_epoch(), window=self.limits.reorder_window)
        wf = Workflow(
            wid,
            ev.get("tenant", "default"),
            ev.get("parent_id"),
            seq,
            Ring(self.limits.ring_events, self.limits.ring_bytes),
        )
        wf.updated_at = now
        self.workflows[wid] = wf
        if wf.parent_id is not None:
            self._adopt(wf)
        else:
            self._link_below(wf)
        self.counters["workflows_created"] += 1
        return wf

    def _apply(self, wf: Workflow, releases: list[Release], now: float, result: IngestResult) -> None:
        server_ts = int(self._wall * 1000)
        was_visible = wf.visible
        for rel in releases:
            after_terminal = wf.terminal_seq is not None
            if rel.event is None:
                msg = gap_body(wf.id, wf.epoch, rel.gap_from, rel.seq, rel.seq - rel.gap_from + 1)
                msg["server_ts"] = server_ts
                entry = Entry(
                    msg, tenant=wf.tenant, ancestors=wf.ancestors, after_terminal=after_terminal, seq_from=rel.gap_from
                )
                self.counters["gaps"] += 1
                if not after_terminal:
                    wf.snapshot.seq = rel.seq
            else:
                ev = rel.event
                # The envelope's keys first, then the event's in its order
                # (update() keeps a key where it first came; C speed).
                msg = {"kind": ev["kind"], "workflow_id": wf.id, "epoch": wf.epoch, "seq": rel.seq}
                msg.update(ev)
                msg["workflow_id"], msg["epoch"], msg["seq"] = wf.id, wf.epoch, rel.seq
                msg.pop("tenant", None)
                msg["ts"] = ev.get("ts", server_ts)
                msg["server_ts"] = server_ts
                terminal = (
                    not after_terminal
                    and ev["kind"] == "state"
                    and ev["type"].startswith("workflow.")
                    and ev["state"] in TERMINAL_STATES
                )
                if wf.parent_id is None and "parent_id" in ev and not wf.visible:
                    wf.parent_id = ev["parent_id"]
                    self._adopt(wf)
                entry = Entry(
                    msg, tenant=wf.tenant, ancestors=wf.ancestors, terminal=terminal, after_terminal=after_terminal
                )
                if not after_terminal:
                    wf.snapshot.apply(ev, rel.seq, msg["ts"])
                if terminal:
                    wf.terminal_seq = rel.seq
                    wf.terminal_at = now
            if entry.kind == "log" and not after_terminal:
                counts = list(wf.log_counts)
                counts[level_slot(entry.level)] += 1
                wf.log_counts = tuple(counts)
            entry.log_counts = wf.log_counts
            ring = wf.ring
            held = ring.bytes
            ring.append(entry)
            self.ring_bytes += ring.bytes - held
            self.journal.append(entry)
            entry.offset = self.journal.next_index  # offsets start at 1
            if self.spill is not None and not self.spill.push(entry):
                self.counters["store_dropped"] += 1
            if not wf.first_offset:
                wf.first_offset = entry.offset
            if entry.terminal:
                wf.terminal_offset = entry.offset
        wf.updated_at = now
        holding = self.holding
        holding[wf.id] = None
        holding.move_to_end(wf.id)
        if self.ring_bytes > self.limits.total_bytes:
            self._trim()
        if wf.terminal:
            self.terminal.setdefault(wf.id, None)
            self.terminal_lru[wf.id] = None
            self.terminal_lru.move_to_end(wf.id)
        result.touched.add(wf.id)
        if not was_visible and wf.visible:
            result.created = True

    def _trim(self) -> None:
        """buffer.total_bytes: drop the oldest entries of the least recently
        updated workflows until every ring together fits. Their readers
        fall off the ring: `resync` (state streams; the snapshot is never
        dropped) or `gap` (log streams), as when a ring's own bound drops
        entries. Counted: `trimmed_events`, `trimmed_bytes`."""
        budget = self.limits.total_bytes
        holding = self.holding
        while self.ring_bytes > budget and holding:
            wid = next(iter(holding))
            ring = self.workflows[wid].ring
            while len(ring) and self.ring_bytes > budget:
                held = ring.bytes
                ring.drop_oldest()
                freed = held - ring.bytes
                self.ring_bytes -= freed
                self.counters["trimmed_events"] += 1
                self.counters["trimmed_bytes"] += freed
            if not len(ring):
                del holding[wid]

    # ------------------------------------------------------------------ time

    def tick(self, now: float, wall: float | None = None) -> IngestResult:
        """Release expired reorder buffers; evict terminal workflows past TTL."""
        self._wall = now if wall is None else wall
        result = IngestResult()
        for wid in list(self.reordering):
            wf = self.workflows[wid]
            releases = wf.seq.expire(now)
            if releases:
                self._apply(wf, releases, now, result)
            if not wf.seq.pending:
                self.reordering.discard(wid)
        horizon = now - self.limits.terminal_ttl
        while self.terminal:
            wid = next(iter(self.terminal))
            wf = self.workflows[wid]
            assert wf.terminal_at is not None
            if wf.terminal_at > horizon:
                break
            self._evict(wid)
        self.ids.expire(now)
        return result

    def next_deadline(self) -> float | None:
        deadlines = [d for wid in self.reordering if (d := self.workflows[wid].seq.deadline) is not None]
        return min(deadlines) if deadlines else None

    def _evict_one(self) -> bool:
        if not self.terminal_lru:
            return False
        self._evict(next(iter(self.terminal_lru)))
        return True

    def _evict(self, wid: str) -> None:
        wf = self.workflows.pop(wid)
        self.ring_bytes -= wf.ring.bytes
        self.holding.pop(wid, None)
        self.terminal.pop(wid, None)
        self.terminal_lru.pop(wid, None)
        self.reordering.discard(wid)
        if wf.ancestors:
            self.evicted_ancestry[wid] = (wf.tenant, wf.ancestors)
            if len(self.evicted_ancestry) > EVICTED_ANCESTRY_KEPT:
                self.evicted_ancestry.popitem(last=False)
        for ancestor in wf.ancestors:
            below = self.subtree.get(ancestor)
            if below is not None:
                below.discard(wid)
                if not below:
                    del self.subtree[ancestor]
        self.counters["workflows_evicted"] += 1

    # ----------------------------------------------------------------- reads

    def get(self, wid: str) -> Workflow | None:
        wf = self.workflows.get(wid)
        return wf if wf is not None and wf.visible else None

    def _adopt(self, wf: Workflow) -> None:
        """Fix `wf.ancestors` from its parent's, and index it under each.
        Trees do not cross tenants: a parent of another tenant is not
        linked (the child keeps its `parent_id`, but no `parent=` stream of
        either tenant holds the other's workflows, nor learns of their
        tree through them)."""
        assert wf.parent_id is not None
        parent = self.workflows.get(wf.parent_id)
        if parent is not None:
            if parent.tenant != wf.tenant:
                self._link_below(wf)
                return
            inherited = parent.ancestors
        else:
            tenant, inherited = self.evicted_ancestry.get(wf.parent_id, (wf.tenant, ()))
            if tenant != wf.tenant:
                inherited = ()
        # Bounded: a parent cycle or a very deep tree must not grow this.
        wf.ancestors = ((wf.parent_id,) + inherited)[:MAX_DEPTH]
        for ancestor in wf.ancestors:
            self.subtree.setdefault(ancestor, set()).add(wf.id)
        self._link_below(wf)

    def _link_below(self, wf: Workflow) -> None:
        """Descendants that arrived before `wf` (or before it knew its own
        parent) hang below it already: extend their ancestry with its; a
        chain that enters `wf` from another tenant is cut there instead."""
        for wid in list(self.subtree.get(wf.id, ())):
            below = self.workflows.get(wid)
            if below is None or wf.id not in below.ancestors:
                continue
            at = below.ancestors.index(wf.id)
            child = self.workflows.get(below.ancestors[at - 1]) if at else below
            if child is None or child.tenant != wf.tenant:
                for ancestor in below.ancestors[at:]:
                    self.subtree.get(ancestor, set()).discard(wid)
                below.ancestors = below.ancestors[:at]
                continue
            below.ancestors = (below.ancestors[: at + 1] + wf.ancestors)[:MAX_DEPTH]
            for ancestor in wf.ancestors:
                self.subtree.setdefault(ancestor, set()).add(wid)

    def is_descendant(self, wid: str, root: str) -> bool:
        """True if `wid` is `root` or lies below it."""
        if wid == root:
            return True
        wf = self.workflows.get(wid)
        return wf is not None and root in wf.ancestors

    def descendants(self, root: str) -> Iterator[Workflow]:
        for wid in self.subtree.get(root, ()):
            wf = self.workflows.get(wid)
            if wf is not None:
                yield wf

    def stats(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "node_epoch": self.node_epoch,
            "workflows": len(self.workflows),
            "terminal_workflows": len(self.terminal),
            "journal": {"first": self.journal.first_index + 1, "head": self.journal.next_index},
            "buffer": {"ring_bytes": self.ring_bytes, "total_bytes": self.limits.total_bytes},
            "counters": dict(self.counters),
            "rejected_by_reason": dict(self.rejected_by_reason),
        }
