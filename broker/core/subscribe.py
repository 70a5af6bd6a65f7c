"""One model of a subscription, for every transport (DESIGN.md §5).

A `Subscription` is what a client asked to read: its scope (one workflow,
a list, a tenant, a tree), its stream view and filter, and where to start
(its cursor). SSE builds one from a request's path and query
(`from_query`), WebSocket from a `subscribe` message (`from_ws`); both go
through the same checks and raise the same `InvalidArgument`s, so the two
transports cannot drift apart. `open_subscription()` then turns the model
into a reader, with the 400 / resync / 204 rules of §5 (core/reader.py).
The transports only translate their wire format into these calls, and
the errors into theirs.

Who may read what is decided here too, once: `open_subscription()` takes
the reader's `Principal` and narrows the subscription to what it may see
(`authorize`: scope `subscribe`; `tenant=` only its own; the scope's
`viewer` drops every workflow outside its tenant and `workflows` claim).
A workflow it may not see is answered exactly as an unknown one (the wait,
then 404), so existence is not leaked (DESIGN §7).

Cursor rules, the same on both transports:

- `resume` (SSE `Last-Event-ID` header or `last_event_id=`; WS `cursor`):
  a cursor the stream handed out. Malformed, of another epoch, ahead of
  the head or out of reach: `resync`, never an error (EventSource can't
  show one).
- `since` (SSE `since=`, WS `since`): a position the client chose. For one
  workflow a non-negative integer seq — a WS JSON number, or an SSE
  argument of decimal digits only — else 400, checked before the workflow
  is even known; for several workflows a journal cursor string
  `<node-epoch>.<offset>`, checked against the journal's reach. Out of
  reach: 400.
- `resume` wins over `since` (an EventSource reconnects to the same URL,
  `since=` and all, and adds the header); `since` is then not looked at.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .cursor import since_seq
from .entry import Message
from .errors import InvalidArgument, NotFound, PermissionDenied
from .filters import Filter
from .limits import Principal
from .messages import SNAPSHOT, workflow_end
from .reader import NO_CONTENT, MultiReader, Start, WorkflowReader, plan_multi_start, plan_workflow_start
from .scope import KINDS, MULTI_KINDS, TENANT, WORKFLOW, WORKFLOWS, Scope
from .state import BrokerState, Workflow

JOURNAL = "\x00journal"  # wait key of multi-workflow streams (no workflow id holds NUL)
NEW_WORKFLOW = "\x00new"  # wait key of streams waiting for an unknown workflow
AUDIT = "\x00audit"  # wait key of the admins' audit streams

MAX_SUB_ID = 128  # characters of a WebSocket subscription id
MULTI_SINCE_MESSAGE = "'since' of a multi-workflow stream must be a journal cursor <node-epoch>.<offset>"
WS_SUBSCRIBE_KEYS = frozenset({"op", "sub", *KINDS, "since", "cursor", "filter"})


@dataclass(frozen=True, slots=True)
class Cursor:
    resume: str | None = None  # Last-Event-ID / last_event_id / WS cursor
    since: int | str | None = None  # seq (one workflow) or journal cursor text


@dataclass(frozen=True, slots=True)
class Subscription:
    scope: Scope
    filter: Filter
    cursor: Cursor = Cursor()

    @property
    def view(self) -> str:
        return self.filter.view

    @property
    def key(self) -> str:
        """The hub wait key whose wakeups concern this subscription."""
        return JOURNAL if self.scope.multi else self.scope.name


def _cursor(scope: Scope, resume: str | None, since: object, *, from_query: bool) -> Cursor:
    if resume is not None or since is None:
        return Cursor(resume=resume)
    if not scope.multi:
        return Cursor(since=since_seq(since, from_query=from_query))
    if not isinstance(since, str):
        raise InvalidArgument(MULTI_SINCE_MESSAGE)
    return Cursor(since=since)  # checked against the journal's reach when opened


def from_query(
    args: Mapping[str, str], *, workflow: str | None, view: str = "all", last_event_id: str | None = None
) -> Subscription:
    """The subscription of an SSE request: `workflow` from the path of
    /v1/workflows/{id}/… (None for /v1/stream, whose scope is in the
    query), `view` from the path ("all", "tasks", "logs"), `last_event_id`
    the request's Last-Event-ID header. Query arguments the model does not
    know are left alone (e.g. a token)."""
    flt = Filter.parse(args, view=view)
    if workflow is not None:
        scope = Scope(WORKFLOW, workflow)
    else:
        given: dict[str, object] = {k: args[k] for k in MULTI_KINDS if k in args}
        if WORKFLOWS in given:
            given[WORKFLOWS] = frozenset(w.strip() for w in str(given[WORKFLOWS]).split(",") if w.strip())
        scope = Scope.pick(given, MULTI_KINDS)
    resume = last_event_id if last_event_id is not None else args.get("last_event_id")
    return Subscription(scope, flt, _cursor(scope, resume, args.get("since"), from_query=True))


def from_ws(msg: Mapping[str, Any]) -> tuple[str, Subscription]:
    """The id and subscription of a WebSocket `subscribe` message."""
    unknown = set(msg) - WS_SUBSCRIBE_KEYS
    if unknown:
        raise InvalidArgument(f"unknown key '{sorted(unknown)[0]}' in subscribe")
    sub_id = sub_id_of(msg)
    flt = ws_filter(msg.get("filter", {}))
    given: dict[str, object] = {k: msg[k] for k in KINDS if k in msg}
    raw = given.get(WORKFLOWS)
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(w, str) for w in raw):
            raise InvalidArgument("'workflows' must be a non-empty list of workflow ids")
        given[WORKFLOWS] = frozenset(raw)
    scope = Scope.pick(given)
    resume = msg.get("cursor")
    if resume is not None and not isinstance(resume, str):
        raise InvalidArgument("'cursor' must be a string")
    return sub_id, Subscription(scope, flt, _cursor(scope, resume, msg.get("since"), from_query=False))


def sub_id_of(msg: Mapping[str, Any]) -> str:
    """A WebSocket `subscribe` message's subscription id."""
    sub_id = msg.get("sub")
    if not isinstance(sub_id, str) or not 1 <= len(sub_id) <= MAX_SUB_ID:
        raise InvalidArgument(f"'sub' must be a string of 1-{MAX_SUB_ID} characters")
    return sub_id


