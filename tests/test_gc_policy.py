"""The garbage collector's policy (broker/server/gc_policy.py).

`FullCollections` decides when the broker runs a full collection itself
(automatic ones are off): tested synchronously. End to end, closing more
than `MIN_CLOSED` connections makes the daemon run one (seen in
`/v1/admin/stats` under `gc.gen2`), and it frees the cyclic garbage they
left behind.
"""

from __future__ import annotations

import gc
import socket
from typing import Any

import httpx
import pytest
import trio

from broker.server import gc_policy
from broker.server.gc_policy import MAX_WAIT, MIN_CLOSED, THRESHOLDS, FullCollections

from .builders import ev
from .e2e import client_for, module_broker, poll, stats

daemon = module_broker()


def test_install_and_uninstall_in_any_order_leave_the_collector_as_found():
    """Two brokers in one process may stop in any order: the last one
    restores the thresholds and unfreezes."""
    before = gc.get_threshold()
    try:
        a = gc_policy.install()
        b = gc_policy.install()
        assert gc.get_threshold() == THRESHOLDS
        gc_policy.uninstall(a)  # the first one stops first
        assert gc.get_threshold() == THRESHOLDS  # b still runs
        gc_policy.uninstall(b)
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(*before)


def test_thresholds_keep_automatic_full_collections_off():
    assert THRESHOLDS[2] >= 1_000_000


def test_nothing_due_without_closes_or_time():
    p = FullCollections(0.0, min_closed=10, every=600, max_wait=30)
    for t in range(1, 100):
        assert not p.check(open_connections=100, now=float(t), ingested=t)


def test_due_after_min_closed_then_waits_for_a_quiet_second():
    p = FullCollections(0.0, min_closed=10, every=600, max_wait=30)
    p.closed = 9
    assert not p.check(0, 1.0, ingested=5)
    p.closed = 10
    # Due now, but events are flowing: wait.
    assert not p.check(0, 2.0, ingested=6)
    assert not p.check(0, 3.0, ingested=7)
    assert p.check(0, 4.0, ingested=7)  # no event since the last check
    p.done(4.0)
    assert p.closed == 0 and p.due_since is None
    assert not p.check(0, 5.0, ingested=7)  # quiet, but nothing is due


def test_a_quarter_of_the_open_connections_when_that_is_more():
    p = FullCollections(0.0, min_closed=10, every=600, max_wait=30)
    p.closed = 20
    assert not p.check(open_connections=100, now=1.0, ingested=0)  # 20 < 25
    assert not p.check(open_connections=100, now=2.0, ingested=0)
    p.closed = 25
    assert not p.check(open_connections=100, now=3.0, ingested=1)  # due, not quiet
    assert p.check(open_connections=100, now=4.0, ingested=1)


def test_busy_broker_collects_after_max_wait():
    p = FullCollections(0.0, min_closed=10, every=600, max_wait=30)
    p.closed = 10
    assert not p.check(0, 100.0, ingested=1)
    for t in range(101, 130):
        assert not p.check(0, float(t), ingested=t)
    assert p.check(0, 130.0, ingested=130)


def due(p: FullCollections, now: float) -> bool:
    """Checked twice, the second a quiet second later (no ingest between)."""
    p.check(0, now - 0.5, ingested=0)
    return p.check(0, now, ingested=0)


def test_long_lived_streams_ended_bring_a_complete_collection_forward_at_most_once_a_floor():
    p = FullCollections(0.0, min_closed=10, every=600, max_wait=30, freeze_every=5, complete_floor=60)
    p.froze(50.0)
    for _ in range(10):
        p.ended(began=60.0)  # began after the last freeze: its garbage was never frozen
    assert due(p, 70.0) and not p.complete
    p.done(70.0)  # (a freeze after it, at 70)
    for _ in range(10):
        p.ended(began=65.0)  # began before a freeze
    assert due(p, 71.0) and p.complete  # 71 s since the last complete one (the start)
    p.done(71.0)
    for _ in range(10):
        p.ended(began=70.5)
    assert due(p, 80.0) and not p.complete  # within the floor: a full one only
    p.done(80.0)
    assert p.closed_frozen == 10
    for _ in range(10):
        p.ended(began=100.0)
    assert due(p, 132.0) and p.complete  # the floor has passed


def test_due_every_so_often_even_without_closes():
    p = FullCollections(0.0, min_closed=10, every=600, max_wait=30)
    assert not p.check(0, 599.0, ingested=0)
    assert p.check(0, 600.0, ingested=0)
    p.done(600.0)
    assert not p.check(0, 601.0, ingested=0)


async def _gen2(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await stats(client))["gc"]["gen2"]


async def _collected(client: httpx.AsyncClient) -> int:
    return sum(gen["collected"] for gen in (await stats(client))["gc"].values())


@pytest.mark.slow
async def test_closed_connections_make_the_daemon_collect_their_garbage(daemon):
    wid = "gc-churn"
    daemon.push(ev(wid, "workflow.running"))
    n = MIN_CLOSED + 50
    request = f"GET /v1/workflows/{wid}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    with trio.fail_after(60 + MAX_WAIT):
        async with client_for(daemon) as client:
            before = await _gen2(client)
            collected_before = await _collected(client)
            opened = 0
            for _ in range(n):  # open a stream, see its first bytes, close it
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                await sock.connect(("127.0.0.1", daemon.port))
                await sock.send(request)
                assert await sock.recv(4096)
                sock.close()
                opened += 1
            await poll(lambda: _no_connections(client), 20)
            after = await poll(lambda: _collected_since(client, before), 10)
            collected = await _collected(client) - collected_before
    assert opened == n
    assert after["collections"] > before["collections"]
    # Each closed stream left objects in reference cycles (the young ones
    # went in generations 0 and 1, the rest in the full collection).
    assert collected >= n, (collected, before, after)


async def _no_connections(client: httpx.AsyncClient) -> bool:
    return (await stats(client))["connections"]["total"] == 0


async def _collected_since(client: httpx.AsyncClient, before: dict[str, Any]) -> dict[str, Any] | None:
    now = await _gen2(client)
    return now if now["collections"] > before["collections"] else None
