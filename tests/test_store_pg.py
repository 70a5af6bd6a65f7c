"""The store's statements against a real PostgreSQL (store/pg.py), below
the daemon: a batch written twice (its commit acknowledgement lost) is
stored once; a new incarnation replaces the old one's rows; history seeks
and listings page."""

from __future__ import annotations

import gc
from typing import Any

import orjson
import psycopg
import pytest
import trio

from broker.config import StoreConfig
from broker.core.restore import mark_committed, workflow_rows
from broker.core.spill import SpillQueue
from broker.core.state import BrokerState
from broker.store import pg
from broker.store.writer import StoreRefused, open_store

from .builders import ev


def _state() -> BrokerState:
    st = BrokerState("n1")
    st.spill = SpillQueue(10_000, 1 << 24)
    return st


def _events(conn: psycopg.Connection[Any], wid: str) -> list[tuple[int, str]]:
    rows = conn.execute("SELECT seq, body FROM broker_events WHERE workflow_id = %s ORDER BY seq", (wid,)).fetchall()
    return [(r[0], r[1]) for r in rows]


def _write(conn: psycopg.Connection[Any], st: BrokerState, now: float, *, commit: bool = True) -> list[Any]:
    assert st.spill is not None
    batch = st.spill.peek(len(st.spill))
    rows, saved = workflow_rows(st, batch, now, 1000.0 + now)
    pg.write_batch(conn, pg.copy_rows(batch, 1), rows)
    if commit:
        st.spill.committed(len(batch))
        mark_committed(st, rows, saved, now)
    return batch


