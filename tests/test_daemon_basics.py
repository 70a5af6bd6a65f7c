"""The daemon as a subprocess: readiness, health, SSE end to end, clean exit."""

from __future__ import annotations

import signal
from contextlib import aclosing

import httpx
import trio

from .builders import ev
from .sse_client import SseEvent, iter_sse


async def test_health_and_ready(broker):
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=broker.url) as client:
            r = await client.get("/healthz")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            r = await client.get("/readyz")
            assert r.status_code == 200 and r.json()["ready"] is True


async def test_stats_name_every_transport_also_at_zero(broker):
    """docs/reference.md: `connections` has total, sse, ws, users, tenants."""
    async with httpx.AsyncClient(base_url=broker.url) as client:
        conns = (await client.get("/v1/admin/stats")).json()["connections"]
    assert conns == {"total": 0, "sse": 0, "ws": 0, "users": {}, "tenants": {}}


async def test_zmq_event_reaches_sse_subscriber(broker):
    broker.push(ev("wf-1", "workflow.running"))
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=broker.url, timeout=None) as client:
            async with client.stream("GET", "/v1/workflows/wf-1/stream") as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                seen: list[SseEvent] = []
                async with aclosing(iter_sse(resp)) as items:
                    async for item in items:
                        if isinstance(item, str):
                            continue
                        seen.append(item)
                        if item.event == "snapshot":
                            broker.push(ev("wf-1", "workflow.completed"))
                        if item.event == "end":
                            break
    assert [e.event for e in seen] == ["snapshot", "state", "end"]
    assert seen[0].retry == 2000
    assert seen[1].json["seq"] == 2 and seen[1].id == seen[2].id


def test_sigterm_exits_zero(broker):
    assert broker.stop(signal.SIGTERM) == 0
    assert "stopped" in broker.output()


def test_sigint_exits_zero(broker):
    assert broker.stop(signal.SIGINT) == 0
