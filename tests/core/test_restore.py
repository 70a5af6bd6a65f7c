"""Restore after a restart (core/restore.py, DESIGN.md §3, §4, §10),
against a model of the store.

`StoreModel` is broker/store/pg.py in a dict: `write` has `write_batch`'s
semantics (entries inserted once, ON CONFLICT DO NOTHING; a workflow's
row replaced, its snapshot only when the batch carries one or the epoch
changed) and `load` reads back what `pg.load` does (the rows active or
ended within `terminal_ttl`, in any order; per workflow the entries after
its snapshot and up to min(ring_events, restore_events // workflows)
before; the dedup window's ids, newest first).

A real BrokerState feeds it the way store/writer.py does (peek a batch,
`workflow_rows`, write, `committed`), at random points of a random ingest
of several workflows; a fresh BrokerState is then restored from the model
and compared with what the original had as of what was committed — and,
once everything is committed, with the original itself, also when both
go on ingesting the same events.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.core import restore as restore_mod
from broker.core.entry import Entry, Item, StoredFields
from broker.core.errors import InvalidArgument
from broker.core.filters import Filter
from broker.core.messages import SNAPSHOT, workflow_end
from broker.core.reader import (
    AT_INDEX,
    HISTORY,
    MultiReader,
    Start,
    WorkflowReader,
    plan_multi_start,
    plan_workflow_start,
)
from broker.core.restore import StoredEntry, StoredWorkflow, WorkflowRow, mark_committed, restore, workflow_rows
from broker.core.ring import Ring
from broker.core.spill import SpillQueue
from broker.core.state import BrokerState, IngestResult, Limits, Workflow

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WINDOW = 0.5
T0 = 1000.0
WALL = 1.7e9  # wall = now + WALL: the same clocks for both brokers
TTL = 600.0
NODE = "n1"


def wall_of(now: float) -> float:
    return now + WALL


# ----------------------------------------------------------------- helpers


class Epochs:
    """make_epoch: a fresh epoch each call, or `fixed` while it is set (so
    two brokers give a workflow created on both the same one)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0
        self.fixed: str | None = None

    def __call__(self) -> str:
        if self.fixed is not None:
            return self.fixed
        self.n += 1
        return f"{self.prefix}{self.n}"


class Recorder(SpillQueue):
    """A spill queue (unbounded) that also notes, as each entry is pushed,
    its workflow's snapshot right then: the snapshot as of that seq."""

    def __init__(self, state: BrokerState) -> None:
        super().__init__(10**9, 10**12)
        self.state = state
        self.snapshots: dict[tuple[str, int], dict[str, Any]] = {}
        self.log: list[Entry] = []

    def push(self, entry: Entry) -> bool:
        wf = self.state.workflows[entry.workflow_id]
        self.snapshots[(entry.workflow_id, entry.seq)] = wf.snapshot.to_message("snapshot", wf.epoch)
        self.log.append(entry)
        return super().push(entry)


def mk(limits: Limits, epochs: Epochs) -> BrokerState:
    return BrokerState(NODE, limits, make_epoch=epochs)


def original(limits: Limits) -> tuple[BrokerState, Recorder]:
    s = mk(limits, Epochs("ep"))
    rec = Recorder(s)
    s.spill = rec
    return s, rec


@dataclass
class StoredEvent:
    tenant: str
    event_id: str | None
    stored_at: int
    body: bytes
    entry: Entry  # the original's, for the checks

    @property
    def fields(self) -> StoredFields:
        """The columns pg.load reads besides the body."""
        e = self.entry
        return (e.workflow_id, e.epoch, e.seq, e.seq_from, e.kind, e.task_id, e.state, e.level)


@dataclass
class Got:
    workflows: list[StoredWorkflow]
    entries: list[StoredEntry]
    ids: list[tuple[str, str, int]]
    afters: dict[str, int]  # per workflow: the seq its entries were read after


