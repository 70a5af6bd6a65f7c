"""GET /metrics end to end: the Prometheus text format (parsed with
prometheus-client's own parser), exact counts of what the test caused,
bounded labels (no workflow id, no user anywhere), histograms that fill,
and the store's gauges with a real PostgreSQL. The daemon is a subprocess.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from .builders import ev, log
from .e2e import client_for, open_sse, poll, post_events, uid, wf_path, zmq_barrier


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value}"""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(client: httpx.AsyncClient) -> tuple[str, dict[Any, float]]:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text, parse(r.text)


def value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


async def test_metrics_count_what_happened_with_bounded_labels(broker_factory) -> None:
    d = broker_factory()
    wid, other = uid("metrics"), uid("metrics")
    with trio.fail_after(20):
        async with client_for(d) as client:
            _, before = await scrape(client)
            assert value(before, "broker_ingested_total") == 0
            d.push(ev(wid, "workflow.running", id="e-1"), ev(wid, "workflow.running", id="e-1"))  # one duplicate
            d.push(b"not json")
            d.push({"type": "x.y"})  # no workflow_id
            r = await post_events(client, [log(other, "over http"), log(other, "again")])
            assert r.status_code == 202, r.text
            await zmq_barrier(d, client)  # +1 event (the barrier's workflow)
            async with open_sse(client, wf_path(wid)) as s:
                assert (await s.expect()).event == "snapshot"
                d.push(log(wid, "live"))
                assert (await s.expect()).event == "log"
                text, m = await scrape(client)
                assert value(m, "broker_connections", transport="sse") == 1
                assert value(m, "broker_subscribers") >= 1
    assert value(m, "broker_ingested_total") == 5  # 1 + 2 over HTTP + the barrier + the live log
    assert value(m, "broker_duplicates_total") == 1
    assert value(m, "broker_rejected_total", reason="invalid_json") == 1
    assert value(m, "broker_rejected_total", reason="missing_field") == 1
    assert value(m, "broker_delivered_total", transport="sse") >= 3  # two snapshots and a log
    assert value(m, "broker_workflows_created_total") == 3
    assert value(m, "broker_workflows") == 3
    assert value(m, "broker_lag_seconds") == 0
    assert value(m, "broker_audit_events_total", action="connection.opened") >= 2
    # Bounded labels: never a workflow id or a user.
    for wf in (wid, other):
        assert wf not in text
    labels = {k for (_, ls) in m for k, _ in ls}
    assert labels <= {"reason", "transport", "action", "kind", "generation", "le"}, labels
    # No token needed, and nothing of a workflow's data.
    assert "over http" not in text


async def test_gc_pauses_are_a_histogram(broker_factory) -> None:
    d = broker_factory()
    with trio.fail_after(20):
        async with client_for(d) as client:
            for _ in range(30):  # enough allocation for young collections
                d.push([ev(uid("gc"), "workflow.running") for _w in range(50)])
            await zmq_barrier(d, client)

            async def collected() -> float:
                _, m = await scrape(client)
                return sum(v for (name, _), v in m.items() if name == "broker_gc_pause_seconds_count")

            assert await poll(collected, 10) > 0


async def test_store_metrics_with_postgres(pg_dsn: str, broker_factory) -> None:
    d = broker_factory(store={"backend": "postgres", "dsn": pg_dsn})
    wid = uid("stored")
    with trio.fail_after(30):
        async with client_for(d) as client:
            r = await client.post(
                "/v1/events", params={"durable": "true"}, json=[ev(wid, "workflow.running"), log(wid, "kept")]
            )
            assert r.status_code == 202, r.text
            _, m = await scrape(client)
    assert value(m, "broker_store_up") == 1
    assert value(m, "broker_store_written_events_total") >= 2
    assert value(m, "broker_store_batches_total") >= 1
    assert value(m, "broker_store_queue_events") >= 0
    assert value(m, "broker_store_write_seconds_count") >= 1
    assert value(m, "broker_durable_commit_seconds_count") == 1
    assert value(m, "broker_durable_commit_seconds_bucket", le="+Inf") == 1
