"""GET /metrics and the admin connection endpoints, end to end, against the
daemon as a subprocess: the Prometheus text format (parsed with
prometheus-client's own parser), exact counts of what each test caused
over ZMQ, HTTP, SSE and WebSocket, bounded labels (no workflow id, no user
anywhere), histograms that fill, the store's metrics with a real
PostgreSQL; and `GET /v1/admin/connections[/{id}]` with who, where from,
since when, what a stream reads (scope, filter, cursor), what it got and
how far behind it is.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx
import jwt
import orjson
import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from broker.core.errors import REJECT_REASONS

from .builders import ev, log
from .e2e import client_for, open_sse, poll, post_events, uid, wf_path, zmq_barrier
from .ws_client import unbatch, ws_client

LABELS = {"reason", "transport", "action", "kind", "generation", "le"}
# What Prometheus 3 sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(families: Any) -> Samples:
    """{(sample name, sorted labels): value}"""
    out: Samples = {}
    for family in families:
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(client: httpx.AsyncClient) -> tuple[str, Samples]:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers
    return r.text, samples(text_string_to_metric_families(r.text))


def value(m: Samples, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def family(m: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in m.items() if n == name}


def check_histogram(m: Samples, name: str) -> float:
    """A filled histogram's count, after checking its shape: cumulative
    buckets in ms ranges, the last one (+Inf) equal to the count."""
    buckets = sorted((float(dict(labels)["le"]), v) for labels, v in family(m, f"{name}_bucket").items())
    assert buckets[0][0] <= 0.001 and buckets[-1][0] == float("inf"), buckets
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), buckets  # cumulative
    count = value(m, f"{name}_count")
    assert counts[-1] == count
    assert value(m, f"{name}_sum") > 0
    return count


async def test_metrics_count_what_happened_with_bounded_labels(broker_factory) -> None:
    d = broker_factory()
    wid, other = uid("metrics"), uid("metrics")
    with trio.fail_after(30):
        async with client_for(d) as client:
            _, before = await scrape(client)
            assert value(before, "broker_ingested_total") == 0
            assert value(before, "broker_publish_to_write_seconds_count") == 0
            # ZMQ: an event and its duplicate, a frame that is not JSON, an event without a workflow.
            d.push(ev(wid, "workflow.running", id="e-1"), ev(wid, "workflow.running", id="e-1"))
            d.push(b"not json")
            d.push({"type": "x.y"})
            # HTTP: two events and one with a field the envelope does not define.
            r = await post_events(client, [log(other, "over http"), log(other, "again"), log(other, "x", bogus=1)])
            assert r.status_code == 202, r.text
            assert [x["reason"] for x in r.json()["rejected"]] == ["unknown_field"]
            await zmq_barrier(d, client)  # one more event, and an SSE stream that reads one message
            async with open_sse(client, wf_path(wid)) as s, ws_client(d.ws_url + "/v1/ws") as c:
                assert (await s.expect()).event == "snapshot"
                await c.send({"op": "subscribe", "sub": "w", "workflow": other})
                assert (await c.next_sub("w"))["kind"] == "snapshot"
                d.push(log(wid, "live over zmq"))
                assert (await s.expect()).event == "log"
                r = await post_events(client, log(other, "live over http"))
                assert r.status_code == 202, r.text
                assert (await c.next_sub("w"))["kind"] == "log"
                text, m = await scrape(client)
                assert value(m, "broker_connections", transport="sse") == 1
                assert value(m, "broker_connections", transport="ws") == 1
                assert value(m, "broker_subscribers") == 2
                assert value(m, "broker_lag_events") == 0  # both read everything
                assert value(m, "broker_lag_seconds") == 0  # no write blocked
            await poll(lambda: _closed(client), 10)
    # 1 (e-1) + 2 over HTTP + the barrier's + the live log over ZMQ + the live log over HTTP
    assert value(m, "broker_ingested_total") == 6
    assert value(m, "broker_duplicates_total") == 1
    rejected = {dict(labels)["reason"]: v for labels, v in family(m, "broker_rejected_total").items()}
    assert set(rejected) == REJECT_REASONS  # every reason, always
    assert {r: v for r, v in rejected.items() if v} == {"invalid_json": 1, "missing_field": 1, "unknown_field": 1}
    # SSE: the barrier's one message, then a snapshot and a log; WS: a snapshot and a log.
    assert value(m, "broker_delivered_total", transport="sse") == 3
    assert value(m, "broker_delivered_total", transport="ws") == 2
    assert value(m, "broker_workflows_created_total") == 3
    assert value(m, "broker_workflows") == 3
    assert value(m, "broker_audit_events_total", action="connection.opened") == 3
    assert value(m, "broker_auth_failures_total", kind="token") == 0
    assert value(m, "broker_slow_consumer_closed_total") == 0
    # One wake each for the two live events (the others came before anyone watched).
    assert check_histogram(m, "broker_publish_to_write_seconds") == 2
    assert value(m, "broker_publish_to_write_seconds_sum") < 30
    # No store: no store metrics.
    assert not any(name.startswith("broker_store_") for name, _ in m)
    # Bounded labels: never a workflow id, a user, or a workflow's data.
    for leaked in (wid, other, "barrier", "over http", "live over"):
        assert leaked not in text
    assert {k for (_, ls) in m for k, _ in ls} <= LABELS
    assert all(name.startswith("broker_") for name, _ in m)


async def _closed(client: httpx.AsyncClient) -> bool:
    r = await client.get("/v1/admin/connections")
    return r.json()["connections"] == []


async def test_openmetrics_when_the_scraper_asks_for_it(broker_factory) -> None:
    d = broker_factory()
    with trio.fail_after(20):
        async with client_for(d) as client:
            r = await post_events(client, [ev(uid("om"), "workflow.running")])
            assert r.status_code == 202, r.text
            r = await client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0"), r.headers
    assert r.text.endswith("# EOF\n")
    m = samples(parse_openmetrics(r.text))
    assert value(m, "broker_ingested_total") == 1
    assert value(m, "broker_rejected_total", reason="invalid_json") == 0


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
            _, m = await scrape(client)
    assert set(family(m, "broker_gc_pause_seconds_count")) == {(("generation", g),) for g in "012"}


async def test_store_metrics_with_postgres(pg_dsn: str, broker_factory) -> None:
    d = broker_factory(store={"backend": "postgres", "dsn": pg_dsn})
    wid = uid("stored")
    with trio.fail_after(30):
        async with client_for(d) as client:
            _, before = await scrape(client)
            assert value(before, "broker_store_up") == 1
            assert value(before, "broker_store_written_events_total") == 0
            assert value(before, "broker_durable_commit_seconds_count") == 0
            r = await client.post(
                "/v1/events", params={"durable": "true"}, json=[ev(wid, "workflow.running"), log(wid, "kept")]
            )
            assert r.status_code == 202, r.text
            _, m = await scrape(client)
    assert value(m, "broker_store_up") == 1
    assert value(m, "broker_store_written_events_total") == 2  # committed before the 202
    assert value(m, "broker_store_queue_events") == 0
    assert value(m, "broker_store_queue_bytes") == 0
    assert value(m, "broker_store_failures_total") == 0
    assert value(m, "broker_store_refused_events_total") == 0
    assert value(m, "broker_store_dropped_total") == 0
    batches = value(m, "broker_store_batches_total")
    assert batches >= 1
    assert check_histogram(m, "broker_store_write_seconds") == batches  # each commit observed once
    assert check_histogram(m, "broker_durable_commit_seconds") == 1


# ------------------------------------------------------------------ admin

SECRET = "metrics-test-secret-0123456789abcdef-0123456789abcdef"


def token(sub: str, tenant: str, scope: str) -> dict[str, str]:
    # Made at import, so valid for longer than the whole suite takes.
    body = {"sub": sub, "tenant": tenant, "scope": scope, "aud": "broker", "exp": int(time.time() + 3 * 3600)}
    return {"Authorization": "Bearer " + jwt.encode(body, SECRET, algorithm="HS256")}


ADA = token("ada", "acme", "subscribe")
ENGINE = token("engine", "acme", "publish")
ADMIN = token("root", "ops", "admin")


def iso(text: str) -> float:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text).timestamp()


async def test_admin_connections_show_a_live_sse_stream_with_its_filter_and_cursor(broker_factory) -> None:
    d = broker_factory(
        auth={"mode": "jwt", "secret": SECRET, "audience": "broker", "leeway": 0},
        stream={"unknown_workflow_wait": 10},
    )
    wid, later = uid("admin"), uid("later")

    async def publish(client: httpx.AsyncClient, *events: dict[str, Any]) -> None:
        r = await client.post("/v1/events", content=orjson.dumps(list(events)), headers=ENGINE)
        assert r.status_code == 202 and r.json()["accepted"] == len(events), r.text

    with trio.fail_after(30):
        async with client_for(d) as client:
            # No token needed for /metrics, even with auth on; a bad token is counted.
            assert (await client.get("/metrics")).status_code == 200
            bad = await client.get("/v1/admin/connections", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401
            assert (await client.get("/v1/admin/connections", headers=ADA)).status_code == 403
            _, m = await scrape(client)
            assert value(m, "broker_auth_failures_total", kind="token") == 1

            await publish(client, ev(wid, "workflow.running"), log(wid, "quiet"), log(wid, "loud", "warning"))
            snap = (await client.get(f"/v1/workflows/{wid}", headers=ADA)).json()
            epoch = snap["epoch"]
            assert snap["seq"] == 3
            began = time.time()
            path = wf_path(wid)
            params = {"types": "log,state", "level": "warning"}
            headers = {**ADA, "Last-Event-ID": f"{epoch}:1"}
            async with open_sse(client, path, params=params, headers=headers) as s:
                first = await s.expect()
                assert (first.event, first.id) == ("log", f"{epoch}:3")  # after 1, the warning only
                opened = time.time()

                r = await client.get("/v1/admin/connections", headers=ADMIN)
                assert r.status_code == 200, r.text
                (listed,) = r.json()["connections"]
                detail = (await client.get(f"/v1/admin/connections/{listed['id']}", headers=ADMIN)).json()
                assert _same_but_times(detail, listed)
                assert detail["transport"] == "sse"
                assert detail["principal"] == {"user": "ada", "tenant": "acme"}
                assert detail["remote"] == "127.0.0.1"
                assert detail["path"] == path
                assert began - 1 <= iso(detail["opened"]) <= opened + 1
                assert detail["delivered"] == 1
                assert began - 1 <= iso(detail["last_event"]) <= time.time() + 1
                assert detail["lag"] == 0 and detail["blocked"] == 0 and not detail["slow"]
                assert detail["subscriptions"] == [
                    {
                        "id": None,
                        "workflow": wid,
                        "filter": {
                            "view": "all",
                            "types": ["log", "state"],
                            "tasks": None,
                            "states": None,
                            "level": "warning",
                            "coalesce": False,
                        },
                        "cursor": f"{epoch}:3",
                        "lag": 0,
                        "waiting": False,
                    }
                ]

                # A line below its level: not delivered, but read past (the cursor moves on).
                await publish(client, log(wid, "quiet again"))

                async def cursor_at(want: str) -> bool:
                    r = await client.get(f"/v1/admin/connections/{listed['id']}", headers=ADMIN)
                    return r.json()["subscriptions"][0]["cursor"] == want

                await poll(lambda: cursor_at(f"{epoch}:4"), 10)
                await publish(client, log(wid, "fails", "error"))
                nxt = await s.expect()
                assert (nxt.event, nxt.id) == ("log", f"{epoch}:5")
                detail = (await client.get(f"/v1/admin/connections/{listed['id']}", headers=ADMIN)).json()
                assert detail["delivered"] == 2
                assert detail["subscriptions"][0]["cursor"] == f"{epoch}:5"

            # A stream waiting for its workflow (its response starts once the
            # workflow appears) shows what it waits for.
            got: list[str] = []

            async def wait_for_it() -> None:
                async with open_sse(client, wf_path(later), params={"since": "0"}, headers=ADA) as w:
                    got.append((await w.expect()).event)

            async def waiting() -> list[dict[str, Any]]:
                r = await client.get("/v1/admin/connections", headers=ADMIN)
                return [c for c in r.json()["connections"] if c["path"] == wf_path(later)]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_it)
                (pending,) = await poll(waiting, 10)
                (sub,) = pending["subscriptions"]
                assert (sub["workflow"], sub["cursor"], sub["waiting"], sub["lag"]) == (later, "0", True, 0)
                assert pending["delivered"] == 0 and pending["last_event"] is None
                await publish(client, ev(later, "workflow.running"))
            assert got == ["state"]

            # Unknown ids: the same 404 as any unknown thing.
            missing = await client.get("/v1/admin/connections/999999", headers=ADMIN)
            unknown_wf = await client.get(f"/v1/workflows/{uid('none')}", headers=ADMIN)
            assert missing.status_code == unknown_wf.status_code == 404
            assert missing.headers["content-type"] == "application/json"
            assert missing.json().keys() == unknown_wf.json().keys()
            assert missing.json()["error"]["code"] == "not_found", missing.text
            assert (await client.get("/v1/admin/connections/1", headers=ADA)).status_code == 403
            assert (await client.delete("/v1/admin/connections/999999", headers=ADMIN)).status_code == 404


def _same_but_times(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two views of one connection a moment apart: the same, but for
    `blocked` and `last_event` (wall time from the monotonic clock: it may
    move by a millisecond)."""
    if abs(iso(a["last_event"]) - iso(b["last_event"])) > 0.01:
        return False
    times = {"blocked", "last_event"}
    return {k: v for k, v in a.items() if k not in times} == {k: v for k, v in b.items() if k not in times}


