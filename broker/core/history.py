"""History pages and workflow listings (DESIGN.md §10; docs/protocol.md).

- `GET /v1/workflows/{id}/history?since=&limit=&types=…`: a workflow's
  events after `since` (a seq, or a cursor `epoch:seq`), at most `limit`
  (≤ 1000) a page, with the stream filters. `next` is the cursor to ask for
  the next page, null at the end for now. With a filter a page may hold
  fewer than `limit` events (even none): follow `next` until it is null.
  Entries after the terminal event are never shown (as in streams).
- `GET /v1/workflows?tenant=&state=&parent=&limit=&after=`: summaries,
  most recently updated first; `next` is the `after` of the next page.

Both are answered from memory (the ring, the live workflows) or, with a
store, from it where memory has no longer what was asked. This module
parses the queries, pages memory, and shapes the answers; the adapter
(server/hub.py) reads the store. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .cursor import parse_workflow_cursor
from .entry import Entry
from .envelope import TERMINAL_STATES, has_control, is_state_word
from .errors import InvalidArgument, PermissionDenied
from .filters import Filter
from .limits import Principal
from .state import SYSTEM_TENANT, BrokerState, Workflow

MAX_PAGE = 1000
DEFAULT_PAGE = 100


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE or len(raw) > 4:
        raise InvalidArgument(f"'limit' must be an integer 1-{MAX_PAGE}")
    return int(raw)


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    after: int  # the seq after which the page starts
    epoch: str | None  # the cursor's epoch, if a cursor was given
    limit: int
    filter: Filter


def parse_history_query(args: Mapping[str, str]) -> HistoryQuery:
    known = {"since", "limit", "types", "tasks", "states", "level", "access_token"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidArgument(f"unknown argument '{unknown[0][:64]}'")
    since = args.get("since", "0")
    epoch: str | None = None
    if ":" in since:
        parsed = parse_workflow_cursor(since)
        if parsed is None:
            raise InvalidArgument("'since' must be a seq or a cursor epoch:seq")
        epoch, after = parsed
    elif since.isascii() and since.isdigit() and len(since) <= 19:
        after = int(since)
    else:
        raise InvalidArgument("'since' must be a seq or a cursor epoch:seq")
    flt = Filter.parse({k: v for k, v in args.items() if k in ("types", "tasks", "states", "level")})
    return HistoryQuery(after, epoch, _limit(args.get("limit")), flt)


def check_epoch(query: HistoryQuery, epoch: str) -> None:
    if query.epoch is not None and query.epoch != epoch:
        raise InvalidArgument(
            f"'since' is a cursor of epoch {query.epoch!r}; the workflow's sequence is now epoch {epoch!r}"
        )


def from_ring(wf: Workflow, after: int, limit: int) -> list[Entry] | None:
    """Up to `limit` entries after seq `after` from the ring, or None if
    the ring no longer holds what follows `after`."""
    if after < wf.oldest_cursor_seq():
        return None
    ring = wf.ring
    return ring.entries_from(ring.index_after_seq(after))[:limit]


def history_body(epoch: str, scanned: Sequence[Entry], limit: int, flt: Filter) -> bytes:
    """The JSON answer for a page of `scanned` entries (as read, at most
    `limit`): those the filter keeps, and the cursor of the last one read
    if there may be more."""
    kept: list[bytes] = []
    last = None
    ended = False
    for e in scanned:
        if e.after_terminal:
            ended = True
            break
        last = e
        if flt.matches(e):
            kept.append(e.body)
        if e.terminal:
            ended = True
            break
    more = not ended and len(scanned) >= limit and last is not None
    nxt = b'"%s:%d"' % (epoch.encode(), last.seq) if more and last is not None else b"null"
    return b'{"events":[' + b",".join(kept) + b'],"next":' + nxt + b"}"


# ------------------------------------------------------------------ lists


@dataclass(frozen=True, slots=True)
class ListQuery:
    tenant: str | None
    states: frozenset[str] | None  # None: every state (unless `active`)
    parent: str | None
    after: tuple[int, str] | None  # (updated, workflow id) of the last one seen
    limit: int
    active: bool = False  # also every state that is not terminal (any word an engine sends)


def parse_list_query(args: Mapping[str, str], principal: Principal) -> ListQuery:
    known = {"tenant", "state", "parent", "limit", "after", "access_token"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidArgument(f"unknown argument '{unknown[0][:64]}'")
    for key in ("tenant", "parent", "after"):
        if has_control(args.get(key, "")):  # no name holds one (nor can the store's text hold a NUL)
            raise InvalidArgument(f"'{key}' must not contain control characters")
    tenant = args.get("tenant") or None
    grant = principal.grant
    if grant is not None:
        if tenant is not None and tenant != grant.tenant:
            raise PermissionDenied("'tenant' must name the token's own tenant")
        tenant = grant.tenant
    states: frozenset[str] | None = None
    active = False
    if "state" in args:
        # A workflow's state is any lower-case word its engine sent
        # (`workflow.suspended`, `workflow.waiting_for_input`): `active`
        # is every one that is not terminal, not a fixed list.
        words = {w.strip() for w in args["state"].split(",") if w.strip()}
        if "terminal" in words:
            words = (words - {"terminal"}) | TERMINAL_STATES
        if "active" in words:
            words.discard("active")
            active = True
        bad = sorted(w for w in words if not is_state_word(w))
        if bad or not (words or active):
            shown = f" ('{bad[0][:64]}' is not)" if bad else ""
            raise InvalidArgument(f"'state' must list lower-case state words, 'active' or 'terminal'{shown}")
        states = frozenset(words)
    after = None
    if "after" in args:
        ts, sep, wid = args["after"].partition(":")
        if not sep or not ts.isascii() or not ts.isdigit() or len(ts) > 19 or not wid:
            raise InvalidArgument("'after' must be the 'next' of the page before")
        after = (int(ts), wid)
    return ListQuery(tenant, states, args.get("parent") or None, after, _limit(args.get("limit")), active)


def summary(wf: Workflow) -> dict[str, Any]:
    snap = wf.snapshot
    return {
        "workflow_id": wf.id,
        "tenant": wf.tenant,
        "parent_id": wf.parent_id,
        "state": snap.state,
        "epoch": wf.epoch,
        "seq": snap.seq,
        "created": snap.created,
        "updated": snap.updated,
    }


def summary_of_row(row: Sequence[Any]) -> dict[str, Any]:
    """A summary from the store's columns (store/pg.py SUMMARY_COLUMNS)."""
    wid, tenant, parent, state, epoch, seq, created, updated = row
    return {
        "workflow_id": wid,
        "tenant": tenant,
        "parent_id": parent,
        "state": state,
        "epoch": epoch,
        "seq": seq,
        "created": created,
        "updated": updated,
    }


