"""The one subscription model (broker/core/subscribe.py): SSE query strings
and WebSocket `subscribe` messages that mean the same must give the same
model, and the same mistakes the same error, on both transports."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest

from broker.core.errors import InvalidArgument, NotFound
from broker.core.filters import Filter
from broker.core.limits import ANONYMOUS
from broker.core.reader import MultiReader, WorkflowReader
from broker.core.scope import PARENT, TENANT, WORKFLOW, WORKFLOWS, Scope
from broker.core.subscribe import (
    JOURNAL,
    Cursor,
    Subscription,
    from_query,
    from_ws,
    open_subscription,
    workflow_not_found,
)

from .helpers import mk, send, task, wfe


def sse(path_workflow: str | None, query: str, view: str = "all", last_event_id: str | None = None) -> Subscription:
    args = dict(parse_qsl(query, keep_blank_values=True))
    return from_query(args, workflow=path_workflow, view=view, last_event_id=last_event_id)


def ws(**fields: Any) -> Subscription:
    sub_id, model = from_ws({"op": "subscribe", "sub": "s", **fields})
    assert sub_id == "s"
    return model


# ------------------------------------------------ the same model both ways

SAME: list[tuple[str, tuple[str | None, str], dict[str, Any], Subscription]] = [
    (
        "workflow, no cursor",
        ("wf-1", ""),
        {"workflow": "wf-1"},
        Subscription(Scope(WORKFLOW, "wf-1"), Filter()),
    ),
    (
        "since",
        ("wf-1", "since=41"),
        {"workflow": "wf-1", "since": 41},
        Subscription(Scope(WORKFLOW, "wf-1"), Filter(), Cursor(since=41)),
    ),
    (
        "since 0",
        ("wf-1", "since=0"),
        {"workflow": "wf-1", "since": 0},
        Subscription(Scope(WORKFLOW, "wf-1"), Filter(), Cursor(since=0)),
    ),
    (
        "resume cursor (last_event_id / cursor)",
        ("wf-1", "last_event_id=abc:4"),
        {"workflow": "wf-1", "cursor": "abc:4"},
        Subscription(Scope(WORKFLOW, "wf-1"), Filter(), Cursor(resume="abc:4")),
    ),
    (
        "resume wins over since",
        ("wf-1", "last_event_id=abc:4&since=2"),
        {"workflow": "wf-1", "cursor": "abc:4", "since": 2},
        Subscription(Scope(WORKFLOW, "wf-1"), Filter(), Cursor(resume="abc:4")),
    ),
    (
        "filters",
        ("wf-1", "types=state,log&tasks=t1,t2&states=terminal&level=warning&coalesce=true"),
        {
            "workflow": "wf-1",
            "filter": {
                "types": ["state", "log"],
                "tasks": ["t1", "t2"],
                "states": ["terminal"],
                "level": "warning",
                "coalesce": True,
            },
        },
        Subscription(
            Scope(WORKFLOW, "wf-1"),
            Filter(
                types=frozenset({"state", "log"}),
                tasks=frozenset({"t1", "t2"}),
                states=frozenset({"completed", "failed", "cancelled"}),
                min_level=30,
                coalesce=True,
            ),
        ),
    ),
    (
        "workflows",
        (None, "workflows=a,b"),
        {"workflows": ["a", "b"]},
        Subscription(Scope(WORKFLOWS, frozenset({"a", "b"})), Filter()),
    ),
    (
        "tenant with a journal cursor",
        (None, "tenant=acme&since=k3f9ab.12"),
        {"tenant": "acme", "since": "k3f9ab.12"},
        Subscription(Scope(TENANT, "acme"), Filter(), Cursor(since="k3f9ab.12")),
    ),
    (
        "parent resumed",
        (None, "parent=root&last_event_id=k3f9ab.7"),
        {"parent": "root", "cursor": "k3f9ab.7"},
        Subscription(Scope(PARENT, "root"), Filter(), Cursor(resume="k3f9ab.7")),
    ),
]


@pytest.mark.parametrize(("name", "query", "message", "expected"), SAME, ids=[s[0] for s in SAME])
def test_sse_and_ws_give_the_same_model(
    name: str, query: tuple[str | None, str], message: dict[str, Any], expected: Subscription
) -> None:
    assert sse(*query) == expected
    assert ws(**message) == expected


def test_last_event_id_header_wins_over_the_query() -> None:
    got = sse("wf-1", "last_event_id=abc:1&since=3", last_event_id="abc:4")
    assert got.cursor == Cursor(resume="abc:4")


def test_views_come_from_the_path() -> None:
    assert sse("wf-1", "", view="logs").view == "logs"
    assert sse("wf-1", "", view="logs").filter.is_log_stream
    assert sse("wf-1", "", view="tasks").view == "tasks"


def test_wait_keys() -> None:
    assert sse("wf-1", "").key == "wf-1"
    assert sse(None, "tenant=t").key == JOURNAL


# ---------------------------------------------- the same error both ways

SAME_ERROR: list[tuple[str, tuple[str | None, str] | None, dict[str, Any] | None]] = [
    ("since not a number", ("wf-1", "since=abc"), {"workflow": "wf-1", "since": "abc"}),
    ("since negative", ("wf-1", "since=-1"), {"workflow": "wf-1", "since": -1}),
    ("since fractional", ("wf-1", "since=1.5"), {"workflow": "wf-1", "since": 1.5}),
    ("since empty", ("wf-1", "since="), {"workflow": "wf-1", "since": ""}),
    # Today's disagreement, settled: `since` is an integer. A query gives
    # its digits and nothing else; a JSON string is the wrong type.
    ("since with spaces", ("wf-1", "since=%203"), {"workflow": "wf-1", "since": " 3"}),
    ("since as a string on WS", None, {"workflow": "wf-1", "since": "3"}),
    ("since bool", None, {"workflow": "wf-1", "since": True}),
    ("since too large", ("wf-1", "since=" + "9" * 20), {"workflow": "wf-1", "since": 10**20}),
    ("no scope", (None, ""), {}),
    ("two scopes", (None, "tenant=a&parent=b"), {"tenant": "a", "parent": "b"}),
    ("empty tenant", (None, "tenant="), {"tenant": ""}),
    ("empty parent", (None, "parent="), {"parent": ""}),
    ("empty workflows", (None, "workflows=,"), {"workflows": []}),
    ("unknown type", ("wf-1", "types=bogus"), {"workflow": "wf-1", "filter": {"types": ["bogus"]}}),
    ("bad level", ("wf-1", "level=loud"), {"workflow": "wf-1", "filter": {"level": "loud"}}),
    ("bad coalesce", ("wf-1", "coalesce=yes"), {"workflow": "wf-1", "filter": {"coalesce": "yes"}}),
    ("empty tasks", ("wf-1", "tasks="), {"workflow": "wf-1", "filter": {"tasks": []}}),
    ("multi since not a journal cursor (WS number)", None, {"tenant": "t", "since": 5}),
]


@pytest.mark.parametrize(("name", "query", "message"), SAME_ERROR, ids=[s[0] for s in SAME_ERROR])
def test_the_same_mistake_is_the_same_error(
    name: str, query: tuple[str | None, str] | None, message: dict[str, Any] | None
) -> None:
    errors = []
    if query is not None:
        with pytest.raises(InvalidArgument) as exc:
            sse(*query)
        errors.append(exc.value.message)
    if message is not None:
        with pytest.raises(InvalidArgument) as exc:
            ws(**message)
        errors.append(exc.value.message)
    assert len(set(errors)) == 1 or name in ("no scope", "two scopes"), errors


def test_scope_choices_differ_only_in_what_each_path_allows() -> None:
    # /v1/stream has no `workflow=` (that is /v1/workflows/{id}/stream);
    # a WebSocket may pick any of the four.
    with pytest.raises(InvalidArgument, match="workflows, tenant, parent"):
        sse(None, "")
    with pytest.raises(InvalidArgument, match="workflow, workflows, tenant, parent"):
        ws()


@pytest.mark.parametrize(
    "message",
    [
        {"op": "subscribe", "sub": "", "workflow": "w"},
        {"op": "subscribe", "sub": "x" * 129, "workflow": "w"},
        {"op": "subscribe", "sub": 5, "workflow": "w"},
        {"op": "subscribe", "sub": "s", "workflow": "w", "colour": 1},
        {"op": "subscribe", "sub": "s", "workflow": 3},
        {"op": "subscribe", "sub": "s", "workflows": "a"},
        {"op": "subscribe", "sub": "s", "workflows": ["a", 1]},
        {"op": "subscribe", "sub": "s", "workflow": "w", "cursor": 5},
        {"op": "subscribe", "sub": "s", "workflow": "w", "filter": ["log"]},
        {"op": "subscribe", "sub": "s", "workflow": "w", "filter": {"colour": ["red"]}},
    ],
)
def test_ws_only_mistakes(message: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        from_ws(message)


def test_query_arguments_the_model_does_not_know_are_left_alone() -> None:
    assert sse("wf-1", "access_token=xyz&since=2") == Subscription(Scope(WORKFLOW, "wf-1"), Filter(), Cursor(since=2))


# ------------------------------------------------------ opening a reader


def test_open_a_workflow_subscription() -> None:
    st = mk()
    assert open_subscription(st, sse("w", ""), ANONYMOUS) is None  # not known yet: the caller waits
    send(st, wfe())
    opened = open_subscription(st, sse("w", ""), ANONYMOUS)
    assert opened is not None and isinstance(opened.reader, WorkflowReader) and opened.key == "w"
    assert [m.kind for m in opened.reader.pull()] == ["snapshot"]


def test_a_subscription_that_waited_gets_every_event_from_the_first() -> None:
    st = mk()
    assert open_subscription(st, sse("w", ""), ANONYMOUS, waited=True) is None
    send(st, wfe(), task("t", "running"), wfe(etype="workflow.completed"))
    opened = open_subscription(st, sse("w", ""), ANONYMOUS, waited=True)
    assert opened is not None and isinstance(opened.reader, WorkflowReader)
    got = opened.reader.pull()
    assert [(m.kind, orjson.loads(m.body)["seq"]) for m in got] == [
        ("state", 1),
        ("state", 2),
        ("state", 3),
        ("end", 3),
    ]
    # Without having waited: the snapshot, as before.
    opened = open_subscription(st, sse("w", ""), ANONYMOUS)
    assert opened is not None and opened.reader is not None
    assert [m.kind for m in opened.reader.pull()] == ["snapshot", "end"]
    # The client's cursor still decides.
    opened = open_subscription(st, ws(workflow="w", since=1), ANONYMOUS, waited=True)
    assert opened is not None and opened.reader is not None
    assert [orjson.loads(m.body)["seq"] for m in opened.reader.pull()] == [2, 3, 3]


def test_a_subscription_that_waited_too_long_for_the_ring_gets_the_snapshot() -> None:
    st = mk(ring_events=4)
    send(st, *[wfe(etype="x.tick") for _ in range(10)])  # the first ones left the ring
    opened = open_subscription(st, sse("w", ""), ANONYMOUS, waited=True)
    assert opened is not None and opened.reader is not None
    assert [m.kind for m in opened.reader.pull()] == ["snapshot"]


def test_open_at_the_end_gives_the_end_message() -> None:
    st = mk()
    send(st, wfe())
    send(st, wfe(etype="workflow.completed"))
    epoch = st.get("w").epoch
    opened = open_subscription(st, sse("w", "", last_event_id=f"{epoch}:2"), ANONYMOUS)
    assert opened is not None and opened.reader is None
    assert opened.end is not None and opened.end.kind == "end" and opened.end.cursor == f"{epoch}:2"
    # The same through `since=`.
    opened = open_subscription(st, ws(workflow="w", since=2), ANONYMOUS)
    assert opened is not None and opened.reader is None and opened.end is not None


def test_open_errors_are_the_readers() -> None:
    st = mk()
    send(st, wfe())
    with pytest.raises(InvalidArgument, match="ahead"):
        open_subscription(st, ws(workflow="w", since=9), ANONYMOUS)
    with pytest.raises(InvalidArgument, match="journal cursor"):
        open_subscription(st, sse(None, "tenant=default&since=zzz.1"), ANONYMOUS)
    assert isinstance(workflow_not_found(sse("ghost", "")), NotFound)


def test_open_a_multi_subscription() -> None:
    st = mk()
    send(st, wfe())
    opened = open_subscription(st, ws(tenant="default"), ANONYMOUS)
    assert opened is not None and isinstance(opened.reader, MultiReader) and opened.key == JOURNAL
    # Everything in scope ended already: no reader (SSE answers 204).
    send(st, wfe(etype="workflow.completed"))
    opened = open_subscription(st, sse(None, "workflows=w"), ANONYMOUS)
    assert opened is not None and opened.reader is None and opened.end is None