async def test_admin_connections_show_websocket_subscriptions(broker_factory) -> None:
    d = broker_factory()
    wid, tenant_wf = uid("ws-admin"), uid("ws-admin")
    with trio.fail_after(20):
        async with client_for(d) as client:
            r = await post_events(client, [ev(wid, "workflow.running"), ev(tenant_wf, "workflow.running")])
            assert r.status_code == 202, r.text
            async with ws_client(d.ws_url + "/v1/ws") as c:
                await c.send({"op": "subscribe", "sub": "one", "workflow": wid, "filter": {"types": ["log"]}})
                await c.send({"op": "subscribe", "sub": "all", "tenant": "default", "filter": {"coalesce": True}})
                assert (await c.next_sub("one"))["kind"] == "snapshot"
                snapshots = unbatch(await c.next_sub("all"))  # one message: the tenant's two workflows
                assert [s["kind"] for s in snapshots] == ["snapshot", "snapshot"], snapshots
                await post_events(client, log(wid, "hello"))
                got = await c.next_sub("one")
                assert got["kind"] == "log"
                await c.next_sub("all")  # the same log, in the tenant's stream
                r = await client.get("/v1/admin/connections")
                (conn,) = r.json()["connections"]
                detail = (await client.get(f"/v1/admin/connections/{conn['id']}")).json()
    assert detail["transport"] == "ws" and detail["path"] == "/v1/ws"
    assert detail["principal"] == {"user": None, "tenant": None}  # no auth: anonymous
    assert detail["delivered"] == 5  # three snapshots, the log twice
    subs = {s["id"]: s for s in detail["subscriptions"]}
    assert subs["one"]["workflow"] == wid
    assert subs["one"]["filter"]["types"] == ["log"]
    assert subs["one"]["cursor"] == got["cursor"]
    assert subs["all"]["tenant"] == "default"
    assert subs["all"]["filter"]["coalesce"] is True
    assert subs["all"]["cursor"].endswith(".3")  # a journal cursor: after the third entry
    assert all(s["lag"] == 0 and not s["waiting"] for s in subs.values())