@dataclass
class StoreModel:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[tuple[str, str, int], StoredEvent] = field(default_factory=dict)

    def write(self, batch: list[Entry], stored_at: int, rows: list[WorkflowRow]) -> None:
        """pg.write_batch."""
        for r in rows:
            if r.fresh:  # a new incarnation: first what the store held under its id and epoch goes
                for key in [k for k in self.events if k[0] == r.workflow_id and k[1] == r.epoch]:
                    del self.events[key]
                self.rows.pop(r.workflow_id, None)
        for e in batch:
            self.events.setdefault(
                (e.workflow_id, e.epoch, e.seq), StoredEvent(e.tenant, e.event_id, stored_at, e.body, e)
            )
        assert len({r.workflow_id for r in rows}) == len(rows)  # ON CONFLICT DO UPDATE: once per row
        for r in rows:
            new = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
            old = self.rows.get(r.workflow_id)
            if old is not None and r.snapshot is None and r.epoch == old["epoch"]:
                new["snapshot"], new["snapshot_seq"] = old["snapshot"], old["snapshot_seq"]
            self.rows[r.workflow_id] = new

    def load(
        self,
        *,
        now_ms: int,
        ring_events: int,
        restore_events: int,
        dedup_ids: int,
        dedup_age: float,
        rnd: random.Random,
    ) -> Got:
        """pg.load (rows in any order: SQL gives none)."""
        horizon = now_ms - int(TTL * 1000)
        rows = [
            r
            for r in self.rows.values()
            if r["terminal_seq"] is None or (r["terminal_wall"] is not None and r["terminal_wall"] > horizon)
        ]
        rnd.shuffle(rows)
        workflows = [
            StoredWorkflow(
                workflow_id=r["workflow_id"],
                tenant=r["tenant"],
                parent_id=r["parent_id"],
                epoch=r["epoch"],
                engine=r["engine"],
                first_seq=r["first_seq"],
                last_seq=r["last_seq"],
                terminal_seq=r["terminal_seq"],
                terminal_wall_ms=r["terminal_wall"],
                log_counts=tuple(orjson.loads(r["log_counts"])),
                snapshot=orjson.loads(r["snapshot"]) if r["snapshot"] is not None else None,
                snapshot_seq=r["snapshot_seq"] if r["snapshot"] is not None else 0,
            )
            for r in rows
        ]
        per = min(ring_events, restore_events // max(1, len(workflows)))
        afters = {w.workflow_id: min(w.snapshot_seq, max(0, w.last_seq - per)) for w in workflows}
        epochs = {w.workflow_id: w.epoch for w in workflows}
        entries = sorted(
            (
                StoredEntry(wid, seq, ev.body, ev.fields if rnd.random() < 0.5 else None)
                for (wid, epoch, seq), ev in self.events.items()
                if epochs.get(wid) == epoch and seq > afters[wid]
            ),
            key=lambda e: (e.workflow_id, e.seq),
        )
        recent = [ev for ev in self.events.values() if ev.stored_at > now_ms - int(dedup_age * 1000) and ev.event_id]
        recent.sort(key=lambda ev: ev.stored_at, reverse=True)
        ids = [(ev.tenant, ev.event_id, ev.stored_at) for ev in recent[:dedup_ids] if ev.event_id is not None]
        return Got(workflows, entries, ids, afters)

    def committed(self, wid: str, epoch: str) -> list[StoredEvent]:
        """A workflow's stored entries, in seq order."""
        got = [(seq, ev) for (w, ep, seq), ev in self.events.items() if w == wid and ep == epoch]
        return [ev for _, ev in sorted(got, key=lambda p: p[0])]


class Writer:
    """store/writer.py's `Store.serve` loop, one batch at a time."""

    def __init__(self, state: BrokerState, queue: SpillQueue, model: StoreModel) -> None:
        self.state = state
        self.queue = queue
        self.model = model
        self.unacked = 0  # a batch written whose commit was not acknowledged: it goes again

    def batch(self, n: int, now: float, *, lost_ack: bool = False, fails: bool = False) -> None:
        n = max(n, self.unacked)  # the writer's batch size is fixed: a retry covers at least the same entries
        batch = self.queue.peek(n)
        if not batch:
            return
        wall = wall_of(now)
        rows, saved = workflow_rows(self.state, batch, now, wall)
        if fails:  # the database did not answer: nothing written, it goes again
            return
        self.model.write(batch, int(wall * 1000), rows)
        if lost_ack:  # written, but the writer could not know: it writes the batch again
            self.unacked = len(batch)
            return
        self.unacked = 0
        self.queue.committed(len(batch))
        mark_committed(self.state, rows, saved, now)

    def drain(self, now: float, n: int = 7) -> None:
        while len(self.queue):
            self.batch(n, now)


def restored_from(
    model: StoreModel, limits: Limits, now: float, restore_events: int, rnd: random.Random
) -> tuple[BrokerState, Got]:
    wall = wall_of(now)
    got = model.load(
        now_ms=int(wall * 1000),
        ring_events=limits.ring_events,
        restore_events=restore_events,
        dedup_ids=limits.dedup_window,
        dedup_age=600.0,
        rnd=rnd,
    )
    r = mk(limits, Epochs("re"))
    result = restore(r, got.workflows, got.entries, got.ids, now, wall)
    assert result.workflows == len(got.workflows) == len(r.workflows)
    assert result.entries == len(got.entries)
    return r, got


def prefix(tenant: str) -> str:
    return "" if tenant == "default" else tenant + "\x00"


def bodies(items: Sequence[Item]) -> list[bytes]:
    return [i.body for i in items]


def expected_ancestors(s: BrokerState, wid: str) -> tuple[str, ...]:
    """A workflow's ancestry by its parents as `s` knows them: up the
    parents of the same tenant, stopping at one of another tenant or one
    `s` does not hold (the generated trees have no cycles)."""
    wf = s.workflows[wid]
    out: list[str] = []
    while wf.parent_id is not None:
        parent = s.workflows.get(wf.parent_id)
        if parent is not None and parent.tenant != wf.tenant:
            break
        out.append(wf.parent_id)
        if parent is None:
            break
        wf = parent
    return tuple(out)


def subtree_of(s: BrokerState) -> dict[str, set[str]]:
    return {k: set(v) for k, v in s.subtree.items() if v}


# ---------------------------------------------------------------- scenario

TENANTS = ("default", "acme")
TASKS = ("t0", "t1")
LEVELS = ("debug", "info", "warning", "error", "critical")
TERMINAL = ("workflow.completed", "workflow.failed", "workflow.cancelled")


@st.composite
def event_body(draw: st.DrawFn) -> dict[str, Any]:
    what = draw(
        st.sampled_from(
            ["running", "suspended", "task", "task", "progress", "log", "log", "custom", "terminal", "task_log"]
        )
    )
    ev: dict[str, Any]
    if what == "running":
        ev = {"type": "workflow.running"}
        if draw(st.booleans()):
            ev["message"] = "go"
    elif what == "suspended":
        ev = {"type": "workflow.suspended"}
    elif what == "task":
        state = draw(st.sampled_from(["created", "running", "completed", "failed", "retrying"]))
        ev = {"type": f"task.{state}", "task_id": draw(st.sampled_from(TASKS))}
        if state == "completed":
            ev["result"] = {"r": draw(st.integers(0, 9))}
        elif state == "failed":
            ev["error"] = {"e": "boom"}
    elif what == "progress":
        ev = {"type": "task.progress", "task_id": draw(st.sampled_from(TASKS)), "progress": draw(st.integers(0, 100))}
        if draw(st.booleans()):
            ev["message"] = "step"
    elif what in ("log", "task_log"):
        ev = {"type": "log", "level": draw(st.sampled_from(LEVELS)), "message": "line"}
        if what == "task_log":
            ev["task_id"] = draw(st.sampled_from(TASKS))
    elif what == "custom":
        ev = {"type": "timer.fired", "data": {"n": draw(st.integers(0, 5))}}
    else:
        ev = {"type": draw(st.sampled_from(TERMINAL))}
        if ev["type"] == "workflow.completed":
            ev["result"] = [1, 2]
        elif ev["type"] == "workflow.failed":
            ev["error"] = "bad"
    if draw(st.integers(0, 3)) == 0:
        ev["ts"] = draw(st.integers(5000, 5100))
    return ev


@dataclass
class Spec:
    wid: str
    tenant: str
    engine: bool
    parent: str | None
    seqs: list[int]  # engine: the seqs its events carry
    gaps: list[int]  # engine: seqs it skipped


@st.composite
def workflow_events(
    draw: st.DrawFn, spec: Spec, count: int, first_seq: int, ids: list[str], tag: str
) -> list[dict[str, Any]]:
    """`count` events of `spec`'s workflow (engine: seqs from `first_seq`,
    skipping some: gaps)."""
    out = []
    seq = first_seq
    for k in range(count):
        ev = {"workflow_id": spec.wid, **draw(event_body())}
        if spec.engine:
            ev["seq"] = seq
            spec.seqs.append(seq)
            step = draw(st.sampled_from([1, 1, 1, 2, 3]))
            spec.gaps.extend(range(seq + 1, seq + step))
            seq += step
        if spec.tenant != "default" or draw(st.booleans()):
            ev["tenant"] = spec.tenant
        if spec.parent is not None and draw(st.booleans()):
            ev["parent_id"] = spec.parent
        how = draw(st.sampled_from(["own", "own", "none", "shared"]))
        if how == "own":
            ev["id"] = f"{spec.wid}.{tag}{k}"
        elif how == "shared":  # the same id in several workflows (and tenants)
            ev["id"] = draw(st.sampled_from(ids))
        out.append(ev)
    return out


@dataclass
class Scenario:
    specs: list[Spec]
    frames: list[bytes]
    steps: list[tuple[float, bool, int, str]]  # per frame, before it: (dt, tick, commit batch, how)
    ring_events: int
    ring_bytes: int
    restore_events: int
    snapshot_every: int
    seed: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, 4))
    specs: list[Spec] = []
    events: list[dict[str, Any]] = []
    shared = ["s0", "s1"]
    for i in range(n):
        wid = f"w{i}"
        engine = draw(st.booleans())
        # Chains (a parent's parent) and trees across tenants, without cycles.
        parent = draw(st.sampled_from([None, "ghost"] + [f"w{j}" for j in range(i)] + [f"w{i - 1}"] * (i > 0)))
        tenant = draw(st.sampled_from(TENANTS))
        if parent is not None and parent != "ghost" and draw(st.booleans()):
            tenant = specs[int(parent[1:])].tenant
        spec = Spec(wid, tenant, engine, parent, [], [])
        first = draw(st.sampled_from([1, 1, 3])) if engine else 1
        events.extend(draw(workflow_events(spec, draw(st.integers(1, 9)), first, shared, "a")))
        specs.append(spec)
    # Re-sent copies (duplicates by id, or by seq)
    copies = draw(st.lists(st.sampled_from(events), max_size=3))
    order = draw(st.permutations(events + copies))
    frames: list[bytes] = []
    i = 0
    while i < len(order):
        size = draw(st.integers(1, 4))
        part = order[i : i + size]
        i += size
        frames.append(orjson.dumps(part[0] if len(part) == 1 and draw(st.booleans()) else part))
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0.0, 0.0, 0.2, 0.6]),
                st.booleans(),
                st.sampled_from([0, 0, 1, 2, 3, 5, 8]),
                st.sampled_from(["ok", "ok", "ok", "lost_ack", "fails"]),
            ),
            min_size=len(frames) + 1,
            max_size=len(frames) + 1,
        )
    )
    return Scenario(
        specs=specs,
        frames=frames,
        steps=steps,
        ring_events=draw(st.sampled_from([2, 4, 1024])),
        ring_bytes=draw(st.sampled_from([1500, 1048576])),
        restore_events=draw(st.sampled_from([0, 6, 30, 200000])),
        snapshot_every=draw(st.sampled_from([2, 256])),
        seed=draw(st.integers(0, 2**32)),
    )