def ws_filter(raw: object) -> Filter:
    """A WebSocket `filter` object (subscribe, or the `filter` op)."""
    if not isinstance(raw, dict):
        raise InvalidArgument("'filter' must be an object")
    return Filter.parse(raw, from_query=False)


def workflow_not_found(sub: Subscription) -> NotFound:
    """The error for a workflow that did not appear within
    `stream.unknown_workflow_wait`."""
    return NotFound(f"workflow '{sub.scope.name}' not found")


def require(principal: Principal, scope: str) -> None:
    """PermissionDenied (403 / 4003) unless `principal` holds `scope`."""
    if not principal.has(scope):
        raise PermissionDenied(f"the token does not grant the '{scope}' scope")


def authorize(principal: Principal, sub: Subscription) -> Subscription:
    """`sub` as `principal` may read it: needs scope `subscribe`; `tenant=`
    must name its own tenant; every other scope is narrowed to the
    workflows its grant may see."""
    require(principal, "subscribe")
    grant = principal.grant
    if grant is None:
        return sub
    scope = sub.scope
    if scope.kind == TENANT and scope.name != grant.tenant:
        raise PermissionDenied("'tenant' must name the token's own tenant")
    return replace(sub, scope=replace(scope, viewer=grant))


@dataclass(frozen=True, slots=True)
class Opened:
    """A subscription placed on the state: its reader, or (reader None) the
    answer for a client that has everything already — SSE answers 204, a
    WebSocket gets `end` when there is one."""

    reader: WorkflowReader | MultiReader | None
    key: str  # the hub wait key to listen on
    end: Message | None = None


def open_subscription(
    state: BrokerState,
    sub: Subscription,
    principal: Principal,
    *,
    coalesce_after: int = 256,
    counters: Counter[str] | None = None,
    stored: bool = False,
    waited: bool = False,
) -> Opened | None:
    """The reader for `sub` as `principal` may read it (`authorize`), or
    None while its one workflow is unknown — or not visible to it (the
    caller waits for NEW_WORKFLOW, then raises `workflow_not_found`).
    Raises InvalidArgument for a `since` out of reach, PermissionDenied.
    `stored`: a store holds what the rings no longer do (reader HISTORY).
    `waited`: the workflow was unknown when the stream asked for it, so
    the stream was there before it began: without a cursor it gets every
    event from the first (as `since=0`), not a snapshot of what it missed
    only by being early — unless the ring no longer holds the first one
    and there is no store, when it gets the snapshot as any stream does."""
    sub = authorize(principal, sub)
    scope, cursor = sub.scope, sub.cursor
    if not scope.multi:
        wf = state.get(scope.name)
        if wf is None or not scope.sees(wf.tenant, wf.id):
            return None
        if waited and cursor.resume is None and cursor.since is None:
            start = _from_first(wf, stored)
        else:
            start = plan_workflow_start(wf, last_event_id=cursor.resume, since=cursor.since, stored=stored)
        if start.mode == NO_CONTENT:
            return Opened(None, sub.key, workflow_end(wf))
        reader: WorkflowReader | MultiReader = WorkflowReader(
            wf, sub.filter, start, coalesce_after=coalesce_after, counters=counters
        )
        return Opened(reader, sub.key)
    since = None if cursor.since is None else str(cursor.since)
    start = plan_multi_start(state, last_event_id=cursor.resume, since=since)
    multi = MultiReader(state, sub.filter, start, scope=scope, coalesce_after=coalesce_after, counters=counters)
    return Opened(None if multi.done else multi, sub.key)


def _from_first(wf: Workflow, stored: bool) -> Start:
    """Where a stream that waited for `wf` starts: its first event."""
    try:
        return plan_workflow_start(wf, since=0, stored=stored)
    except InvalidArgument:  # the ring dropped the first ones, no store
        return Start(SNAPSHOT)
