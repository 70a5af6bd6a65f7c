"""The wake schedule (broker/core/wake.py): when subscribers are woken, at
once or in write passes under load. Synchronous, with `now` given."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as hs

from broker.core.wake import WakeSchedule


def schedule(*keys: str, watchers: int = 1, **kw: float) -> WakeSchedule:
    """(Tests of write passes give times in milliseconds, with max_delay and
    lag_behind to match: whole numbers, no float rounding.)"""
    s = WakeSchedule(**kw)
    for key in keys:
        for _ in range(watchers):
            s.watch(key)
    return s


def test_unwatched_keys_are_never_woken() -> None:
    s = schedule("a")
    assert s.touched(["a", "b"], 0.0) == ["a"]


def test_few_watchers_are_woken_at_once_every_time() -> None:
    s = schedule("a", watchers=5, write_cost=20e-6)
    assert s.touched(["a"], 0.0) == ["a"]
    assert s.touched(["a"], 0.001) == ["a"]  # 1 ms later: past 5 × 20 µs


def test_fan_out_interval_defers_and_batches() -> None:
    s = schedule("fan", watchers=1000, write_cost=20e-6)  # interval 20 ms
    assert s.touched(["fan"], 0.0) == ["fan"]
    assert s.touched(["fan"], 0.005) == []
    assert s.touched(["fan"], 0.010) == []  # already deferred: one wake for both
    assert s.next_due() == 0.020
    assert s.expire(0.019) == []
    assert s.expire(0.020) == ["fan"]
    assert s.next_due() is None


def test_backlog_moves_wakes_into_a_write_pass_when_the_ingest_catches_up() -> None:
    s = schedule("a", "b", "c", max_delay=50.0)
    assert s.ingest_turn(0.0, backlog=True) == []
    assert s.behind
    # While behind, nothing is woken as events come in.
    assert s.touched(["a", "b"], 1.0) == []
    assert s.touched(["a", "c"], 2.0) == []
    assert s.ingest_turn(3.0, backlog=True) == []
    # Caught up: every touched key once, in one pass.
    assert sorted(s.ingest_turn(4.0, backlog=False)) == ["a", "b", "c"]
    assert not s.behind
    s.end_pass(5.0)
    assert s.touched(["a"], 6.0) == ["a"]  # back to waking at once
    st = s.statistics()
    assert st.passes == 1 and st.deferred_by_load == 3


def test_a_pass_comes_after_max_delay_even_if_the_ingest_never_catches_up() -> None:
    s = schedule("a", max_delay=50.0)
    s.ingest_turn(0.0, backlog=True)
    s.touched(["a"], 10.0)
    assert s.ingest_turn(50.0, backlog=True) == []
    assert s.ingest_turn(60.0, backlog=True) == ["a"]  # 50 ms after it went dirty
    assert s.behind  # still behind: later touches wait for the next pass


def test_a_late_turn_means_behind_too() -> None:
    s = schedule("a", lag_behind=20.0)
    assert s.ingest_turn(0.0, backlog=False, lag=19.0) == []
    assert not s.behind
    assert s.ingest_turn(100.0, backlog=False, lag=30.0) == []
    assert s.behind
    assert s.touched(["a"], 101.0) == []
    assert s.ingest_turn(102.0, backlog=False, lag=1.0) == ["a"]  # caught up
    assert not s.behind


def test_after_a_pass_the_next_waits_for_the_ingest_share() -> None:
    s = schedule("a", "b", max_delay=50.0)
    s.ingest_turn(0.0, backlog=True)
    s.touched(["a"], 10.0)
    assert s.ingest_turn(60.0, backlog=True) == ["a"]
    s.end_pass(260.0)  # the pass's writes took 200 ms
    assert s.ingest_turn(265.0, backlog=False, lag=205.0) == []  # still behind: the pass made it late
    s.touched(["a", "b"], 270.0)
    assert s.ingest_turn(300.0, backlog=True) == []
    assert s.ingest_turn(450.0, backlog=True) == []
    assert sorted(s.ingest_turn(460.0, backlog=True)) == ["a", "b"]  # 200 ms after the pass ended


def test_caught_up_soon_after_a_pass_waits_for_the_spacing() -> None:
    s = schedule("a", max_delay=50.0)
    s.ingest_turn(0.0, backlog=True)
    s.touched(["a"], 1.0)
    assert s.ingest_turn(2.0, backlog=False) == ["a"]  # the first pass: at once
    s.end_pass(3.0)
    s.ingest_turn(4.0, backlog=True)
    s.touched(["a"], 5.0)
    assert s.ingest_turn(6.0, backlog=False) == []  # caught up, but only 3 ms after the pass
    assert s.next_due() == 53.0
    assert s.expire(53.0) == ["a"]
    assert not s.behind


def test_caught_up_after_a_long_pass_the_next_waits_only_max_delay() -> None:
    """The ingest's share after a pass is owed only while it has not caught
    up: once it waits for input, the writes may take the rest of the loop."""
    s = schedule("a", "b", max_delay=50.0)
    s.ingest_turn(0.0, backlog=True)
    s.touched(["a"], 10.0)
    assert s.ingest_turn(60.0, backlog=True) == ["a"]
    s.end_pass(260.0)  # the pass's writes took 200 ms
    s.touched(["a", "b"], 270.0)
    assert s.ingest_turn(280.0, backlog=False) == []  # caught up 20 ms after the pass
    assert s.next_due() == 310.0  # max_delay after it, not 200 ms
    assert sorted(s.expire(310.0)) == ["a", "b"]


def test_the_timer_runs_a_pass_when_the_ingest_went_quiet_while_behind() -> None:
    s = schedule("a", max_delay=50.0)
    s.ingest_turn(0.0, backlog=True)  # the last turn was full, then the queue emptied
    s.touched(["a"], 1.0)
    assert s.next_due() == 51.0
    assert s.expire(51.0) == ["a"]


def test_deferred_wakes_of_few_subscribers_join_the_pass() -> None:
    s = schedule("few", watchers=4, write_cost=0.0005)  # interval 2 ms: below max_delay / 10
    s.touched(["few"], 0.0)
    s.touched(["few"], 0.001)  # deferred to 0.002
    s.ingest_turn(0.0015, backlog=True)
    assert s.expire(0.002) == []  # now part of the pass, not its own timer
    assert s.ingest_turn(0.003, backlog=False) == ["few"]


def test_a_fan_out_key_keeps_its_interval_while_behind() -> None:
    """1,000 subscribers: woken every 20 ms, behind or not (waiting for
    passes would only make each write larger and later)."""
    s = schedule("fan", "few", write_cost=20e-6)
    for _ in range(999):
        s.watch("fan")
    s.touched(["fan"], 0.0)
    s.ingest_turn(0.001, backlog=True)
    assert s.behind
    assert s.touched(["fan", "few"], 0.002) == []
    assert s.next_due() == 0.02
    assert s.expire(0.02) == ["fan"]  # its own timer; "few" waits for the pass
    assert s.touched(["fan"], 0.05) == ["fan"]


def test_unwatch_forgets_the_key_everywhere() -> None:
    s = schedule("a", "b", watchers=1000)
    s.touched(["a", "b"], 0.0)
    s.touched(["a"], 0.001)
    for _ in range(1000):
        s.unwatch("a")
    st = s.statistics()
    assert st.watched_keys == 1 and st.wake_times == 1 and st.deferred == 0
    assert s.next_due() is None


@settings(max_examples=200, deadline=None)
@given(
    hs.lists(
        hs.tuples(
            hs.sampled_from(["touch", "turn", "expire"]),
            hs.frozensets(hs.sampled_from("abcd"), max_size=4),
            hs.booleans(),
            hs.floats(min_value=0.0, max_value=0.2),
        ),
        max_size=60,
    )
)
def test_every_touched_key_is_woken_in_the_end(steps: list[tuple[str, frozenset[str], bool, float]]) -> None:
    """Whatever the interleaving of touches, turns and timers, a key that got
    entries is woken at or after its last touch — no wakeup is lost."""
    s = schedule("a", "b", "c", "d", watchers=300, write_cost=20e-6, max_delay=0.05)
    now = 0.0
    last_touch: dict[str, float] = {}
    last_wake: dict[str, float] = {}

    def woke(keys: list[str]) -> None:
        for k in keys:
            last_wake[k] = now

    for op, keys, backlog, dt in steps:
        now += dt
        if op == "touch":
            for k in keys:
                last_touch[k] = now
            woke(s.touched(sorted(keys), now))
        elif op == "turn":
            woke(s.ingest_turn(now, backlog))
            s.end_pass(now)
        else:
            woke(s.expire(now))
            s.end_pass(now)
    # Drain: the ingest goes idle, timers fire.
    now += 1.0
    woke(s.ingest_turn(now, backlog=False))
    s.end_pass(now)
    while (due := s.next_due()) is not None:
        now = max(now, due)
        woke(s.expire(now))
        s.end_pass(now)
    for k, t in last_touch.items():
        assert last_wake.get(k, -1.0) >= t, (k, t, last_wake)


def test_no_pass_begins_while_one_is_running() -> None:
    s = schedule("a", "b", max_delay=50.0)
    s.ingest_turn(0.0, backlog=True)
    s.touched(["a"], 1.0)
    assert s.ingest_turn(2.0, backlog=False) == ["a"]  # caught up: the pass starts
    assert s.pass_running
    s.ingest_turn(3.0, backlog=True)
    s.touched(["b"], 4.0)
    assert s.ingest_turn(60.0, backlog=True) == []  # due by time, but the first still runs
    assert s.expire(60.0) == [] and s.next_due() is None
    s.end_pass(100.0, took=10.0)
    assert s.next_due() == 150.0  # max_delay after the pass ended
    assert s.ingest_turn(150.0, backlog=True) == ["b"]