# ------------------------------------------------------------------ checks


def check_restored_as_committed(o: BrokerState, rec: Recorder, model: StoreModel, r: BrokerState, got: Got) -> None:
    """`r` holds every workflow with a committed entry, as the original
    had it as of its last committed entry."""
    committed = {wid: model.committed(wid, wf.epoch) for wid, wf in o.workflows.items()}
    committed = {wid: evs for wid, evs in committed.items() if evs}
    assert set(r.workflows) == set(committed)
    for wid, evs in committed.items():
        ow, rw = o.workflows[wid], r.workflows[wid]
        last = evs[-1].entry
        assert (rw.epoch, rw.tenant, rw.parent_id, rw.seq.engine) == (ow.epoch, ow.tenant, ow.parent_id, ow.seq.engine)
        assert rw.seq.last_seq == last.seq
        assert rw.seq.first_seq == ow.seq.first_seq
        assert rw.visible
        assert rw.snapshot.to_message("snapshot", rw.epoch) == rec.snapshots[(wid, last.seq)], wid
        assert rw.log_counts == last.log_counts
        # The ring: the last entries read back, within the ring's bounds,
        # byte for byte, with their running log counts and flags.
        ring: Ring[Entry] = Ring(o.limits.ring_events, o.limits.ring_bytes)
        for ev in evs:
            if ev.entry.seq > got.afters[wid]:
                ring.append(ev.entry)
        want = list(ring)
        held = list(rw.ring)
        assert bodies(held) == bodies(want)
        for a, b in zip(held, want, strict=True):
            assert a.log_counts == b.log_counts, (wid, a.seq)
            assert (a.terminal, a.after_terminal, a.seq_from, a.kind, a.task_id, a.state, a.level) == (
                b.terminal,
                b.after_terminal,
                b.seq_from,
                b.kind,
                b.task_id,
                b.state,
                b.level,
            )
            assert (a.workflow_id, a.epoch, a.seq, a.tenant) == (b.workflow_id, b.epoch, b.seq, b.tenant)
            assert a.ancestors == rw.ancestors
            assert a.cursor == b.cursor and a.size == b.size
        assert r.ring_bytes == sum(w.ring.bytes for w in r.workflows.values())
        # The gaps it released, as far as read back: a straggler from one is late.
        gaps: deque[tuple[int, int]] = deque(maxlen=16)
        for ev in evs:
            if ev.entry.kind == "gap" and ev.entry.seq > got.afters[wid]:
                gaps.append((ev.entry.seq_from, ev.entry.seq))
        assert list(rw.seq.gaps) == list(gaps)
        # Terminal: kept with when it ended.
        if ow.terminal_seq is not None and ow.terminal_seq <= last.seq:
            assert rw.terminal_seq == ow.terminal_seq
            assert ow.terminal_at is not None and rw.terminal_at is not None
            assert abs(rw.terminal_at - ow.terminal_at) < 0.002
            assert wid in r.terminal and wid in r.terminal_lru
            assert workflow_end(rw).body == workflow_end(ow).body
        else:
            assert rw.terminal_seq is None and wid not in r.terminal
        # The dedup window: every committed id.
        for ev in evs:
            if ev.event_id is not None:
                assert prefix(ev.tenant) + ev.event_id in r.ids
    for wid in r.workflows:
        assert r.workflows[wid].ancestors == expected_ancestors(r, wid)
        for ancestor in r.workflows[wid].ancestors:
            assert wid in r.subtree[ancestor]
    assert sum(len(v) for v in r.subtree.values()) == sum(len(w.ancestors) for w in r.workflows.values())
    assert r.reordering == set()


