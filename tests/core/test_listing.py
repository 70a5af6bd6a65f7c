"""GET /v1/workflows' query (core/history.py): `state` takes any state word
an engine may send, `active` is every state that is not terminal, and a
bad word is one clear error."""

from __future__ import annotations

import orjson
import pytest

from broker.core.errors import InvalidArgument
from broker.core.history import list_memory, parse_list_query
from broker.core.limits import ANONYMOUS
from broker.core.state import BrokerState

from ..builders import ev

RUNS = {
    "l-run": "workflow.running",
    "l-sus": "workflow.suspended",
    "l-wait": "workflow.waiting_for_input",
    "l-done": "workflow.completed",
    "l-fail": "workflow.failed",
}


def _listed(query: dict[str, str]) -> list[str]:
    st = BrokerState("n1")
    for wid, etype in RUNS.items():
        st.ingest_frame(orjson.dumps(ev(wid, etype)), now=1.0)
    q = parse_list_query(query, ANONYMOUS)
    return sorted(s["workflow_id"] for s in list_memory(st, q, ANONYMOUS))


@pytest.mark.parametrize(
    ("state", "want"),
    [
        ("active", ["l-run", "l-sus", "l-wait"]),
        ("terminal", ["l-done", "l-fail"]),
        ("suspended", ["l-sus"]),
        ("waiting_for_input,failed", ["l-fail", "l-wait"]),
        ("active,completed", ["l-done", "l-run", "l-sus", "l-wait"]),
        ("active,terminal", sorted(RUNS)),
    ],
)
def test_state_words_and_active(state: str, want: list[str]) -> None:
    assert _listed({"state": state}) == want


def test_no_state_lists_all() -> None:
    assert _listed({}) == sorted(RUNS)


@pytest.mark.parametrize(("state", "shown"), [("Running", "Running"), ("", ""), (" , ", ""), ("a-b", "a-b")])
def test_a_bad_state_word_is_one_clear_error(state: str, shown: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_list_query({"state": state}, ANONYMOUS)
    assert "'state' must list lower-case state words, 'active' or 'terminal'" in str(err.value)
    if shown:
        assert f"'{shown}' is not" in str(err.value)
