"""Shared fixtures: the broker daemon as a real subprocess on free ports.

`broker_factory(**sections)` writes a TOML config (HTTP on port 0, ZMQ on
`tcp://127.0.0.1:*`), starts `python -m broker run`, and waits for its
`ready` log line, which names the ports it actually bound. Teardown sends
SIGTERM and checks the daemon exits 0.

`postgres` (session) is a real, throwaway PostgreSQL server (tests/pg.py);
`pg_dsn` gives each test a fresh, empty database on it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import zmq

if TYPE_CHECKING:  # psycopg (through tests/pg.py) is imported only when a test asks for PostgreSQL
    from .pg import ExternalPg, PgServer

ROOT = Path(__file__).resolve().parent.parent
READY_RE = re.compile(r"ready http=(\S+) zmq=(\S+)")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # also for nan, inf and -inf: TOML spells them the same
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def _limit_open_files(n: int) -> Any:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


class Daemon:
    def __init__(self, config_path: Path, env: dict[str, str] | None = None, nofile: int | None = None) -> None:
        """`nofile`: the daemon's open-file limit (soft and hard)."""
        self.config_path = config_path
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run", "-c", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            preexec_fn=_limit_open_files(nofile) if nofile else None,
        )
        self.http = ""
        self.zmq = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(20):
            self.proc.kill()
            raise RuntimeError("broker did not become ready:\n" + self.output())
        self.url = f"http://{self.http}"
        self.ws_url = f"ws://{self.http}"
        self.port = int(self.http.rsplit(":", 1)[1])
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 2000)
        self._push.connect(self.zmq)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = READY_RE.search(line)
            if m and not self._ready.is_set():
                self.http, self.zmq = m.group(1), m.group(2)
                self._ready.set()
        self._ready.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def push(self, *events: dict[str, Any] | list[dict[str, Any]] | bytes) -> None:
        """Push each argument as one ZMQ message (bytes are sent as they are)."""
        for ev in events:
            self._push.send(ev if isinstance(ev, bytes) else orjson.dumps(ev))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"broker did not exit within {timeout}s:\n{self.output()}") from None
        self._push.close(0)
        self._ctx.term()
        # The reader thread ends at EOF on the daemon's output, which has
        # exited; then the pipe is closed here rather than left to the GC.
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        return self.proc.returncode


BASE_SECTIONS: dict[str, dict[str, Any]] = {
    "node": {"id": "test-node"},
    "ingest": {"zmq_bind": "tcp://127.0.0.1:*"},
    "http": {"bind": "127.0.0.1:0"},
    "stream": {"keepalive": 15, "unknown_workflow_wait": 2},
    "log": {"level": "info"},
    # No data-path probe (its workflow and events would be in every count
    # the tests assert); tests/test_notify.py turns it on.
    "service": {"probe_interval": 0},
}


@pytest.fixture
def broker_factory(tmp_path: Path):
    daemons: list[Daemon] = []

    def start(nofile: int | None = None, **sections: dict[str, Any]) -> Daemon:
        merged = {name: dict(values) for name, values in BASE_SECTIONS.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        cfg = write_config(tmp_path / f"broker-{len(daemons)}.toml", merged)
        d = Daemon(cfg, nofile=nofile)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        if d.proc.poll() is None:
            rc = d.stop()
            assert rc == 0, d.output()
        else:
            d.stop()


@pytest.fixture
def broker(broker_factory) -> Daemon:
    return broker_factory()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> None:
    """For sync setup code only; tests await events instead."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer | ExternalPg]:
    """A real PostgreSQL server for the whole session, started on first use:
    initdb in a temp dir, a free port of 127.0.0.1, Debian's binaries
    (tests/pg.py). Stopped at the end of the session, its directory removed.
    Tests that crash or pause it (`kill9()`, `pause()`) get it back running
    from `pg_dsn`'s teardown; they should still restart it themselves.

    BROKER_TEST_PG_DSN: a libpq URI or conninfo of an existing server (as
    a superuser, or a role with CREATEDB, connected to a maintenance
    database such as `postgres`) to use instead; then this is an
    `ExternalPg`, which cannot be stopped or killed: tests that need that
    check `isinstance(postgres, PgServer)` and skip.
    """
    from .pg import ExternalPg, start_postgres

    dsn = os.environ.get("BROKER_TEST_PG_DSN")
    if dsn:
        yield ExternalPg(dsn)
        return
    # Not pytest's tmp_path: as root the server runs as the postgres user,
    # which cannot enter root's 0700 pytest-of-root directory.
    base = Path(tempfile.mkdtemp(prefix="broker-pg-"))
    try:
        server = start_postgres(base)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


_pg_databases = count(1)


@pytest.fixture
def pg_dsn(postgres: PgServer | ExternalPg) -> Iterator[str]:
    """The conninfo of a new, empty database (`test_<pid>_<n>`) on the
    `postgres` server, dropped after the test (`WITH (FORCE)`, which ends
    the test's leftover connections)."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from .pg import PgServer

    name = f"test_{os.getpid()}_{next(_pg_databases)}"
    postgres.create_database(name)
    yield make_conninfo(postgres.dsn, dbname=name)
    if isinstance(postgres, PgServer) and not postgres.running:
        if postgres.paused:
            postgres.resume()
        else:
            postgres.start()
    with psycopg.connect(postgres.admin_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every browser test is also slow: `-m "not slow"` (the fast loop)
    leaves Chromium out."""
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(pytest.mark.slow)