def readers_from(wf: Workflow, seq: int, flt: Filter, coalesce_after: int = 256) -> WorkflowReader:
    start = plan_workflow_start(wf, last_event_id=f"{wf.epoch}:{seq}")
    return WorkflowReader(wf, flt, start, coalesce_after=coalesce_after)


def check_same_as_original(o: BrokerState, r: BrokerState) -> None:
    """Everything committed: `r` is `o` as far as a store can tell."""
    assert set(r.workflows) == set(o.workflows)
    for wid, ow in o.workflows.items():
        rw = r.workflows[wid]
        assert rw.snapshot.to_message("snapshot", rw.epoch) == ow.snapshot.to_message("snapshot", ow.epoch)
        assert rw.seq.next_seq == ow.seq.next_seq
        assert rw.log_counts == ow.log_counts
        assert rw.ancestors == ow.ancestors, wid
        assert rw.terminal_seq == ow.terminal_seq
        held = list(rw.ring)
        assert bodies(held) == bodies(list(ow.ring)[len(ow.ring) - len(held) :])
        assert rw.oldest_cursor_seq() >= ow.oldest_cursor_seq()
    assert subtree_of(r) == subtree_of(o)
    assert set(r.terminal) == set(o.terminal)
    assert set(r.ids._seen) == set(o.ids._seen)
    assert r._next_id == o._next_id  # the ids it makes go on


