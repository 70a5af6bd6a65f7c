"""The PostgreSQL store end to end (DESIGN.md §10): the daemon as a
subprocess on a real, throwaway PostgreSQL (conftest's `postgres` and
`pg_dsn`; tests/pg.py stops, kills and pauses it).

- `broker migrate` and the refusals at start (schema too new, no server);
- a graceful restart keeps every workflow's epoch and seq, its snapshot,
  the bytes a resumed stream replays, the dedup window and the terminal
  workflows within `terminal_ttl`;
- `kill -9` of the broker: a durable publish that got 202 is never lost;
  a non-durable one loses at most its last flush window (the measured loss
  is printed: run with -s);
- PostgreSQL stopped or killed mid-stream: streams go on from memory, the
  spill queue keeps every event (or counts what it cannot) and writes it,
  in order, exactly once, when the server is back;
- durable publish: 503 within `store.durable_timeout` while the database
  is away, 400 for a bad or storeless `durable`;
- after kill -9, seqs a subscriber saw but the store never got are not
  given to new events: the numbering skips them behind a gap.

The database is read directly (psycopg, in a worker thread) to check what
was written. Waits are on conditions: the daemon's stats, /readyz, streams.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import trio

from .builders import ev, log, task
from .conftest import ROOT, Daemon, write_config
from .e2e import client_for, get_json, open_sse, poll, stats, uid, wf_path, zmq_barrier
from .pg import PgServer, free_port
from .sse_client import SseEvent

FLUSH_MS = 50  # the default: what a kill -9 may lose of a non-durable publish
UNCLEAN_SKIP = 1_000_000  # store.spill_events (default): seqs skipped after an unclean stop


def store_section(dsn: str, **overrides: Any) -> dict[str, Any]:
    # statement_timeout 2 s: a call to a stopped server gives up (and the
    # writer retries) within 5 s rather than 21.
    return {"backend": "postgres", "dsn": dsn, "flush_ms": FLUSH_MS, "statement_timeout": 2, **overrides}


def need_server(postgres: Any) -> PgServer:
    if not isinstance(postgres, PgServer):
        pytest.skip("BROKER_TEST_PG_DSN: an external server is not stopped, killed or paused here")
    return postgres


# ----------------------------------------------------------------- helpers


@asynccontextmanager
async def streaming_with_postgres_stopped(client: httpx.AsyncClient, server: PgServer, wid: str) -> AsyncIterator[Any]:
    """A stream of `wid` (started and stored), then PostgreSQL stopped."""
    await post_ok(client, ev(wid, "workflow.running"))
    await wait_written(client)
    async with open_sse(client, wf_path(wid)) as s:
        assert (await s.expect()).event == "snapshot"
        await trio.to_thread.run_sync(server.stop)
        yield s


async def sql(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the test's database (autocommit); its rows."""

    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    return await trio.to_thread.run_sync(run)


async def stored_events(dsn: str, wid: str) -> list[tuple[int, str, str]]:
    """(seq, epoch, body) of a workflow's stored events, in seq order."""
    rows = await sql(dsn, "SELECT seq, epoch, body FROM broker_events WHERE workflow_id = %s ORDER BY seq", (wid,))
    return [(r[0], r[1], r[2]) for r in rows]


async def store_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    return (await stats(client))["store"]


