"""Readers: what one subscriber receives next, read straight from the rings.

A reader holds a cursor (an absolute ring or journal index), never a queue
of copies: `pull()` returns everything pending for its subscriber, already
filtered, ready to be joined into one write. A reader that has fallen off
the ring, or is more than `coalesce_after` entries behind, skips ahead and
gets one `resync` snapshot (state streams) or one `gap` with the count of
lines it lost (log streams).

- `WorkflowReader`: one workflow (the /v1/workflows/{id}/… streams).
- `MultiReader`: the node journal, scoped by `workflows=`, `tenant=` or
  `parent=` (descendants included, also those that start later).

`plan_workflow_start` / `plan_multi_start` turn the client's cursor into a
start position with exactly the 400 / resync / 204 rules of DESIGN.md §5.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .cursor import parse_journal_cursor, parse_workflow_cursor, since_seq
from .entry import NO_LOGS, Entry, Item, level_slot
from .errors import InvalidArgument
from .filters import Filter
from .messages import RESYNC, SNAPSHOT, end_message, gap_message, state_message, workflow_end
from .scope import MULTI_KINDS, PARENT, TENANT, WORKFLOWS, Scope
from .state import BrokerState, Workflow

AT_INDEX = "index"
NO_CONTENT = "no_content"  # HTTP 204: the cursor is already at the terminal event
HISTORY = "history"  # the cursor is older than the ring: the store has what follows it


@dataclass(frozen=True)
class Start:
    mode: str  # SNAPSHOT, RESYNC, AT_INDEX or NO_CONTENT
    index: int = 0
    seq: int = 0  # AT_INDEX on a workflow: the cursor's seq (what the client has)


def plan_workflow_start(
    wf: Workflow, *, last_event_id: str | None = None, since: str | int | None = None, stored: bool = False
) -> Start:
    """Where a single-workflow stream starts.

    Last-Event-ID (header or `last_event_id=`) wins over `since=`, because an
    EventSource reconnects to the same URL, `since` and all, and adds it.
    With a store (`stored`), a cursor older than the ring starts from the
    store (HISTORY) instead of a `resync` or a 400; `since=0` then means the
    first stored event.
    """
    ring = wf.ring
    head = wf.snapshot.seq
    if last_event_id is not None:
        parsed = parse_workflow_cursor(last_event_id)
        if parsed is None or parsed[0] != wf.epoch or parsed[1] > head:
            return Start(RESYNC)
        seq = parsed[1]
        if wf.terminal_seq is not None and seq >= wf.terminal_seq:
            return Start(NO_CONTENT)
        if seq < wf.oldest_cursor_seq():
            return Start(HISTORY, seq=seq) if stored else Start(RESYNC)
        return Start(AT_INDEX, ring.index_after_seq(seq), seq)
    if since is not None:
        seq = since_seq(since, from_query=isinstance(since, str))
        if seq > head:
            raise InvalidArgument(f"'since' {seq} is ahead of the workflow's last seq {head}")
        oldest = wf.oldest_cursor_seq()
        if seq == 0:
            if ring.dropped:
                if stored:
                    return Start(HISTORY, seq=0)
                raise InvalidArgument(f"the first events are no longer held; oldest available since is {oldest}")
            seq = oldest
        elif seq < oldest:
            if stored:
                return Start(HISTORY, seq=seq)
            raise InvalidArgument(f"'since' {seq} is older than the ring; oldest available since is {oldest}")
        if wf.terminal_seq is not None and seq >= wf.terminal_seq:
            return Start(NO_CONTENT)
        return Start(AT_INDEX, ring.index_after_seq(seq), seq)
    return Start(SNAPSHOT)


def plan_multi_start(state: BrokerState, *, last_event_id: str | None = None, since: str | None = None) -> Start:
    """Where a multi-workflow stream starts (journal cursors `<epoch>.<offset>`)."""
    journal = state.journal
    text = last_event_id if last_event_id is not None else since
    if text is None:
        return Start(SNAPSHOT)
    parsed = parse_journal_cursor(text)
    ok = parsed is not None and parsed[0] == state.node_epoch and journal.first_index <= parsed[1] <= journal.next_index
    if ok:
        assert parsed is not None
        return Start(AT_INDEX, parsed[1])  # offset N = index of the entry after it
    if last_event_id is not None:
        return Start(RESYNC)
    raise InvalidArgument(
        "'since' must be a journal cursor of this node within reach: "
        f"{state.node_epoch}.{journal.first_index}..{state.node_epoch}.{journal.next_index}"
    )


def coalesce(items: list[Item], states: bool = False) -> tuple[list[Item], int]:
    """Keep only the latest progress (and with `states`, the latest task state)
    of each task among the items of one write (DESIGN.md §6); return the
    kept items, in order, and how many were dropped."""
    if len(items) < 2:
        return items, 0
    seen: set[tuple[str, str, str]] = set()
    kept: list[Item] = []
    for it in reversed(items):
        if (
            isinstance(it, Entry)
            and it.task_id is not None
            and (it.kind == "progress" or (states and it.kind == "state"))
        ):
            key = (it.workflow_id, it.task_id, it.kind)
            if key in seen:
                continue
            seen.add(key)
        kept.append(it)
    kept.reverse()
    return kept, len(items) - len(kept)


class WorkflowReader:
    __slots__ = (
        "counters",
        "wf",
        "filter",
        "coalesce_after",
        "index",
        "seq",
        "log_counts",
        "_idle",
        "_opening",
        "done",
        "coalesced",
        "wants_history",
        "_page",
    )  # one per subscriber: no per-instance dict

    def __init__(
        self,
        wf: Workflow,
        flt: Filter,
        start: Start,
        *,
        coalesce_after: int = 256,
        counters: Counter[str] | None = None,
    ) -> None:
        # Shared with the adapter (metrics): coalesced, resyncs, gaps.
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.wf = wf
        self.filter = flt
        self.coalesce_after = coalesce_after
        self.index = start.index
        self.seq = start.seq  # the last seq this reader has passed
        self.log_counts = self._log_counts_before(start.index)
        # Lag is what piled up while this subscriber was busy writing: a
        # reader that was idle (caught up, or just opened: a resume replays
        # the ring from its cursor in full) gets everything the ring holds,
        # however large the burst that woke it.
        self._idle = True
        self._opening: str | None = start.mode if start.mode in (SNAPSHOT, RESYNC) else None
        self.done = start.mode == NO_CONTENT
        self.coalesced = 0  # progress/state messages merged away
        # HISTORY: the entries after the cursor come from the store, a page
        # at a time (`feed`), until the ring has what follows; meanwhile
        # `wants_history` says the adapter must fetch the next page.
        self.wants_history = start.mode == HISTORY
        self._page: list[Entry] | None = [] if self.wants_history else None

    def set_filter(self, flt: Filter) -> None:
        self.filter = flt

    def feed(self, page: list[Entry]) -> None:
        """The store's next entries after `seq`, in order ([]: it has
        none, or could not be read: the subscriber gets a `resync`)."""
        self.wants_history = False
        if page:
            self._page = page
        else:
            self._page = None
            self._opening = RESYNC

    def _paging(self) -> bool:
        return self._page is not None

    def _from_page(self) -> list[Item]:
        """The entries of the fetched page; then either the next page is
        wanted or the ring takes over after the last one."""
        assert self._page is not None
        out: list[Item] = []
        flt = self.filter
        wf = self.wf
        for e in self._page:
            if e.seq <= self.seq or e.after_terminal:
                continue
            if e.seq_from > self.seq + 1:  # the store lacks some (its spill queue overflowed)
                missing = e.seq_from - self.seq - 1
                out.append(gap_message(wf.id, wf.epoch, self.seq + 1, e.seq_from - 1, missing))
            self.seq = e.seq
            if flt.matches(e):
                out.append(e)
            if e.terminal:
                out.append(end_message(e.workflow_id, e.epoch, e.seq, e.state))
                self.done = True
                self._page = None
                return out
        if self.seq < wf.oldest_cursor_seq():
            self._page = []
            self.wants_history = True
            return out
        self._page = None
        self.index = wf.ring.index_after_seq(self.seq)
        self.log_counts = self._log_counts_before(self.index)
        self._idle = True
        return out

    @property
    def resume_cursor(self) -> str:
        """The cursor to resume after everything pulled so far."""
        return f"{self.wf.epoch}:{self.seq}"

    @property
    def behind(self) -> int:
        """Events of its workflow it has not passed yet (0 once done, or
        while its opening snapshot, which covers them all, is still due)."""
        if self.done or self._opening is not None:
            return 0
        return max(0, self.wf.snapshot.seq - self.seq)

    def written(self) -> None:
        """The adapter's write of what it pulled last is done. If nothing
        came meanwhile, this subscriber is caught up: the next burst, however
        large, comes whole (a burst that piles up during a write is what
        `coalesce_after` is for). A direct write is done when it returns,
        so an SSE stream written that way says so after every write."""
        if self.wf.ring.next_index == self.index:
            self._idle = True

    def _log_counts_before(self, index: int) -> tuple[int, ...]:
        ring = self.wf.ring
        if not ring.first_index <= index < ring.next_index:
            return self.wf.log_counts
        e = ring.at(index)
        if e.kind != "log" or e.after_terminal:
            return e.log_counts
        counts = list(e.log_counts)
        counts[level_slot(e.level)] -= 1
        return tuple(counts)

    def _snapshot(self, kind: str) -> list[Item]:
        wf = self.wf
        out: list[Item] = [state_message(wf, kind, self.filter.tasks)]
        self.index = wf.ring.next_index
        self.seq = wf.snapshot.seq
        self.log_counts = wf.log_counts
        if wf.terminal:
            out.append(workflow_end(wf))
            self.done = True
        return out

    def pull(self) -> list[Item]:
        """Everything pending for this subscriber, in order; [] if nothing."""
        if self.done:
            return []
        out: list[Item]
        if self._opening is not None:
            out = self._snapshot(self._opening)
            self._opening = None
            if self.done:
                return out
        else:
            out = []
        if self._page is not None:
            if self.wants_history:
                return out
            out.extend(self._from_page())
            # Asked again, through a call: `_from_page` may have cleared it,
            # and the check above would otherwise still hold for the
            # compiler (mypyc keeps a narrowed attribute's type).
            if self._paging() or self.done:
                return out
        ring = self.wf.ring
        if ring.next_index == self.index:
            self._idle = not out
            return out
        behind = ring.next_index - self.index
        if self.index < ring.first_index or (not self._idle and behind > self.coalesce_after):
            self._idle = False
            out.extend(self._skip_ahead())
            self.counters["gaps" if self.filter.is_log_stream else "resyncs"] += 1
            return out
        flt = self.filter
        for e in ring.entries_from(self.index):
            self.index += 1
            if e.after_terminal:
                continue
            self.seq = e.seq
            self.log_counts = e.log_counts
            if flt.matches(e):
                out.append(e)
            if e.terminal:
                out.append(end_message(e.workflow_id, e.epoch, e.seq, e.state))
                self.done = True
                break
        out, dropped = coalesce(out, flt.coalesce)
        self.coalesced += dropped
        self.counters["coalesced"] += dropped
        self._idle = not out
        return out

    def _skip_ahead(self) -> list[Item]:
        wf = self.wf
        if not self.filter.is_log_stream:
            return self._snapshot("resync")
        # Log streams: the running per-level counts say exactly how many
        # lines at or above the stream's level were skipped, also those
        # already off the ring. (A `tasks=` filter is not applied to the
        # count: it counts the lines of every task.)
        ring = wf.ring
        min_level = self.filter.min_level
        dropped = sum(
            now - before
            for slot, (now, before) in enumerate(zip(wf.log_counts, self.log_counts, strict=True))
            if (slot + 1) * 10 >= min_level
        )
        self.log_counts = wf.log_counts
        # The gap ends at the terminal event if there is one: nothing after it
        # is streamed.
        to = wf.terminal_seq if wf.terminal_seq is not None else wf.snapshot.seq
        out: list[Item] = [gap_message(wf.id, wf.epoch, self.seq + 1, to, dropped)]
        self.index = ring.next_index
        self.seq = to
        if wf.terminal:
            out.append(workflow_end(wf))
            self.done = True
        return out


class MultiReader:
    """A stream over several workflows, read from the node journal."""

    wants_history = False  # journal cursors never resume from the store

    __slots__ = (
        "counters",
        "state",
        "filter",
        "scope",
        "coalesce_after",
        "_opening",
        "index",
        "_idle",
        "done",
        "ended",
        "coalesced",
        "_opened_at",
        "_log_seen",
    )

    def __init__(
        self,
        state: BrokerState,
        flt: Filter,
        start: Start,
        *,
        scope: Scope | None = None,
        workflows: frozenset[str] | None = None,
        tenant: str | None = None,
        parent: str | None = None,
        coalesce_after: int = 256,
        counters: Counter[str] | None = None,
    ) -> None:
        self.counters: Counter[str] = Counter() if counters is None else counters
        if scope is None:
            given = {k: v for k, v in ((WORKFLOWS, workflows), (TENANT, tenant), (PARENT, parent)) if v is not None}
            scope = Scope.pick(given, MULTI_KINDS)
        elif not scope.multi:
            raise InvalidArgument("a multi-workflow reader needs a workflows, tenant or parent scope")
        self.state = state
        self.filter = flt
        self.scope = scope
        self.coalesce_after = coalesce_after
        self._opening = start.mode if start.mode in (SNAPSHOT, RESYNC) else None
        # A fresh stream starts at the head (its snapshots stand for the past).
        self.index = state.journal.next_index if self._opening else start.index
        self._idle = True
        self.done = False
        # Workflows whose `end` this reader sent; kept only for the scopes that
        # can end (`workflows=`, `parent=`), where it is bounded by the scope.
        self.ended: set[str] = set()
        self.coalesced = 0
        # Log streams: per workflow, its log counts as far as read (see _log_gaps).
        self._opened_at = state.journal.next_index if self._opening else start.index
        self._log_seen: dict[str, tuple[tuple[int, ...], int]] = {}
        self._check_done()  # everything in scope may have ended already

    def set_filter(self, flt: Filter) -> None:
        self.filter = flt

    @property
    def resume_cursor(self) -> str:
        """The journal cursor to resume after everything pulled so far."""
        return f"{self.state.node_epoch}.{self.index}"

    @property
    def behind(self) -> int:
        """Journal entries (of every workflow: the scope is applied as they
        are read) it has not read yet; 0 once done."""
        if self.done:
            return 0
        return max(0, self.state.journal.next_index - self.index)

    def _workflow(self, wid: str) -> Workflow | None:
        """The workflow `wid` if it exists for this reader's viewer."""
        wf = self.state.get(wid)
        return wf if wf is not None and self.scope.sees(wf.tenant, wf.id) else None

    def _descendants(self) -> list[Workflow]:
        sees = self.scope.sees
        return [wf for wf in self.state.descendants(self.scope.name) if wf.visible and sees(wf.tenant, wf.id)]

    def _scope_workflows(self) -> list[Workflow]:
        st = self.state
        scope = self.scope
        if scope.kind == WORKFLOWS:
            found = (self._workflow(w) for w in sorted(scope.ids))
            return [wf for wf in found if wf is not None]
        if scope.kind == TENANT:
            sees, tenant = scope.sees, scope.name
            return [wf for wf in st.workflows.values() if wf.visible and wf.tenant == tenant and sees(tenant, wf.id)]
        root = self._workflow(scope.name)
        return ([root] if root is not None else []) + self._descendants()

    def _snapshots(self, kind: str) -> list[Item]:
        """One snapshot (or resync) per active workflow in scope. On a resync,
        a workflow that ended in the skipped stretch gets its final state and
        `end`, so the subscriber learns how it ended."""
        journal = self.state.journal
        skipped_from = self.index
        cursor = f"{self.state.node_epoch}.{journal.next_index}"
        out: list[Item] = []
        for wf in self._scope_workflows():
            if wf.terminal:
                if kind == RESYNC and wf.terminal_offset > skipped_from and wf.id not in self.ended:
                    out.append(state_message(wf, kind, self.filter.tasks, cursor))
                    out.append(workflow_end(wf, cursor))
                    self._mark_ended(wf.id)
                continue
            out.append(state_message(wf, kind, self.filter.tasks, cursor))
            if self.filter.is_log_stream:
                self._log_seen[wf.id] = (wf.log_counts, wf.snapshot.seq)
        self.index = journal.next_index
        self._check_done()
        return out

    def _log_gaps(self) -> list[Item]:
        """A log stream that falls behind: per workflow in scope, a `gap`
        counting the matching lines it skipped. Exact from the workflows'
        running per-level log counts against what this reader had seen of
        each, also for lines already off the journal; for a workflow this
        reader has no count of yet (a resumed stream), the skipped lines
        still in the journal are counted."""
        journal = self.state.journal
        skipped_from = self.index
        cursor = f"{self.state.node_epoch}.{journal.next_index}"
        min_level = self.filter.min_level
        in_scope = self.scope.contains
        in_journal: dict[str, int] = {}
        first_skipped: dict[str, int] = {}
        for e in journal.entries_from(self.index):
            if e.after_terminal or not in_scope(e):
                continue
            first_skipped.setdefault(e.workflow_id, e.seq_from)
            if e.kind == "log" and self.filter.matches(e):
                in_journal[e.workflow_id] = in_journal.get(e.workflow_id, 0) + 1
        out: list[Item] = []
        for wf in self._scope_workflows():
            if wf.id in self.ended or (wf.terminal and wf.terminal_offset <= skipped_from):
                continue  # ended before the stretch skipped: its lines and its `end` went out
            base = self._log_base(wf)
            if base is None:
                dropped = in_journal.get(wf.id, 0)
                seq_from = first_skipped.get(wf.id, 0)
            else:
                dropped = sum(
                    now - before
                    for slot, (now, before) in enumerate(zip(wf.log_counts, base[0], strict=True))
                    if (slot + 1) * 10 >= min_level
                )
                seq_from = base[1] + 1
            to = wf.terminal_seq if wf.terminal_seq is not None else wf.snapshot.seq
            self._log_seen[wf.id] = (wf.log_counts, to)
            if dropped:
                out.append(gap_message(wf.id, wf.epoch, seq_from, to, dropped, cursor))
            if wf.terminal:  # it ended in the stretch skipped: its `end`, as a resync gives it
                out.append(workflow_end(wf, cursor))
                self._mark_ended(wf.id)
        self.index = journal.next_index
        self._check_done()
        return out

    def _log_base(self, wf: Workflow) -> tuple[tuple[int, ...], int] | None:
        """The log counts and seq of `wf` as far as this reader has read it."""
        seen = self._log_seen.get(wf.id)
        if seen is not None:
            return seen
        if wf.first_offset > self._opened_at:
            return NO_LOGS, 0  # it started after this reader opened
        return None

    def _mark_ended(self, wid: str) -> None:
        self._log_seen.pop(wid, None)
        if self.scope.kind != TENANT:
            self.ended.add(wid)

    def _has_ended(self, wid: str) -> bool:
        """Ended for this reader: its `end` was sent, or lies behind the cursor."""
        if wid in self.ended:
            return True
        wf = self._workflow(wid)
        return wf is not None and 0 < wf.terminal_offset <= self.index

    def _check_done(self) -> None:
        # `workflows=a,b` ends when all of them ended; `parent=` when the root
        # and every known descendant ended; `tenant=` never.
        scope = self.scope
        if scope.kind == WORKFLOWS:
            self.done = all(self._has_ended(w) for w in scope.ids)
        elif scope.kind == PARENT and self._has_ended(scope.name):
            self.done = all(self._has_ended(wf.id) for wf in self._descendants())

    def written(self) -> None:
        """As `WorkflowReader.written`: caught up if the journal has nothing new."""
        if self.state.journal.next_index == self.index:
            self._idle = True

    def pull(self) -> list[Item]:
        if self.done:
            return []
        out: list[Item] = []
        if self._opening is not None:
            out = self._snapshots(self._opening)
            self._opening = None
        journal = self.state.journal
        if journal.next_index == self.index or self.done:
            self._idle = True
            return out
        # Lag counts only while a write was in flight (see WorkflowReader);
        # the journal interleaves every workflow, hence the wider margin.
        behind = journal.next_index - self.index
        if self.index < journal.first_index or (not self._idle and behind > self.coalesce_after * 4):
            if self.filter.is_log_stream:
                out.extend(self._log_gaps())
                self.counters["gaps"] += 1
            else:
                out.extend(self._snapshots(RESYNC))
                self.counters["resyncs"] += 1
            self._idle = False
            return out
        flt = self.filter
        epoch = self.state.node_epoch
        track_logs = flt.is_log_stream
        in_scope = self.scope.contains
        for e in journal.entries_from(self.index):
            self.index += 1
            if e.after_terminal or not in_scope(e):
                continue
            if track_logs:
                self._log_seen[e.workflow_id] = (e.log_counts, e.seq)
            if flt.matches(e):
                out.append(e)
            if e.terminal:
                self._mark_ended(e.workflow_id)
                out.append(end_message(e.workflow_id, e.epoch, e.seq, e.state, f"{epoch}.{e.offset}"))
                self._check_done()
                if self.done:
                    break
        out, dropped = coalesce(out, flt.coalesce)
        self.coalesced += dropped
        self.counters["coalesced"] += dropped
        self._idle = not out
        return out