def plan(wf: Workflow, **cursor: Any) -> tuple[str, int]:
    """(mode, seq) of a stream's start, ("400", 0) for an InvalidArgument."""
    try:
        got = plan_workflow_start(wf, **cursor)
    except InvalidArgument:
        return ("400", 0)
    return (got.mode, got.seq)


def check_resume(o: BrokerState, r: BrokerState) -> None:
    """A cursor from before, within the restored ring, resumes exactly
    after it; `since=` too. One older than the restored ring is the
    store's to serve (HISTORY)."""
    for wid, rw in r.workflows.items():
        ow = o.workflows[wid]
        oldest = rw.oldest_cursor_seq()
        top = max([rw.snapshot.seq, *(e.seq for e in rw.ring)]) + 1
        for seq in range(top + 1):
            cursor = f"{rw.epoch}:{seq}"
            if seq < oldest:
                if rw.terminal_seq is None or seq < rw.terminal_seq:
                    assert plan(rw, last_event_id=cursor, stored=True) == (HISTORY, seq)
                    if seq:  # since=0: from the oldest held (below)
                        assert plan(rw, since=seq, stored=True) == (HISTORY, seq)
                continue
            assert plan(rw, last_event_id=cursor) == plan(ow, last_event_id=cursor), (wid, seq)
            assert plan(rw, since=seq) == plan(ow, since=seq), (wid, seq)
            for flt in (Filter(), Filter(view="logs"), Filter.parse({"coalesce": "true"})):
                a, b = readers_from(ow, seq, flt), readers_from(rw, seq, flt)
                assert bodies(b.pull()) == bodies(a.pull()), (wid, seq)
                assert b.resume_cursor == a.resume_cursor and b.done == a.done
        if len(rw.ring) == len(ow.ring) and not ow.ring.dropped:  # the restored ring holds it all
            assert plan(rw, since=0) == plan(ow, since=0), wid
            pa, pb = plan_workflow_start(ow, since=0), plan_workflow_start(rw, since=0)
            if pa.mode == AT_INDEX:
                ra = WorkflowReader(ow, Filter(), pa)
                rb = WorkflowReader(rw, Filter(), pb)
                assert bodies(rb.pull()) == bodies(ra.pull())


def multi_pull(s: BrokerState, flt: Filter | None = None, **scope: Any) -> tuple[bool, list[bytes]]:
    m = MultiReader(s, flt or Filter(), Start(SNAPSHOT), **scope)
    done = m.done
    return done, sorted(bodies(m.pull()))


