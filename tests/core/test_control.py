"""Control requests (DESIGN.md §8): fields, rights, the published body and
the rate per principal, decided in the core for HTTP and WebSocket alike."""

from __future__ import annotations

from typing import Any

import pytest

from broker.core.claims import Grant
from broker.core.control import RequestRate, check_request, control_body, parse_request
from broker.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from broker.core.limits import ANONYMOUS, Principal

from .helpers import mk, send, wfe


@pytest.mark.parametrize(
    "kind, wid, fields, detail",
    [
        ("stop", "w", {}, "unknown control request"),
        ("cancel", "", {}, "'workflow'"),
        ("cancel", 5, {}, "'workflow'"),
        ("cancel", "w", {"extra": 1}, "unknown field 'extra'"),
        ("cancel", "w", {"name": "x"}, "takes no 'name'"),
        ("cancel", "w", {"data": {}}, "takes no 'name' or 'data'"),
        ("signal", "w", {}, "needs a 'name'"),
        ("signal", "w", {"name": ""}, "'name'"),
        ("signal", "w", {"name": "a\nb"}, "'name'"),
        ("signal", "w", {"name": "x" * 129}, "'name'"),
        ("cancel", "w", {"reason": 7}, "'reason'"),
        ("cancel", "w", {"task_id": ["t"]}, "'task_id'"),
        ("cancel", "w", {"request_id": "r" * 129}, "'request_id'"),
    ],
)
def test_bad_fields_are_invalid_arguments(kind: str, wid: Any, fields: dict[str, Any], detail: str) -> None:
    with pytest.raises(InvalidArgument, match=detail):
        parse_request(kind, wid, fields)


def test_data_is_bounded_in_size_and_depth() -> None:
    with pytest.raises(InvalidArgument, match="exceeds"):
        parse_request("signal", "w", {"name": "n", "data": "x"}, encoded_size=70000)
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    with pytest.raises(InvalidArgument, match="deeper"):
        parse_request("signal", "w", {"name": "n", "data": deep})
    with pytest.raises(InvalidArgument, match="beyond 64 bits"):
        parse_request("signal", "w", {"name": "n", "data": {"n": 1e30}})  # how orjson reads 10**30


def test_rights_and_states() -> None:
    st = mk()
    send(st, wfe("a", tenant="A"), wfe("done", tenant="A"), wfe("done", "workflow.completed"))
    controller = Principal.of(Grant("u", "A", frozenset({"control"})))
    check_request(st, controller, parse_request("cancel", "a", {}))
    check_request(st, ANONYMOUS, parse_request("cancel", "a", {}))  # auth off
    with pytest.raises(PermissionDenied, match="control"):
        check_request(st, Principal.of(Grant("u", "A", frozenset({"subscribe"}))), parse_request("cancel", "a", {}))
    with pytest.raises(NotFound):
        check_request(st, Principal.of(Grant("u", "B", frozenset({"control"}))), parse_request("cancel", "a", {}))
    with pytest.raises(NotFound):
        check_request(st, controller, parse_request("cancel", "nobody", {}))
    with pytest.raises(FailedPrecondition, match="ended"):
        check_request(st, controller, parse_request("cancel", "done", {}))


def test_the_body_has_every_key_of_section_8() -> None:
    req = parse_request("signal", "w", {"name": "approve", "data": {"x": 1}, "task_id": "t"})
    assert control_body(req, "r1", "ada", 5) == {
        "type": "signal",
        "workflow_id": "w",
        "task_id": "t",
        "name": "approve",
        "data": {"x": 1},
        "reason": None,
        "requested_by": "ada",
        "request_id": "r1",
        "ts": 5,
    }


def test_the_rate_is_per_principal_and_refills() -> None:
    rate = RequestRate(rate=2.0, burst=3, keep=2)
    for _ in range(3):
        rate.take("a", 0.0)
    with pytest.raises(ResourceExhausted):
        rate.take("a", 0.0)
    rate.take("b", 0.0)
    rate.take("a", 0.5)  # one token back after half a second
    with pytest.raises(ResourceExhausted):
        rate.take("a", 0.5)
    rate.take("c", 0.5)  # keep=2: the least recently used is forgotten
    assert len(rate._buckets) == 2