async def wait_store(
    client: httpx.AsyncClient, pred: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """Poll /v1/admin/stats until `pred(stats["store"])`; that store dict."""

    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        last = await store_stats(client)
        if pred(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"store condition not met within {timeout} s; last stats {last}")
        await trio.sleep(0.02)


async def readyz(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/readyz")
    return r.json()


async def wait_written(client: httpx.AsyncClient, timeout: float = 10) -> dict[str, Any]:
    """Until the spill queue is empty: everything accepted so far is committed."""
    return await wait_store(client, lambda s: s["status"] == "up" and s["queued"] == 0, timeout)


async def post_ok(client: httpx.AsyncClient, *events: dict[str, Any], durable: bool = False) -> dict[str, Any]:
    r = await client.post(
        "/v1/events",
        content=orjson.dumps(list(events)),
        params={"durable": "true"} if durable else None,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 202, (r.status_code, r.text)
    return r.json()


def frames(events: list[SseEvent]) -> list[tuple[str | None, str, str]]:
    """What a client received, exactly: (id, event, data) of each SSE event."""
    return [(e.id, e.event, e.data) for e in events]


def seq_of(cursor: str) -> int:
    return int(cursor.rsplit(":", 1)[1])


async def run_cli(*args: str, timeout: float = 30) -> tuple[int, str, str, float]:
    began = time.monotonic()
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            [sys.executable, "-m", "broker", *args], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode(), time.monotonic() - began


def one_line(stderr: str) -> str:
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def restart(broker_factory: Callable[..., Daemon], daemon: Daemon, **sections: Any) -> tuple[Daemon, float]:
    """SIGTERM (exit 0), then a new daemon on the same config; the seconds
    from the signal to the new one's `ready`."""
    began = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0, daemon.output()
    fresh = broker_factory(**sections)
    return fresh, time.monotonic() - began


def kill9(daemon: Daemon) -> None:
    daemon.proc.kill()
    daemon.proc.wait(10)


# ------------------------------------------------------ 1. migrate, refusals


@pytest.mark.slow
async def test_migrate_then_nothing_to_do_then_a_newer_schema_is_refused(tmp_path: Path, pg_dsn: str):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    cfg = write_config(tmp_path / "store.toml", {"store": {"backend": "postgres", "dsn": pg_dsn}})
    unreachable = write_config(
        tmp_path / "unreachable.toml",
        {
            "store": {"backend": "postgres", "dsn": closed},
            "http": {"bind": "127.0.0.1:0"},
            "ingest": {"zmq_bind": "tcp://127.0.0.1:*"},
        },
    )
    found: dict[str, Any] = {}

    async def run_unreachable() -> None:
        found["unreachable"] = await run_cli("run", "-c", str(unreachable))

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            # A store nobody listens for: its bounded wait runs meanwhile.
            nursery.start_soon(run_unreachable)

            rc, out, err, _ = await run_cli("migrate", "-c", str(cfg))
            assert (rc, err) == (0, ""), (out, err)
            assert out.startswith("applied migrations 1"), out
            assert await sql(pg_dsn, "SELECT version FROM broker_migrations") == [(1,)]

            rc, out, err, _ = await run_cli("migrate", "-c", str(cfg))
            assert (rc, err) == (0, ""), (out, err)
            assert "nothing to do" in out, out

            await sql(pg_dsn, "INSERT INTO broker_migrations (version) VALUES (99)")
            rc, out, err, _ = await run_cli("migrate", "-c", str(cfg))
            assert rc == 2, (out, err)
            assert "99" in one_line(err)
            assert out == ""

            run_cfg = write_config(
                tmp_path / "run.toml",
                {
                    "store": {"backend": "postgres", "dsn": pg_dsn},
                    "http": {"bind": "127.0.0.1:0"},
                    "ingest": {"zmq_bind": "tcp://127.0.0.1:*"},
                },
            )
            rc, out, err, _ = await run_cli("run", "-c", str(run_cfg))
            assert rc == 2, (out, err)
            line = one_line(err)
            assert "store" in line and "99" in line, line
            assert "ready" not in out
            # Nothing was changed by the refused broker.
            assert await sql(pg_dsn, "SELECT version FROM broker_migrations ORDER BY 1") == [(1,), (99,)]
            # A schema of the right version that the restore cannot read
            # (a table gone): one line and exit 2 too, not a traceback.
            await sql(pg_dsn, "DELETE FROM broker_migrations WHERE version = 99")
            await sql(pg_dsn, "DROP TABLE broker_workflows")
            rc, out, err, _ = await run_cli("run", "-c", str(run_cfg))
            assert rc == 2, (out, err)
            line = one_line(err)
            assert "store: UndefinedTable" in line and "broker_workflows" in line, line
            assert "Traceback" not in err and "ready" not in out

    rc, out, err, took = found["unreachable"]
    print(f"\n[store] unreachable store: broker run exited {rc} after {took:.2f} s: {err.strip()}")
    assert rc == 2, (out, err)
    line = one_line(err)
    assert "store: cannot connect" in line and "refused" in line, line  # and why
    assert "ready" not in out
    assert took < 20, took


# ------------------------------------------------------ 2. graceful restart

TERMINAL_TTL = 4.0  # the restart (about 1 s) must fit in it with room to spare


@pytest.mark.slow
async def test_graceful_restart_keeps_epochs_seqs_snapshots_cursors_ids_and_recent_terminal(
    pg_dsn: str, broker_factory
):
    sections = {
        "store": store_section(pg_dsn, flush_ms=20),
        "buffer": {"terminal_ttl": TERMINAL_TTL},
        "order": {"reorder_window_ms": 100},
    }
    d = broker_factory(**sections)
    a, b, expired, recent = uid("broker-seq"), uid("engine-seq"), uid("expired"), uid("recent")
    # Broker-sequenced: no progress events (a replay coalesces progress), some with ids.
    a_events = [
        ev(a, "workflow.running"),
        task(a, "t1", "scheduled"),
        task(a, "t1", "running"),
        *[log(a, f"line {i}", id=f"{a}-log-{i}") for i in range(5)],
        task(a, "t1", "completed", result={"rows": 3}),
        ev(a, "x.checkpoint", data={"n": 1}, id=f"{a}-cp"),
    ]
    b_events = [
        {**e, "seq": n}
        for n, e in enumerate(
            [ev(b, "workflow.running"), task(b, "t1", "running"), log(b, "b line"), task(b, "t1", "completed")],
            1,
        )
    ]
    with trio.fail_after(45):
        async with client_for(d) as client:
            await post_ok(client, ev(expired, "workflow.running"), ev(expired, "workflow.completed"))
            await post_ok(client, *a_events)
            d.push(*b_events)  # engine-sequenced over ZMQ
            await zmq_barrier(d, client)
            # The first terminal workflow leaves memory after terminal_ttl …
            await poll(lambda: _gone(client, expired), TERMINAL_TTL + 5)
            # … the second ends just before the restart.
            await post_ok(client, ev(recent, "workflow.running"), ev(recent, "workflow.failed", error={"x": 1}))
            before = {w: await get_json(client, f"/v1/workflows/{w}") for w in (a, b, recent)}
            streams: dict[str, list[SseEvent]] = {}
            for w, n in ((a, len(a_events)), (b, len(b_events))):
                async with open_sse(client, wf_path(w), params={"since": "0"}) as s:
                    streams[w] = await s.take(n)
            await wait_written(client)
        epoch_a = before[a]["epoch"]
        epoch_b = before[b]["epoch"]
        assert [e.id for e in streams[a]] == [f"{epoch_a}:{n}" for n in range(1, len(a_events) + 1)]
        assert [e.id for e in streams[b]] == [f"{epoch_b}:{n}" for n in range(1, len(b_events) + 1)]
        # It was written, so only the TTL keeps it out after the restart.
        assert await sql(pg_dsn, "SELECT terminal_seq FROM broker_workflows WHERE workflow_id = %s", (expired,)) == [
            (2,)
        ]

        d, took = restart(broker_factory, d, **sections)
        async with client_for(d) as client:
            st = await store_stats(client)
            print(f"\n[store] graceful restart: SIGTERM to ready {took:.2f} s; restore {st['restore']}")
            after = {w: await get_json(client, f"/v1/workflows/{w}") for w in (a, b, recent)}
            assert after == before
            assert (await client.get(f"/v1/workflows/{expired}")).status_code == 404
            # The recent terminal workflow is there as it ended: snapshot and `end`.
            async with open_sse(client, wf_path(recent)) as s:
                rest = await s.rest()
            assert [e.event for e in rest] == ["snapshot", "end"] and rest[0].json["state"] == "failed"

            # A cursor taken before the restart: exactly what followed it, byte for byte.
            for w, k in ((a, 3), (b, 1)):
                cursor = streams[w][k - 1].id
                async with open_sse(client, wf_path(w), headers={"Last-Event-ID": cursor}) as s:
                    assert frames(await s.take(len(streams[w]) - k)) == frames(streams[w][k:])
            async with open_sse(client, wf_path(a), params={"since": "0"}) as s:
                assert frames(await s.take(len(a_events))) == frames(streams[a])

            # The next event continues the sequence, in the same epoch.
            async with open_sse(client, wf_path(a), headers={"Last-Event-ID": streams[a][-1].id}) as sa:
                async with open_sse(client, wf_path(b), headers={"Last-Event-ID": streams[b][-1].id}) as sb:
                    await post_ok(client, log(a, "after restart"))
                    d.push({**log(b, "after restart"), "seq": len(b_events) + 1})
                    next_a, next_b = await sa.expect(), await sb.expect()
            assert next_a.id == f"{epoch_a}:{len(a_events) + 1}" and next_a.json["message"] == "after restart"
            assert next_b.id == f"{epoch_b}:{len(b_events) + 1}" and next_b.json["message"] == "after restart"
            # A broker-made id is never one given before the restart.
            assert next_a.json["id"] not in {e.json["id"] for w in (a, b) for e in streams[w]}

            # The dedup window survived: the same id again is a duplicate.
            got = await post_ok(client, log(a, "line 2", id=f"{a}-log-2"), ev(a, "x.checkpoint", id=f"{a}-cp"))
            assert (got["accepted"], got["duplicates"]) == (0, 2), got
            # And an engine seq already used is a duplicate too, not applied again.
            got = await post_ok(client, {**log(b, "stale"), "seq": 2})
            assert (got["accepted"], got["duplicates"]) == (0, 1), got


async def _gone(client: httpx.AsyncClient, wid: str) -> bool:
    return (await client.get(f"/v1/workflows/{wid}")).status_code == 404


# ------------------------------------------------------------ 3. kill -9

BIG_RING = {"ring_events": 50000, "ring_bytes": 64 * 1048576}


@pytest.mark.slow
async def test_kill9_loses_no_durable_publish_and_a_resumed_cursor_gets_exactly_the_suffix(pg_dsn: str, broker_factory):
    # coalesce_after: the subscriber must get every event (no resync
    # should it fall behind on a loaded machine).
    sections = {"store": store_section(pg_dsn), "buffer": BIG_RING, "stream": {"coalesce_after": 1000000}}
    d = broker_factory(**sections)
    wid, barrier = uid("durable"), uid("barrier")
    publishers = 4
    acked: list[list[int]] = [[] for _ in range(publishers)]
    seen: list[SseEvent] = []
    total = trio.Event()  # 600 publishes acked
    some_seen = trio.Event()  # the subscriber has 150 events
    with trio.fail_after(40):
        async with client_for(d) as client:
            await post_ok(client, ev(wid, "workflow.running"), durable=True)

            async def publish(p: int) -> None:
                # One event per request, the next only after the 202.
                async with client_for(d) as own:
                    for i in range(100000):
                        body = [ev(wid, "x.tick", id=f"p{p}-{i}", data={"p": p, "i": i})]
                        try:
                            r = await own.post("/v1/events", params={"durable": "true"}, content=orjson.dumps(body))
                        except httpx.TransportError:
                            return  # the broker is gone
                        assert r.status_code == 202, r.text
                        acked[p].append(i)
                        if sum(map(len, acked)) >= 600:
                            total.set()

            async def subscribe(task_status: trio.TaskStatus[None]) -> None:
                async with client_for(d) as own:
                    async with open_sse(own, wf_path(wid), params={"since": "0"}) as s:
                        task_status.started()
                        try:
                            while (e := await s.next()) is not None:
                                seen.append(e)
                                if len(seen) >= 150:
                                    some_seen.set()
                        except httpx.TransportError:
                            return

            async with trio.open_nursery() as nursery:
                await nursery.start(subscribe)
                began = time.monotonic()
                for p in range(publishers):
                    nursery.start_soon(publish, p)
                await some_seen.wait()
                # A cursor the subscriber had, then proof it was committed:
                # a durable 202 answers only once everything queued before is.
                early = seen[-1].id or ""
                await post_ok(client, ev(barrier, "x.barrier"), durable=True)
                await total.wait()
                acked_at_kill = sum(map(len, acked))
                rate = acked_at_kill / (time.monotonic() - began)
                kill9(d)
        last_seen = seen[-1].id or ""

    d = broker_factory(**sections)
    # The restart after kill -9 adds a gap over the seqs it skips (it may
    # already be written): the events are what the publishers sent.
    rows = [r for r in await stored_events(pg_dsn, wid) if orjson.loads(r[2])["kind"] != "gap"]
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "a gap in the stored seqs"
    stored = [orjson.loads(r[2]) for r in rows[1:]]
    by_publisher: list[list[int]] = [[] for _ in range(publishers)]
    for m in stored:
        by_publisher[m["data"]["p"]].append(m["data"]["i"])
    for p in range(publishers):
        # Every acked event, once, in the order sent; at most the one in
        # flight at the kill beyond them.
        assert by_publisher[p][: len(acked[p])] == acked[p], p
        assert by_publisher[p] == list(range(len(by_publisher[p]))), p
        assert len(by_publisher[p]) - len(acked[p]) in (0, 1), (p, len(by_publisher[p]), len(acked[p]))
    last_stored = rows[-1][0]
    # What the subscriber saw is what is stored, byte for byte (up to the
    # last stored event: it may also have seen events never committed).
    bodies = {r[0]: r[2] for r in rows}
    assert [e.data for e in seen if seq_of(e.id or "") <= last_stored] == [r[2] for r in rows]
    uncommitted_seen = sum(1 for e in seen if seq_of(e.id or "") > last_stored)
    print(
        f"\n[store] kill -9 with durable publish ({publishers} publishers, {rate:.0f} acked/s): {acked_at_kill} "
        f"acked at the kill, {len(rows) - 1} stored, the subscriber had seen {uncommitted_seen} never committed"
    )

    epoch = rows[0][1]
    with trio.fail_after(20):
        async with client_for(d) as client:
            # Resume from a cursor the subscriber had: exactly the stored
            # suffix, then live; the early one is known to be committed, the
            # last one (at the kill) may not be.
            async with open_sse(client, wf_path(wid), headers={"Last-Event-ID": early}) as s_early:
                async with open_sse(client, wf_path(wid), headers={"Last-Event-ID": last_seen}) as s_last:
                    assert seq_of(early) <= last_stored
                    skipped_to = last_stored + UNCLEAN_SKIP
                    for s, cursor in ((s_early, early), (s_last, last_seen)):
                        k = seq_of(cursor)
                        if k <= last_stored:
                            got = await s.take(last_stored - k)
                            assert [e.data for e in got] == [bodies[n] for n in range(k + 1, last_stored + 1)]
                            assert [e.id for e in got] == [f"{epoch}:{n}" for n in range(k + 1, last_stored + 1)]
                        # The seqs that may have been streamed but never
                        # stored (the one it saw beyond the store among
                        # them) are skipped behind a gap, never reused.
                        gap = await s.expect()
                        assert gap.event == "gap" and gap.id == f"{epoch}:{skipped_to}", (gap.id, gap.data)
                        assert (gap.json["from"], gap.json["to"]) == (last_stored + 1, skipped_to)
                    await post_ok(client, ev(wid, "x.after"))
                    for s in (s_early, s_last):
                        nxt = await s.expect()
                        assert nxt.id == f"{epoch}:{skipped_to + 1}" and nxt.json["type"] == "x.after"


async def _true(value: bool) -> bool:
    return value


RATE = 2000  # events per second, pushed in steps of STEP_EVENTS
STEP_EVENTS = 10
ZMQ_ALLOWANCE = 200


@pytest.mark.slow
async def test_kill9_loses_at_most_the_last_flush_window_of_a_non_durable_zmq_publish(pg_dsn: str, broker_factory):
    sections = {"store": store_section(pg_dsn, flush_ms=FLUSH_MS), "buffer": BIG_RING}
    d = broker_factory(**sections)
    wid = uid("zmq")
    sent_at: list[float] = []  # when each event (data.i = its index) was handed to ZMQ
    with trio.fail_after(30):
        async with client_for(d) as client:
            await post_ok(client, ev(wid, "workflow.running"))
            began = trio.current_time()
            kill_after = RATE * 2  # two seconds of a steady stream
            p99: float | None = None
            while len(sent_at) < kill_after:
                step = len(sent_at) // STEP_EVENTS
                await trio.sleep_until(began + step * STEP_EVENTS / RATE)
                if p99 is None and len(sent_at) >= kill_after - RATE // 4:
                    p99 = (await store_stats(client))["commit_ms_p99"]
                n = len(sent_at)
                d.push(*[ev(wid, "x.tick", data={"i": i}) for i in range(n, n + STEP_EVENTS)])
                sent_at.extend([time.monotonic()] * STEP_EVENTS)
            killed_at = time.monotonic()
            kill9(d)

    d = broker_factory(**sections)
    ready_after = time.monotonic() - killed_at
    # (the gap the restart adds over the seqs it skips is not an event sent)
    rows = [r for r in await stored_events(pg_dsn, wid) if orjson.loads(r[2])["kind"] != "gap"]
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "a gap in the stored seqs"
    got = [orjson.loads(r[2])["data"]["i"] for r in rows[1:]]
    # What is stored is what was sent, in order, once: a prefix of it.
    assert got == list(range(len(got)))
    missing = len(sent_at) - len(got)
    # The bound: what was sent in the last flush window plus the time one
    # batch takes to commit (twice its p99 so far, at least 100 ms: a loaded
    # machine), and ZMQ_ALLOWANCE events for the ZMQ pipe and socket buffers
    # (sent, not yet ingested) and the broker's ingest step.
    assert p99 is not None
    window = (FLUSH_MS + max(100.0, 2 * p99)) / 1000
    in_window = sum(1 for t in sent_at if t > killed_at - window)
    bound = in_window + ZMQ_ALLOWANCE
    print(
        f"\n[store] kill -9, non-durable ZMQ at {RATE}/s, flush_ms={FLUSH_MS}: {missing} of {len(sent_at)} "
        f"events lost (bound {bound}: {in_window} sent in the last {window * 1000:.0f} ms + {ZMQ_ALLOWANCE}); "
        f"commit p99 {p99} ms; kill to ready {ready_after:.2f} s"
    )
    assert missing <= bound, (missing, bound)
    with trio.fail_after(10):
        async with client_for(d) as client:
            # The stream goes on from the last stored event: a gap over the
            # seqs the unclean stop skips (never reused), then the new event.
            async with open_sse(client, wf_path(wid), headers={"Last-Event-ID": f"{rows[0][1]}:{len(rows)}"}) as s:
                await post_ok(client, ev(wid, "x.after"))
                gap = await s.expect()
                nxt = await s.expect()
            skipped_to = len(rows) + UNCLEAN_SKIP
            assert gap.event == "gap" and (gap.json["from"], gap.json["to"]) == (len(rows) + 1, skipped_to)
            assert nxt.id == f"{rows[0][1]}:{skipped_to + 1}"
            await wait_written(client)


# ------------------------------------------------- 4. PostgreSQL goes away


def ticks(wid: str, first: int, end: int) -> list[dict[str, Any]]:
    return [ev(wid, "x.tick", data={"i": i}) for i in range(first, end)]


async def check_written_once_in_order(dsn: str, wid: str, count: int) -> None:
    """The workflow's stored events: seqs 1..count+1 (workflow.running, then
    the ticks 0..count-1), each once, in order."""
    rows = await stored_events(dsn, wid)
    assert [r[0] for r in rows] == list(range(1, count + 2))
    ticks_stored = [orjson.loads(r[2])["data"]["i"] for r in rows[1:]]
    assert ticks_stored == list(range(count))
    dup = await sql(dsn, "SELECT count(*) - count(DISTINCT body) FROM broker_events WHERE workflow_id = %s", (wid,))
    assert dup == [(0,)]


async def durable_post(client: httpx.AsyncClient, event: dict[str, Any]) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    r = await client.post("/v1/events", params={"durable": "true"}, content=orjson.dumps(event))
    return r, time.monotonic() - began


DURABLE_TIMEOUT = 1.0
SLACK = 1.0  # seconds beyond store.durable_timeout a 503 may take (a loaded machine)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill9"])
async def test_postgres_away_streams_go_on_then_everything_is_written_once_in_order(
    postgres, pg_dsn: str, broker_factory, how: str
):
    server = need_server(postgres)
    sections = {"store": store_section(pg_dsn, flush_ms=20, durable_timeout=DURABLE_TIMEOUT)}
    d = broker_factory(**sections)
    wid, other = uid(how), uid("durable")
    with trio.fail_after(45):
        async with client_for(d) as client:
            await post_ok(client, ev(wid, "workflow.running"))
            async with open_sse(client, wf_path(wid), params={"since": "0"}) as s:
                assert (await s.expect()).json["type"] == "workflow.running"
                d.push(*ticks(wid, 0, 20))
                await s.take(20)
                await wait_written(client)
                assert (await readyz(client))["store"] == "up"

                await trio.to_thread.run_sync(server.stop if how == "stop" else server.kill9)
                d.push(*ticks(wid, 20, 120))
                live = await s.take(100)  # from memory, the store away
                assert [e.json["data"]["i"] for e in live] == list(range(20, 120))
                await poll(lambda: _store_is(client, "down"), 15)
                assert (await readyz(client))["ready"] is True  # streams still work: still ready
                down = await wait_store(client, lambda st: st["queued"] >= 100, 5)
                d.push(*ticks(wid, 120, 150))
                assert [e.json["data"]["i"] for e in await s.take(30)] == list(range(120, 150))
                grown = await wait_store(client, lambda st: st["queued"] >= down["queued"] + 30, 5)
                assert grown["status"] == "down" and grown["dropped"] == 0

                # A durable publish now: 503 within the durable timeout.
                event = ev(other, "workflow.running", id=f"{other}-1")
                r, took = await durable_post(client, event)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "unavailable", r.text
                assert DURABLE_TIMEOUT - 0.1 <= took <= DURABLE_TIMEOUT + SLACK, took

                started = time.monotonic()
                await trio.to_thread.run_sync(server.start)
                up = await wait_store(client, lambda st: st["status"] == "up" and st["queued"] == 0, 20)
                print(
                    f"\n[store] postgres {how}: {grown['queued']} queued while down; written "
                    f"{time.monotonic() - started:.2f} s after it accepted connections again"
                )
                assert (await readyz(client))["store"] == "up"
                assert up["dropped"] == 0
                # The 503'd event was accepted all the same (only not within
                # the deadline): retried with its id, it is a duplicate.
                r, _ = await durable_post(client, event)
                assert r.status_code == 202 and r.json()["duplicates"] == 1, r.text

    await check_written_once_in_order(pg_dsn, wid, 150)
    assert len(await stored_events(pg_dsn, other)) == 1
    out = d.output()
    assert "store: down" in out and "store: up again" in out


async def _store_is(client: httpx.AsyncClient, status: str) -> bool:
    return (await readyz(client)).get("store") == status


SPILL = 50


async def test_spill_queue_overflow_is_counted_logged_and_the_rest_written(postgres, pg_dsn: str, broker_factory):
    server = need_server(postgres)
    sections = {"store": store_section(pg_dsn, flush_ms=20, spill_events=SPILL, durable_timeout=DURABLE_TIMEOUT)}
    d = broker_factory(**sections)
    wid = uid("spill")
    with trio.fail_after(40):
        async with client_for(d) as client:
            async with streaming_with_postgres_stopped(client, server, wid) as s:
                d.push(*ticks(wid, 0, 200))
                # Every event still reaches the stream (memory) …
                assert [e.json["data"]["i"] for e in await s.take(200)] == list(range(200))
                # … the queue keeps the first SPILL, the rest is counted …
                st = await wait_store(client, lambda st: st["queued"] + st["dropped"] == 200, 5)
                assert (st["queued"], st["dropped"]) == (SPILL, 200 - SPILL), st
                assert (await stats(client))["counters"]["store_dropped"] == 200 - SPILL
                # … and logged.
                await poll(lambda: _true(f"({200 - SPILL} in all)" in d.output()), 10)
                # A durable publish that cannot even be queued: 503 at once.
                r, took = await durable_post(client, ev(wid, "x.durable"))
                assert r.status_code == 503 and "spill queue" in r.json()["error"]["message"], r.text
                assert took < DURABLE_TIMEOUT, took
                await s.expect()  # it was streamed all the same

                await trio.to_thread.run_sync(server.start)
                await wait_written(client, 20)
                d.push(*ticks(wid, 1000, 1010))
                await s.take(10)
                st = await wait_written(client)
                assert st["dropped"] == 200 - SPILL + 1

    rows = await stored_events(pg_dsn, wid)
    stored = [orjson.loads(r[2]).get("data", {}).get("i") for r in rows]
    # workflow.running, the first SPILL ticks, then (after the 151 not
    # stored: 150 ticks and the durable event) the ticks pushed later.
    assert stored == [None, *range(SPILL), *range(1000, 1010)]
    assert [r[0] for r in rows] == [*range(1, SPILL + 2), *range(203, 213)]
    lines = [line for line in d.output().splitlines() if "spill queue full" in line]
    print(f"\n[store] spill overflow log: {lines[-1] if lines else None}")


# ----------------------------------------------------- 5. durable publish


@pytest.mark.slow
async def test_durable_publish_is_503_within_the_timeout_while_postgres_hangs(postgres, pg_dsn: str, broker_factory):
    server = need_server(postgres)
    sections = {"store": store_section(pg_dsn, flush_ms=20, durable_timeout=DURABLE_TIMEOUT)}
    d = broker_factory(**sections)
    wid = uid("paused")
    with trio.fail_after(40):
        async with client_for(d) as client:
            r, took_up = await durable_post(client, ev(wid, "workflow.running", id=f"{wid}-1"))
            assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
            assert len(await stored_events(pg_dsn, wid)) == 1  # a 202 means committed

            server.pause()  # connections hang: no error, no answer
            try:
                event = ev(wid, "x.step", id=f"{wid}-2")
                r, took = await durable_post(client, event)
                assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
                assert DURABLE_TIMEOUT - 0.1 <= took <= DURABLE_TIMEOUT + SLACK, took
                # Concurrent ones share the wait, and each gets its answer in time.
                answers: list[tuple[int, float]] = []

                async def one(n: int) -> None:
                    r, took = await durable_post(client, ev(wid, "x.step", id=f"{wid}-c{n}"))
                    answers.append((r.status_code, took))

                async with trio.open_nursery() as nursery:
                    for n in range(5):
                        nursery.start_soon(one, n)
                assert all(code == 503 and took <= DURABLE_TIMEOUT + SLACK for code, took in answers), answers
            finally:
                server.resume()
            await wait_written(client, 20)
            # Retried after the 503, with the same id: a duplicate, stored once.
            r, _ = await durable_post(client, event)
            assert r.status_code == 202 and r.json()["duplicates"] == 1, r.text
    print(f"\n[store] durable publish: 202 in {took_up * 1000:.1f} ms; 503 after {took:.2f} s while paused")
    ids = [orjson.loads(r[2]).get("id") for r in await stored_events(pg_dsn, wid)]
    assert sorted(ids[2:]) == [f"{wid}-c{n}" for n in range(5)]
    assert ids[:2] == [f"{wid}-1", f"{wid}-2"]


async def test_durable_needs_a_store_and_a_boolean(pg_dsn: str, broker_factory):
    with_store = broker_factory(store=store_section(pg_dsn))
    without = broker_factory()
    wid = uid("durable-arg")
    with trio.fail_after(15):
        async with client_for(without) as client:
            r = await client.post("/v1/events", params={"durable": "true"}, content=orjson.dumps(ev(wid, "x.a")))
            assert r.status_code == 400 and "store" in r.json()["error"]["message"], r.text
            assert r.json()["error"]["code"] == "invalid_argument"
            r = await client.post("/v1/events", params={"durable": "false"}, content=orjson.dumps(ev(wid, "x.a")))
            assert r.status_code == 202, r.text
        async with client_for(with_store) as client:
            for value in ("maybe", "", "TRUE", "yes"):
                r = await client.post("/v1/events", params={"durable": value}, content=orjson.dumps(ev(wid, "x.a")))
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument", (value, r.text)
            # Nothing of the refused requests was ingested.
            assert (await client.get(f"/v1/workflows/{wid}")).status_code == 404
            r = await client.post("/v1/events", params={"durable": "1"}, content=orjson.dumps(ev(wid, "x.a")))
            assert r.status_code == 202, r.text
    assert len(await stored_events(pg_dsn, wid)) == 1


# -------------------------------------------------------- an unclean stop


@pytest.mark.slow
async def test_kill9_with_uncommitted_events_seen_a_resumed_cursor_misses_nothing(
    postgres, pg_dsn: str, broker_factory
):
    server = need_server(postgres)
    sections = {"store": store_section(pg_dsn, flush_ms=20)}
    d = broker_factory(**sections)
    wid = uid("reused")
    with trio.fail_after(40):
        async with client_for(d) as client:
            async with streaming_with_postgres_stopped(client, server, wid) as s:
                d.push(*ticks(wid, 0, 10))
                seen = await s.take(10)  # streamed from memory, not stored
        kill9(d)
        await trio.to_thread.run_sync(server.start)
        d = broker_factory(**sections)
        async with client_for(d) as client:
            d.push(*ticks(wid, 100, 120))
            await zmq_barrier(d, client)
            async with open_sse(client, wf_path(wid), headers={"Last-Event-ID": seen[-1].id}) as s:
                first = await s.expect()
                second = await s.expect()
    # The seqs it saw (never stored) are not reused: a gap over them (and
    # beyond, up to the spill queue's bound), then every new event.
    assert first.event == "gap" and first.json["from"] <= seq_of(seen[0].id or ""), (first.id, first.data)
    assert first.json["to"] >= seq_of(seen[-1].id or ""), (first.id, first.data)
    assert second.json["data"]["i"] == 100, (second.id, second.data)


# ------------------------------------------------------- deep history


DEEP = 50_000


@pytest.mark.slow
async def test_a_resume_50000_events_back_streams_the_store_then_live_exactly_once(pg_dsn: str, broker_factory):
    """A cursor 50,000 events back (the ring holds 1,024): the store's
    entries in order, each once, then the live ring with no gap and no
    duplicate; the history endpoint pages through the same, each once."""
    d = broker_factory(store=store_section(pg_dsn))
    wid = uid("deep")
    with trio.fail_after(120):
        async with client_for(d) as client:
            await post_ok(client, ev(wid, "workflow.running"))
            for first in range(0, DEEP, 5000):
                d.push(*ticks(wid, first, first + 5000))
            await zmq_barrier(d, client)
            await wait_written(client, timeout=60)
            snap = await get_json(client, f"/v1/workflows/{wid}")
            epoch, head = snap["epoch"], snap["seq"]
            assert head == DEEP + 1
            async with open_sse(client, wf_path(wid), headers={"Last-Event-ID": f"{epoch}:1"}) as s:
                got = await s.take(DEEP)
                assert [e.json["data"]["i"] for e in got] == list(range(DEEP))
                assert [e.id for e in got] == [f"{epoch}:{n}" for n in range(2, DEEP + 2)]
                await post_ok(client, ev(wid, "x.after"))
                live = await s.expect()
                assert live.id == f"{epoch}:{DEEP + 2}" and live.json["type"] == "x.after"
            pages, seen, since = 0, [], "0"
            while since is not None:
                r = await client.get(f"/v1/workflows/{wid}/history", params={"since": since, "limit": 1000})
                assert r.status_code == 200, r.text
                body = r.json()
                seen += [m["seq"] for m in body["events"]]
                since, pages = body["next"], pages + 1
            assert seen == list(range(1, DEEP + 3)) and pages >= DEEP // 1000
            st = await stats(client)
            # The part before the ring (1,024) came from the store, 500 at a time.
            assert st["streams"].get("history_pages", 0) >= (DEEP - 1024) // 500


@pytest.mark.slow
async def test_sigterm_waits_shutdown_timeout_not_durable_timeout_for_the_last_writes(pg_dsn: str, tmp_path: Path):
    """DESIGN §11: SIGTERM flushes the store within `shutdown_timeout` (6 s
    here), not the durable publish's `durable_timeout` (1 s): with the
    events table locked for 2.5 s after the signal, every accepted event is
    written, the node marked clean, and the exit is 0."""
    from .conftest import BASE_SECTIONS

    sections = {**BASE_SECTIONS, "store": store_section(pg_dsn, durable_timeout=1)}
    cfg = write_config(tmp_path / "broker.toml", sections)
    cfg.write_text("shutdown_timeout = 6\n" + cfg.read_text())
    d = Daemon(cfg)
    wid = uid("flush")
    try:
        with trio.fail_after(40):
            async with client_for(d) as client:
                await post_ok(client, ev(wid, "workflow.running"))
                await wait_written(client)
                lock = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_dsn))
                try:
                    await trio.to_thread.run_sync(lock.execute, "LOCK TABLE broker_events IN ACCESS EXCLUSIVE MODE")
                    await post_ok(client, *[log(wid, f"late {i}") for i in range(5)])
                    t0 = time.monotonic()
                    d.proc.send_signal(signal.SIGTERM)
                    await trio.sleep(2.5)
                finally:
                    await trio.to_thread.run_sync(lock.close)  # rolls back: the lock goes
                rc = await trio.to_thread.run_sync(d.proc.wait, 20)
                exited_after = time.monotonic() - t0
        assert rc == 0, d.output()
        assert "not written at exit" not in d.output()
        assert 2.5 <= exited_after < 6 + 1.5, exited_after
        assert [r[0] for r in await stored_events(pg_dsn, wid)] == list(range(1, 7))
        assert await sql(pg_dsn, "SELECT clean FROM broker_nodes") == [(True,)]
    finally:
        d.stop()