def check_multi(o: BrokerState, r: BrokerState) -> None:
    """`parent=` (and `workflows=`, `tenant=`) streams see the same
    workflows, the same snapshots, and end alike."""
    for root in [*o.workflows, "ghost"]:
        assert multi_pull(r, parent=root) == multi_pull(o, parent=root), root
        assert multi_pull(r, Filter(view="logs"), parent=root) == multi_pull(o, Filter(view="logs"), parent=root)
    for wid in o.workflows:
        assert multi_pull(r, workflows=frozenset({wid})) == multi_pull(o, workflows=frozenset({wid})), wid
    for tenant in TENANTS:
        assert multi_pull(r, tenant=tenant) == multi_pull(o, tenant=tenant)


def same_result(a: IngestResult, b: IngestResult) -> None:
    assert (b.accepted, b.duplicates, b.touched, b.created) == (a.accepted, a.duplicates, a.touched, a.created)
    assert [(i, x.reason) for i, x in b.rejected] == [(i, x.reason) for i, x in a.rejected]


# ------------------------------------------------------------------ the test


@st.composite
def further(draw: st.DrawFn, specs: list[Spec], unknown_gaps: dict[str, list[tuple[int, int]]]) -> list[bytes]:
    """Events both brokers get after the restart: more of each workflow
    (engine seqs going on, with stragglers of its gaps — where the restored
    one read back the gaps the original knows — and of old seqs), ids
    re-sent, and a new child workflow."""
    events: list[dict[str, Any]] = []
    shared = ["s0", "s1", "s2"]
    for spec in specs:
        spec = dataclasses.replace(spec, seqs=list(spec.seqs), gaps=list(spec.gaps))
        more = draw(st.integers(0, 4))
        nxt = (max(spec.seqs) + 1) if spec.seqs else 1
        events.extend(draw(workflow_events(spec, more, nxt, shared, "b")))
        if spec.engine and draw(st.booleans()):
            unknown = unknown_gaps.get(spec.wid, [])
            olds = [q for q in spec.gaps + spec.seqs if not any(lo <= q <= hi for lo, hi in unknown)]
            straggler = draw(st.sampled_from(olds or [1]))
            events.append({"workflow_id": spec.wid, "type": "timer.fired", "seq": straggler, "tenant": spec.tenant})
    child = Spec(
        "w9", draw(st.sampled_from(TENANTS)), draw(st.booleans()), draw(st.sampled_from([s.wid for s in specs])), [], []
    )
    events.extend(draw(workflow_events(child, draw(st.integers(0, 3)), 1, shared, "c")))
    order = draw(st.permutations(events))
    return [orjson.dumps(ev) for ev in order]


@pytest.mark.slow
@SETTINGS
@given(scenarios(), st.data())
def test_restore_matches_what_was_committed(sc: Scenario, data: st.DataObject) -> None:
    with mock.patch.object(restore_mod, "SNAPSHOT_EVERY", sc.snapshot_every):
        run_scenario(sc, data)


