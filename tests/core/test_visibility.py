"""The visibility decision (DESIGN.md §7), made once in the core: a
principal × a subscription → what its reader shows (core/subscribe.py
`authorize`, core/scope.py `viewer`). Checked against a brute-force
reference over random tenants, trees, `workflows` claims and scopes."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from broker.core.claims import Grant
from broker.core.entry import Entry, Message
from broker.core.errors import PermissionDenied
from broker.core.filters import Filter
from broker.core.limits import ANONYMOUS, Principal
from broker.core.scope import PARENT, TENANT, WORKFLOW, WORKFLOWS, Scope
from broker.core.subscribe import Cursor, Subscription, open_subscription, require

from .helpers import log, mk, send, wfe

IDS = [f"w{i}" for i in range(6)]
TENANTS = ["t0", "t1"]


@dataclass(frozen=True)
class World:
    tenant: dict[str, str]  # workflow id → its tenant
    parent: dict[str, str | None]  # workflow id → its parent (an earlier id), or None

    def ancestors(self, wid: str) -> list[str]:
        """Up the tree within the workflow's own tenant: trees do not cross
        tenants (a parent of another tenant is not linked)."""
        out = []
        p = self.parent[wid]
        while p is not None and self.tenant[p] == self.tenant[wid]:
            out.append(p)
            p = self.parent[p]
        return out


@hs.composite
def worlds(draw: hs.DrawFn) -> World:
    tenant = {w: draw(hs.sampled_from(TENANTS)) for w in IDS}
    parent: dict[str, str | None] = {}
    for i, w in enumerate(IDS):
        parent[w] = draw(hs.none() | hs.sampled_from(IDS[:i])) if i else None
    return World(tenant, parent)


grants = hs.builds(
    lambda tenant, ids, prefixes: Grant(
        "u", tenant, frozenset({"subscribe"}), None if ids is None else frozenset(ids), tuple(prefixes)
    ),
    hs.sampled_from(TENANTS),
    hs.none() | hs.sets(hs.sampled_from(IDS), max_size=4),
    hs.lists(hs.sampled_from(["w", "w1", "w2", "x"]), max_size=2),
)

scopes = hs.one_of(
    hs.builds(lambda w: Scope(WORKFLOW, w), hs.sampled_from(IDS)),
    hs.builds(lambda ws: Scope(WORKFLOWS, frozenset(ws)), hs.sets(hs.sampled_from(IDS), min_size=1)),
    hs.builds(lambda t: Scope(TENANT, t), hs.sampled_from(TENANTS)),
    hs.builds(lambda w: Scope(PARENT, w), hs.sampled_from(IDS)),
)


def brute_visible(grant: Grant, world: World, wid: str) -> bool:
    if world.tenant[wid] != grant.tenant:
        return False
    if grant.ids is None:
        return True
    return wid in grant.ids or any(wid.startswith(p) for p in grant.prefixes)


def brute_in_scope(scope: Scope, world: World, wid: str) -> bool:
    if scope.kind == WORKFLOW:
        return wid == scope.value
    if scope.kind == WORKFLOWS:
        return wid in scope.value
    if scope.kind == TENANT:
        return world.tenant[wid] == scope.value
    return wid == scope.value or scope.value in world.ancestors(wid)


def shown(items: list[Entry | Message]) -> set[str]:
    return {it.workflow_id for it in items}


@settings(max_examples=300, deadline=None)
@given(world=worlds(), grant=grants, scope=scopes)
def test_a_reader_shows_exactly_what_its_principal_may_see(world: World, grant: Grant, scope: Scope) -> None:
    st = mk()
    for w in IDS:  # parents first: IDS is in creation order
        parent = world.parent[w]
        send(st, wfe(w, tenant=world.tenant[w], **({"parent_id": parent} if parent else {})))
    expected = {w for w in IDS if brute_in_scope(scope, world, w) and brute_visible(grant, world, w)}
    sub = Subscription(scope, Filter())
    principal = Principal.of(grant)
    if scope.kind == TENANT and scope.value != grant.tenant:
        with pytest.raises(PermissionDenied):
            open_subscription(st, sub, principal)
        return
    opened = open_subscription(st, sub, principal)
    if scope.kind == WORKFLOW and not expected:
        assert opened is None  # not visible: answered as an unknown workflow
        return
    assert opened is not None and opened.reader is not None
    snapshots = shown(opened.reader.pull())
    assert snapshots == expected  # every workflow is active: one snapshot each
    send(st, *(log(w, message="after") for w in IDS))
    assert shown(opened.reader.pull()) == expected
    # The same subscription without authentication shows the whole scope.
    anon = open_subscription(st, sub, ANONYMOUS)
    assert anon is not None and anon.reader is not None
    assert shown(anon.reader.pull()) == {w for w in IDS if brute_in_scope(scope, world, w)}


def test_a_multi_stream_does_not_end_on_an_invisible_workflow() -> None:
    """`workflows=a,b` ends when both ended; one of them another tenant's is
    as if unknown: its end is never seen, and neither ends the stream."""
    st = mk()
    send(st, wfe("a", tenant="t0"), wfe("b", tenant="t1"))
    principal = Principal.of(Grant("u", "t0", frozenset({"subscribe"})))
    opened = open_subscription(st, Subscription(Scope(WORKFLOWS, frozenset({"a", "b"})), Filter()), principal)
    assert opened is not None and opened.reader is not None
    reader = opened.reader
    assert shown(reader.pull()) == {"a"}
    send(st, wfe("b", "workflow.completed"))
    assert reader.pull() == [] and not reader.done
    send(st, wfe("a", "workflow.completed"))
    assert [it.kind for it in reader.pull()] == ["state", "end"]
    assert not reader.done  # "b" may still appear for it (it never will)


def test_subscribing_needs_the_subscribe_scope() -> None:
    st = mk()
    send(st, wfe("a", tenant="t0"))
    publisher = Principal.of(Grant("u", "t0", frozenset({"publish"})))
    with pytest.raises(PermissionDenied, match="subscribe"):
        open_subscription(st, Subscription(Scope(WORKFLOW, "a"), Filter(), Cursor()), publisher)
    with pytest.raises(PermissionDenied, match="admin"):
        require(publisher, "admin")
    require(ANONYMOUS, "admin")  # authentication off: everything is allowed


@pytest.mark.parametrize("child_first", [False, True])
def test_trees_do_not_cross_tenants(child_first: bool) -> None:
    """A workflow naming another tenant's workflow as its parent is not
    linked (whichever arrives first): no `parent=` stream of either tenant
    holds it, so neither learns of the other's tree through it."""
    st = mk()
    probe = wfe("a-probe", tenant="A", parent_id="b-secret")
    tree = [wfe("b-root", tenant="B"), wfe("b-secret", tenant="B", parent_id="b-root")]
    for e in [probe, *tree] if child_first else [*tree, probe]:
        send(st, e)
    assert st.workflows["a-probe"].ancestors == ()
    assert st.workflows["b-secret"].ancestors == ("b-root",)
    assert {wf.id for wf in st.descendants("b-root")} == {"b-secret"}
    assert {wf.id for wf in st.descendants("b-secret")} == set()
    for principal in (ANONYMOUS, Principal.of(Grant("u", "A", frozenset({"subscribe"})))):
        opened = open_subscription(st, Subscription(Scope(PARENT, "b-root"), Filter()), principal)
        assert opened is not None and opened.reader is not None
        assert "a-probe" not in shown(opened.reader.pull())
        send(st, log("a-probe", message="x"))
        assert "a-probe" not in shown(opened.reader.pull())


def test_event_ids_are_unique_per_tenant() -> None:
    """One tenant's event ids neither shadow another's events as duplicates
    nor tell that they exist."""
    st = mk()
    send(st, wfe("a", tenant="A", id="e-1"))
    r = st.ingest_frame(orjson.dumps(wfe("b", tenant="B", id="e-1")), 0.0)
    assert r.accepted == 1 and r.duplicates == 0
    r = st.ingest_frame(orjson.dumps(log("b", id="e-1")), 0.0)  # B's own id again: a duplicate
    assert r.accepted == 0 and r.duplicates == 1
    r = st.ingest_frame(orjson.dumps(log("a", id="e-1")), 0.0)
    assert r.duplicates == 1