async def test_a_paced_stream_behind_shows_its_lag(broker_factory) -> None:
    """limits.events_per_second = 1: after a write of ten events the stream
    pauses for a second, and what comes meanwhile waits unread: its lag,
    in /metrics and in the admin view, until the pause is over."""
    d = broker_factory(limits={"events_per_second": 1})
    wid = uid("paced")
    with trio.fail_after(20):
        async with client_for(d) as client:
            assert (await post_events(client, ev(wid, "workflow.running"))).status_code == 202
            async with open_sse(client, wf_path(wid)) as s:
                assert (await s.expect()).event == "snapshot"
                await post_events(client, [log(wid, f"first {i}") for i in range(10)])
                assert [(await s.expect()).event for _ in range(10)] == ["log"] * 10
                # Paused for a second now: these five wait.
                await post_events(client, [log(wid, f"then {i}") for i in range(5)])
                _, m = await scrape(client)
                (conn,) = (await client.get("/v1/admin/connections")).json()["connections"]
                assert value(m, "broker_lag_events") == 5
                assert conn["lag"] == 5 and conn["subscriptions"][0]["lag"] == 5
                assert conn["subscriptions"][0]["cursor"].endswith(":11")  # the running state and ten logs
                assert [(await s.expect()).event for _ in range(5)] == ["log"] * 5
                _, m = await scrape(client)
                assert value(m, "broker_lag_events") == 0
