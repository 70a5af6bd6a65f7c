"""Connection limit accounting with principals (DESIGN.md §6), synchronously."""

from __future__ import annotations

import pytest

from broker.core.errors import ResourceExhausted, Unavailable
from broker.core.limits import ANONYMOUS, ConnectionTable, Principal


def table(global_limit: int = 100, per_user: int = 2, per_tenant: int = 3) -> ConnectionTable:
    return ConnectionTable(global_limit=global_limit, per_user=per_user, per_tenant=per_tenant)


def test_anonymous_only_global_limit_applies() -> None:
    t = table(global_limit=3, per_user=1, per_tenant=1)
    assert ANONYMOUS.anonymous
    for i in range(3):
        assert t.admit(i, ANONYMOUS) == []
    with pytest.raises(Unavailable):
        t.admit(3, ANONYMOUS)
    t.release(0)
    assert t.admit(3, ANONYMOUS) == []
    assert t.counts()["total"] == 3


def test_per_user_closes_the_oldest() -> None:
    t = table(per_user=2, per_tenant=100)
    alice = Principal(user="alice", tenant="acme")
    assert t.admit(1, alice) == []
    assert t.admit(2, alice) == []
    assert t.admit(3, alice) == [1]
    t.release(1)
    assert t.admit(4, alice) == [2]
    # A burst before the evicted ones leave evicts successively older ones.
    assert t.admit(5, alice) == [2, 3]
    bob = Principal(user="bob", tenant="acme")
    assert t.admit(6, bob) == []


def test_per_tenant_refuses_with_429() -> None:
    t = table(per_user=10, per_tenant=2)
    a = Principal(user="a", tenant="t1")
    b = Principal(user="b", tenant="t1")
    t.admit(1, a)
    t.admit(2, b)
    with pytest.raises(ResourceExhausted) as exc:
        t.admit(3, a)
    assert exc.value.status == 429 and exc.value.code == "resource_exhausted"
    assert t.admit(3, Principal(user="c", tenant="t2")) == []
    t.release(2)
    assert t.admit(4, a) == []


def test_global_limit_wins_over_everything() -> None:
    t = table(global_limit=2, per_user=5, per_tenant=5)
    t.admit(1, Principal(user="a", tenant="t"))
    t.admit(2, ANONYMOUS)
    with pytest.raises(Unavailable) as exc:
        t.admit(3, Principal(user="a", tenant="t"))
    assert exc.value.status == 503


def test_counts_return_to_zero() -> None:
    t = table(per_user=1)
    principals = [ANONYMOUS, Principal(user="u", tenant="t"), Principal(user="u", tenant="t"), Principal(tenant="t")]
    for i, p in enumerate(principals):
        t.admit(i, p)
    for i in range(len(principals)):
        t.release(i)
        t.release(i)  # releasing twice is harmless
    assert t.counts() == {"total": 0, "users": {}, "tenants": {}}
    assert len(t) == 0