def run_scenario(sc: Scenario, data: st.DataObject) -> None:
    limits = Limits(reorder_window=WINDOW, ring_events=sc.ring_events, ring_bytes=sc.ring_bytes, terminal_ttl=TTL)
    rnd = random.Random(sc.seed)
    o, rec = original(limits)
    model = StoreModel()
    writer = Writer(o, rec, model)
    now = T0

    def step(dt: float, tick: bool, n: int, how: str) -> None:
        nonlocal now
        now += dt
        if tick:
            o.tick(now, wall_of(now))
        if n:
            writer.batch(n, now, lost_ack=how == "lost_ack", fails=how == "fails")

    for frame, (dt, tick, n, how) in zip(sc.frames, sc.steps, strict=False):
        step(dt, tick, n, how)
        o.ingest_frame(frame, now, wall=wall_of(now))
    step(*sc.steps[-1])

    for wid, wf in o.workflows.items():
        evs = model.committed(wid, wf.epoch)
        row = model.rows.get(wid)
        if row is not None and row["snapshot"] is not None and row["snapshot_seq"] < row["last_seq"]:
            event("restored: entries replayed after an older snapshot")
        if row is not None and row["snapshot"] is None:
            event("restored: no snapshot saved")
        if evs and len(evs) < len(wf.ring):
            event("restored: part committed")
        if any(e.entry.after_terminal for e in evs):
            event("restored: entries after terminal")
        if any(e.entry.kind == "gap" for e in evs):
            event("restored: gaps")
        if wf.parent_id is not None and wf.parent_id in o.workflows and o.workflows[wf.parent_id].tenant != wf.tenant:
            event("parent of another tenant")
        if len(wf.ancestors) > 1:
            event("grandparent")
    if writer.unacked:
        event("lost ack pending")

    # (1) A restart now: some entries committed, some not, some waiting to be ordered.
    r, got = restored_from(model, limits, now + 1.0, sc.restore_events, rnd)
    check_restored_as_committed(o, rec, model, r, got)

    # (2) Everything released and committed, then a restart.
    now += 2 * WINDOW
    o.tick(now, wall_of(now))
    writer.drain(now)
    assert not o.reordering
    r, got = restored_from(model, limits, now, sc.restore_events, rnd)
    check_restored_as_committed(o, rec, model, r, got)
    check_same_as_original(o, r)
    check_resume(o, r)
    check_multi(o, r)

    # A re-sent id is refused as a duplicate.
    for wid, wf in o.workflows.items():
        for ev in model.committed(wid, wf.epoch):
            if ev.event_id is not None:
                resend = {"workflow_id": wid, "type": "timer.fired", "id": ev.event_id, "tenant": wf.tenant}
                res = r.ingest_frame(orjson.dumps(resend), now, wall=wall_of(now))
                assert (res.accepted, res.duplicates) == (0, 1)
                break

    # (3) Both go on with the same events at the same clocks: the same
    # results, the same bytes released, the same state.
    logs_a = {
        wid: readers_from(wf, wf.snapshot.seq, Filter(view="logs"), coalesce_after=2) for wid, wf in o.workflows.items()
    }
    logs_b = {
        wid: readers_from(wf, wf.snapshot.seq, Filter(view="logs"), coalesce_after=2) for wid, wf in r.workflows.items()
    }
    for wid in logs_a:
        assert bodies(logs_b[wid].pull()) == bodies(logs_a[wid].pull())
    rec_b = Recorder(r)
    r.spill = rec_b
    start_a = len(rec.log)
    for state in (o, r):
        assert isinstance(state.make_epoch, Epochs)
        state.make_epoch.fixed = "later"
    # The gaps the restored one did not read back (older than its entries): a
    # straggler from one is a duplicate there, late here; not sent.
    unknown_gaps = {
        wid: [g for g in wf.seq.gaps if g not in r.workflows[wid].seq.gaps] for wid, wf in o.workflows.items()
    }
    for frame in data.draw(further(sc.specs, unknown_gaps)):
        now += data.draw(st.sampled_from([0.0, 0.1, 0.3]))
        a = o.ingest_frame(frame, now, wall=wall_of(now))
        b = r.ingest_frame(frame, now, wall=wall_of(now))
        same_result(a, b)
        for wid, x in logs_a.items():
            assert bodies(logs_b[wid].pull()) == bodies(x.pull()), wid
    now += 2 * WINDOW
    same_result(o.tick(now, wall_of(now)), r.tick(now, wall_of(now)))
    # Per workflow (tick releases the workflows it orders in no set order).
    for wid in o.workflows:
        a_log = [e for e in rec.log[start_a:] if e.workflow_id == wid]
        b_log = [e for e in rec_b.log if e.workflow_id == wid]
        assert bodies(b_log) == bodies(a_log), wid
        assert [(e.ancestors, e.log_counts, e.terminal, e.after_terminal) for e in b_log] == [
            (e.ancestors, e.log_counts, e.terminal, e.after_terminal) for e in a_log
        ]
    assert len(rec_b.log) == len(rec.log) - start_a
    for wid, x in logs_a.items():
        assert bodies(logs_b[wid].pull()) == bodies(x.pull()), wid
    check_same_as_original(o, r)
    check_multi(o, r)


# ------------------------------------------------------------ plain cases


def ingest_all(s: BrokerState, *events: dict[str, Any], now: float = T0) -> None:
    for ev in events:
        res = s.ingest_frame(orjson.dumps(ev), now, wall=wall_of(now))
        assert res.accepted == 1, res.rejected


def restart(o: BrokerState, rec: Recorder, now: float, restore_events: int = 200000) -> tuple[BrokerState, StoreModel]:
    model = StoreModel()
    Writer(o, rec, model).drain(now)
    r, _ = restored_from(model, o.limits, now, restore_events, random.Random(0))
    return r, model


def test_engine_workflow_that_starts_after_seq_1_resumes_from_since_0() -> None:
    o, rec = original(Limits(reorder_window=WINDOW))
    ingest_all(
        o, {"workflow_id": "w", "type": "workflow.running", "seq": 5}, {"workflow_id": "w", "type": "x", "seq": 6}
    )
    o.tick(T0 + 1)
    assert o.workflows["w"].seq.first_seq == 5 and not o.workflows["w"].ring.dropped
    r, _ = restart(o, rec, T0 + 1)
    for s in (o, r):
        start = plan_workflow_start(s.workflows["w"], since=0)
        assert start.mode == AT_INDEX
        got = WorkflowReader(s.workflows["w"], Filter(), start).pull()
        assert [body["seq"] for body in map(orjson.loads, bodies(got))] == [5, 6]


