"""The PostgreSQL fixtures themselves (tests/pg.py, conftest's `postgres` and `pg_dsn`)."""

from __future__ import annotations

import psycopg
import pytest

from .pg import PgServer

_seen: list[str] = []  # the databases of the tests below, in order


def _own_tables(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
    return [r[0] for r in rows]


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_its_own_empty_database(pg_dsn: str, run: int) -> None:
    with psycopg.connect(pg_dsn) as conn:
        db = conn.execute("SELECT current_database()").fetchone()
        assert db is not None
        assert db[0] not in _seen
        _seen.append(db[0])
        # Empty, though the other run created the same table in its own.
        assert _own_tables(conn) == []
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t VALUES (%s)", (run,))
        assert conn.execute("SELECT n FROM t").fetchall() == [(run,)]


def test_committed_rows_survive_kill9(postgres, pg_dsn: str) -> None:
    if not isinstance(postgres, PgServer):
        pytest.skip("BROKER_TEST_PG_DSN: an external server is not killed")
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
        conn.commit()
        conn.execute("INSERT INTO t VALUES (-1)")  # never committed
        postgres.kill9()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    postgres.start()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*), min(n), max(n) FROM t").fetchone() == (1000, 1, 1000)