def test_a_batch_written_again_is_stored_once(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert pg.migrate(conn) == [1]
        st = _state()
        for i in range(5):
            st.ingest_frame(orjson.dumps(ev("w", "x.tick", data={"i": i})), now=1.0)
        _write(conn, st, 1.0, commit=False)  # committed, but the writer never heard
        st.ingest_frame(orjson.dumps(ev("w", "x.tick", data={"i": 5})), now=2.0)
        batch = _write(conn, st, 2.0)  # the same five again, and one more
        assert len(batch) == 6
        got = _events(conn, "w")
        assert [seq for seq, _ in got] == [1, 2, 3, 4, 5, 6]
        assert [body.encode() for _, body in got] == [e.body for e in batch]


def test_a_new_incarnation_replaces_the_old_ones_rows(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pg.migrate(conn)
        st = _state()
        st.ingest_frame(orjson.dumps(ev("w", "workflow.running", seq=1, data="old")), now=1.0)
        st.ingest_frame(orjson.dumps(ev("w", "workflow.completed", seq=2)), now=1.0)
        _write(conn, st, 1.0)
        st._evict("w")
        st.ingest_frame(orjson.dumps(ev("w", "workflow.running", seq=1, data="new")), now=3.0)
        _write(conn, st, 3.0)
        got = _events(conn, "w")
        assert [seq for seq, _ in got] == [1] and '"new"' in got[0][1]
        head = pg.workflow_head(conn, "w")
        assert head is not None and head[2] == 1 and head[3] is None  # last seq 1, not terminal


def test_history_seeks_and_listings_page(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pg.migrate(conn)
        st = _state()
        for i in range(30):
            st.ingest_frame(orjson.dumps(ev("h", "x.tick", data={"i": i})), now=1.0)
        for k in range(3):
            st.ingest_frame(orjson.dumps(ev(f"c{k}", "workflow.running", parent_id="h", tenant="t1")), now=1.0 + k)
        _write(conn, st, 5.0)
        epoch = st.workflows["h"].epoch
        page = pg.history(conn, "h", epoch, 10, 5)
        assert [e.seq for e in page] == [11, 12, 13, 14, 15]
        assert page[0].fields is not None and page[0].fields[:3] == ("h", epoch, 11)
        assert pg.history(conn, "h", "other", 0, 5) == []
        first = pg.list_workflows(conn, tenant="t1", states=None, parent=None, after=None, limit=2)
        assert [r[0] for r in first] == ["c2", "c1"]
        rest = pg.list_workflows(conn, tenant="t1", states=None, parent=None, after=(first[-1][7], "c1"), limit=2)
        assert [r[0] for r in rest] == ["c0"]
        assert [
            r[0] for r in pg.list_workflows(conn, tenant=None, states=["running"], parent="h", after=None, limit=9)
        ] == ["c2", "c1", "c0"]
        # `active`: every state that is not terminal, whatever its word.
        for wid, etype in (
            ("s-1", "workflow.suspended"),
            ("s-2", "workflow.waiting_for_input"),
            ("s-3", "workflow.failed"),
        ):
            st.ingest_frame(orjson.dumps(ev(wid, etype, tenant="t2")), now=9.0)
        _write(conn, st, 10.0)

        def listed(states: list[str] | None, active: bool) -> list[str]:
            rows = pg.list_workflows(conn, tenant="t2", states=states, parent=None, after=None, limit=9, active=active)
            return sorted(r[0] for r in rows)

        assert listed([], True) == ["s-1", "s-2"]
        assert listed(["failed"], True) == ["s-1", "s-2", "s-3"]
        assert listed(["suspended"], False) == ["s-1"]


async def test_the_restore_leaves_the_collector_as_it_found_it(pg_dsn: str) -> None:
    """open_store turns Python's collector off while it reads and rebuilds
    (a faster restart: docs/benchmarks.md); it is on again after, also
    when the restore fails half-way."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pg.migrate(conn)
        st = _state()
        for i in range(5):
            st.ingest_frame(orjson.dumps(ev("gc-wf", "x.tick", data={"i": i})), now=1.0)
        _write(conn, st, 2.0)
    cfg = StoreConfig(backend="postgres", dsn=pg_dsn)
    assert gc.isenabled()
    with trio.fail_after(30):
        state = BrokerState("n1")
        store = await open_store(cfg, state)
        try:
            assert gc.isenabled()
            assert state.workflows["gc-wf"].snapshot.seq == 5  # restored
        finally:
            store.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE broker_workflows")  # the restore's read fails now
        with pytest.raises(StoreRefused):
            await open_store(cfg, BrokerState("n2"))
    assert gc.isenabled()


def test_retention_keeps_what_a_restore_needs(pg_dsn: str) -> None:
    """Retention prunes by age, but never the events of an active
    workflow after its stored snapshot: the restore rebuilds from them
    (the row and snapshot are written at intervals, so a workflow that
    went quiet has events past them). A terminal workflow's go."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pg.migrate(conn)
        st = _state()
        for i in range(3):
            st.ingest_frame(orjson.dumps(ev("active", "x.tick", data={"i": i})), now=1.0)
        st.ingest_frame(orjson.dumps(ev("done", "workflow.running")), now=1.0)
        st.ingest_frame(orjson.dumps(ev("done", "workflow.completed")), now=1.0)
        _write(conn, st, 1.0)
        for i in range(3, 6):  # the row was written < 1 s ago, the snapshot is not due: both lag
            st.ingest_frame(orjson.dumps(ev("active", "x.tick", data={"i": i})), now=1.5)
        _write(conn, st, 1.5)
        (snapshot_seq,) = conn.execute(
            "SELECT snapshot_seq FROM broker_workflows WHERE workflow_id = 'active'"
        ).fetchone()
        assert snapshot_seq < 6
        while pg.prune(conn, cutoff_ms=10**15, limit=2):  # everything is older than the cutoff
            pass
        assert [seq for seq, _ in _events(conn, "active")] == list(range(snapshot_seq + 1, 7))
        assert _events(conn, "done") == []
        restored = pg.load(conn, now_ms=2000, terminal_ttl=600, ring_events=1024, restore_events=100_000)
        [wf] = [w for w in restored.workflows if w.workflow_id == "active"]
        entries = [e.seq for e in restored.entries if e.workflow_id == "active"]
        assert entries == list(range(snapshot_seq + 1, 7)) and wf.snapshot_seq == snapshot_seq
