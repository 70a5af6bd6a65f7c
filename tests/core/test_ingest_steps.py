"""A frame applied in steps (core/state.py `FrameIngest`, `ingest_step`):
the same result as at once, whatever the step size; inputs the checks do
not foresee refuse one event, never the ingest."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.state import BrokerState

from .helpers import log, mk, task, wfe


def view(s: BrokerState) -> list[tuple[str, int, bytes]]:
    return [(e.workflow_id, e.seq, e.body) for e in s.journal]


@settings(max_examples=40, deadline=None)
@given(step=st.integers(min_value=1, max_value=40), n=st.integers(min_value=1, max_value=120))
def test_any_step_size_gives_the_same_state(step: int, n: int) -> None:
    events = [
        wfe("a"),
        *(log("a", message=f"m{i}") for i in range(n)),
        {"workflow_id": "a"},
        task("t", "running", wid="a"),
    ]
    frame = orjson.dumps(events)
    whole, stepped = mk(), mk()
    r1 = whole.ingest_frame(frame, 1.0)
    work = stepped.begin_frame(frame)
    steps = 0
    while not stepped.ingest_step(work, 1.0, None, step):
        steps += 1
    assert steps == (len(events) - 1) // step
    r2 = work.result
    assert (r1.accepted, r1.duplicates, [(i, r.reason) for i, r in r1.rejected]) == (
        r2.accepted,
        r2.duplicates,
        [(i, r.reason) for i, r in r2.rejected],
    )
    assert view(whole) == view(stepped)


def test_a_frame_too_deep_for_the_exact_check_refuses_its_events_not_the_ingest() -> None:
    s = mk()
    deep = b"[" * 1000 + b"]" * 1000  # orjson reads it; Python's parser does not
    r = s.ingest_frame(b'[{"workflow_id":"a","type":"x","data":1e25},' + deep + b"]", 1.0)
    assert r.accepted == 0 and [x.reason for _, x in r.rejected] == ["invalid_field", "not_object"]
    assert s.ingest_frame(orjson.dumps(wfe("b")), 1.0).accepted == 1  # and ingest goes on


def test_a_float_that_looks_like_a_large_integer_is_kept_a_float() -> None:
    s = mk()
    r = s.ingest_frame(b'{"workflow_id":"a","type":"x","data":[1.0e25, 18446744073709551615]}', 1.0)
    assert r.accepted == 1
    assert orjson.loads(s.workflows["a"].ring.last().body)["data"] == [1.0e25, 18446744073709551615]
    r = s.ingest_frame(b'{"workflow_id":"a","type":"x","data":[1, 10000000000000000000000000]}', 1.0)
    assert [x.reason for _, x in r.rejected] == ["invalid_field"]