def test_terminal_workflow_stream_ends_after_restore() -> None:
    o, rec = original(Limits(reorder_window=WINDOW))
    ingest_all(o, {"workflow_id": "p", "type": "workflow.completed"})
    ingest_all(o, {"workflow_id": "c", "type": "workflow.failed", "parent_id": "p"})
    r, _ = restart(o, rec, T0 + 1)
    for s in (o, r):
        assert MultiReader(s, Filter(), Start(SNAPSHOT), workflows=frozenset({"p", "c"})).done
        assert MultiReader(s, Filter(), Start(SNAPSHOT), parent="p").done


def test_broker_assigned_ids_go_on_after_restore() -> None:
    o, rec = original(Limits(reorder_window=WINDOW))
    ingest_all(o, {"workflow_id": "a", "type": "x", "tenant": "acme"}, {"workflow_id": "b", "type": "x"})
    r, _ = restart(o, rec, T0 + 1)
    for s in (o, r):
        ingest_all(s, {"workflow_id": "b", "type": "y"}, {"workflow_id": "a", "type": "y", "tenant": "acme"})
    ids_o = [orjson.loads(e.body)["id"] for e in o.journal][-2:]
    ids_r = [orjson.loads(e.body)["id"] for e in r.journal]
    assert ids_r == ids_o == ["n1-3", "n1-4"]


def test_straggler_of_a_released_gap_is_late_after_restore() -> None:
    o, rec = original(Limits(reorder_window=WINDOW))
    ingest_all(
        o, {"workflow_id": "w", "type": "workflow.running", "seq": 1}, {"workflow_id": "w", "type": "x", "seq": 4}
    )
    o.tick(T0 + 1)
    r, _ = restart(o, rec, T0 + 1)
    for s in (o, r):
        res = s.ingest_frame(orjson.dumps({"workflow_id": "w", "type": "x", "seq": 2}), T0 + 2)
        assert [x.reason for _, x in res.rejected] == ["late_seq"]


def test_resumed_log_stream_counts_only_what_it_skipped_after_restore() -> None:
    # A multi-workflow log stream opened after the restart and resumed from
    # its cursor falls behind on a restored workflow it has not read yet: its
    # gap counts the lines it skipped, not those from before the restart too.
    o, rec = original(Limits(reorder_window=WINDOW))
    ingest_all(o, {"workflow_id": "a", "type": "workflow.running"})
    ingest_all(o, *({"workflow_id": "w", "type": "log", "level": "info", "message": "old"} for _ in range(5)))
    r, _ = restart(o, rec, T0 + 1)
    flt = Filter(view="logs")
    first = MultiReader(r, flt, Start(SNAPSHOT), tenant="default")
    first.pull()
    cursor = first.resume_cursor
    ingest_all(r, {"workflow_id": "a", "type": "log", "level": "info", "message": "a"})
    resumed = MultiReader(r, flt, plan_multi_start(r, last_event_id=cursor), tenant="default", coalesce_after=1)
    assert [orjson.loads(b)["workflow_id"] for b in bodies(resumed.pull())] == ["a"]
    ingest_all(r, *({"workflow_id": "w", "type": "log", "level": "info", "message": "new"} for _ in range(5)))
    got = [orjson.loads(b) for b in bodies(resumed.pull())]
    assert [(m["kind"], m["workflow_id"], m["dropped"]) for m in got] == [("gap", "w", 5)]


def test_engine_workflow_started_again_after_eviction_restores_as_the_new_one() -> None:
    o, rec = original(Limits(reorder_window=WINDOW, terminal_ttl=10.0))
    model = StoreModel()
    writer = Writer(o, rec, model)
    ingest_all(o, {"workflow_id": "w", "type": "workflow.running", "seq": 1, "data": "old"})
    ingest_all(o, {"workflow_id": "w", "type": "workflow.completed", "seq": 2})
    writer.drain(T0)
    o.tick(T0 + 20, wall_of(T0 + 20))  # past terminal_ttl: evicted
    assert "w" not in o.workflows
    ingest_all(o, {"workflow_id": "w", "type": "workflow.running", "seq": 1, "data": "new"}, now=T0 + 21)
    writer.drain(T0 + 21)
    r, _ = restored_from(model, o.limits, T0 + 22, 200000, random.Random(0))
    rw, ow = r.workflows["w"], o.workflows["w"]
    assert bodies(list(rw.ring)) == bodies(list(ow.ring))
    assert rw.snapshot.to_message("snapshot", "e") == ow.snapshot.to_message("snapshot", "e")