def _matches(q: ListQuery, s: Mapping[str, Any]) -> bool:
    return (
        (s["tenant"] == q.tenant if q.tenant is not None else s["tenant"] != SYSTEM_TENANT)
        and (q.states is None or s["state"] in q.states or (q.active and s["state"] not in TERMINAL_STATES))
        and (q.parent is None or s["parent_id"] == q.parent)
    )


def _key(s: Mapping[str, Any]) -> tuple[int, str]:
    return (s["updated"] or 0, s["workflow_id"])


def list_memory(state: BrokerState, q: ListQuery, principal: Principal) -> list[dict[str, Any]]:
    """The page from the live workflows (one more than `limit`, to tell
    whether there is a next page)."""
    found = [
        s
        for wf in state.workflows.values()
        if wf.visible and principal.may_see(wf.tenant, wf.id) and _matches(q, s := summary(wf))
    ]
    if q.after is not None:
        after = q.after
        found = [s for s in found if _key(s) < after]
    found.sort(key=_key, reverse=True)
    return found[: q.limit + 1]


def merge_stored(
    state: BrokerState, q: ListQuery, principal: Principal, rows: Iterable[Sequence[Any]]
) -> list[dict[str, Any]]:
    """The store's page, each workflow as memory knows it when it is live
    there (fresher than its row), plus live ones not written yet."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        s = summary_of_row(row)
        wf = state.workflows.get(s["workflow_id"])
        if wf is not None and wf.visible and wf.epoch == s["epoch"]:
            s = summary(wf)
        if principal.may_see(s["tenant"], s["workflow_id"]) and _matches(q, s):
            out[s["workflow_id"]] = s
    for s in list_memory(state, q, principal):
        out.setdefault(s["workflow_id"], s)
    page = sorted(out.values(), key=_key, reverse=True)
    if q.after is not None:
        after = q.after
        page = [s for s in page if _key(s) < after]
    return page[: q.limit + 1]


def list_body(page: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    more = len(page) > limit
    page = page[:limit]
    nxt = f"{page[-1]['updated'] or 0}:{page[-1]['workflow_id']}" if more and page else None
    return {"workflows": page, "next": nxt}
