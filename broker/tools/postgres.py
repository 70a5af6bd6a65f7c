"""A real, throwaway PostgreSQL server for the tests and `broker bench`
(Debian's binaries).

`start_postgres(base)` runs `initdb` in `base/data`, starts `postgres` on a
free port of 127.0.0.1 (its unix socket in `base/sock`, its log in
`base/postgres.log`), waits until it accepts connections and creates the
database `broker_test`. `PgServer.dsn` is a libpq URI to that database.

The postmaster is started directly as a child of this process (not by
`pg_ctl start`, whose postmaster is reparented to pid 1): after `kill9()`
it is reaped here, so no zombie is left holding the pid in `postmaster.pid`
(in a container, pid 1 often reaps nothing). `stop()` is `pg_ctl stop -m
fast`. `initdb` refuses to run as root: as root, every PostgreSQL program
runs as the `postgres` system user (created by Debian's package) through
`setpriv`, which execs without forking, so the child's pid is the
postmaster's; `base` is then chowned to that user, and its parent
directories must let others through (`tempfile.mkdtemp()` under /tmp does;
pytest's tmp_path, under a 0700 directory of root's, does not).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

DBNAME = "broker_test"
SUPERUSER = "postgres"  # initdb -U: the same name whether run as root or not
RUN_AS = "postgres"  # the system user that runs the server when we are root
READY_TIMEOUT = 30.0
CMD_TIMEOUT = 60.0  # every subprocess call (initdb, pg_ctl) has one

# The test cluster's settings (appended to postgresql.conf).
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "100",
    "shared_buffers": "16MB",
    # fsync off for speed: nothing is forced to disk, which loses data only
    # when the machine itself goes down. kill9() kills processes, not the
    # OS: what was written (to the page cache) survives it, so crash
    # recovery after kill9() is real. synchronous_commit stays at its
    # default (on): a commit returns only once its WAL is written, so what
    # the tests see as committed survives kill9(). full_page_writes guards
    # against torn pages, which likewise only an OS crash can make.
    "fsync": "off",
    "full_page_writes": "off",
    "log_line_prefix": "'%m [%p] '",
}


def find_bindir() -> Path:
    """The directory of `initdb`, `pg_ctl` and `postgres`: the highest
    /usr/lib/postgresql/<version>/bin (Debian's layout), else from PATH."""

    def version(p: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([\d.]+)/bin$", p)
        return tuple(int(x) for x in m.group(1).split(".") if x) if m else ()

    candidates = [p for p in glob.glob("/usr/lib/postgresql/*/bin") if os.access(Path(p, "initdb"), os.X_OK)]
    if candidates:
        return Path(max(candidates, key=version))
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).resolve().parent
    raise RuntimeError(
        "PostgreSQL not found (no initdb in /usr/lib/postgresql/*/bin or on PATH); "
        "scripts/test installs Debian's postgresql package, or: apt-get install postgresql"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    """Running or stopped, not gone and not a zombie."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class PgServer:
    """A throwaway PostgreSQL cluster in `datadir`, listening on 127.0.0.1:`port`."""

    def __init__(self, base: Path, bindir: Path, port: int, settings: dict[str, str] | None = None) -> None:
        self.base = base
        self.bindir = bindir
        self.port = port
        self.settings = settings or {}
        self.datadir = base / "data"
        self.sockdir = base / "sock"
        self.logfile = base / "postgres.log"
        self.dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{DBNAME}"
        # The maintenance database, for CREATE/DROP DATABASE.
        self.admin_dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.as_root = os.geteuid() == 0

    # -- running programs --

    def _argv(self, program: str, *args: str) -> list[str]:
        argv = [str(self.bindir / program), *args]
        if self.as_root:
            return ["setpriv", f"--reuid={RUN_AS}", f"--regid={RUN_AS}", "--init-groups", "--", *argv]
        return argv

    def _run(self, program: str, *args: str, timeout: float = CMD_TIMEOUT) -> None:
        res = subprocess.run(
            self._argv(program, *args),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle --

    def initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            "--auth=trust",  # a test cluster on loopback and a private socket dir
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            settings = {
                **SETTINGS,
                **self.settings,
                "port": str(self.port),
                "unix_socket_directories": f"'{self.sockdir}'",
            }
            conf.write("\n# broker/tools/postgres.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the postmaster on the same datadir and port; return once it
        accepts connections (after crash recovery, following a kill9())."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("postgres is already running")
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                self._argv("postgres", "-D", str(self.datadir)),
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C at the terminal reaches pytest,
                # whose fixture teardown then stops the server.
                start_new_session=True,
            )
        self.paused = False
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:  # not listening yet, or "starting up"
                last = exc
            time.sleep(0.02)
        self._kill_all()
        raise RuntimeError(f"postgres not ready within {timeout}s ({last}):\n{self.log()}")

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self, timeout: float = CMD_TIMEOUT) -> None:
        """Fast shutdown (`pg_ctl stop -m fast`): clients are disconnected,
        the server checkpoints and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused:
            self.resume()
        try:
            args = ["stop", "-D", str(self.datadir), "-m", "fast", "-w", "-t", str(int(timeout))]
            self._run("pg_ctl", *args, timeout=timeout + 5)
            self.proc.wait(timeout)
        except (RuntimeError, subprocess.TimeoutExpired):
            self._kill_all()
            raise

    def kill9(self, timeout: float = 10.0) -> None:
        """SIGKILL the postmaster, as a crash would. Its children notice the
        postmaster's death and exit on their own; this waits for them (and
        SIGKILLs any left after `timeout`), since a new postmaster refuses
        to start while an old backend still holds the shared memory."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("postgres is not running")
        children = _children(self.proc.pid)
        if self.paused:
            # A stopped child would not notice the death: let it run.
            for pid in children:
                _signal(pid, signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(timeout)
        self.paused = False
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in children):
            if time.monotonic() > deadline:
                for pid in children:
                    _signal(pid, signal.SIGKILL)
                break
            time.sleep(0.01)

    def _kill_all(self) -> None:
        """Last resort: SIGKILL the postmaster and its children."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = _children(self.proc.pid)
        self.proc.kill()
        for pid in children:
            _signal(pid, signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP the postmaster and its children: connections hang, as
        with a server that stopped answering."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)
        for pid in _children(self.proc.pid):
            _signal(pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        for pid in _children(self.proc.pid):
            _signal(pid, signal.SIGCONT)
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self.paused


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def start_postgres(base: Path, settings: dict[str, str] | None = None) -> PgServer:
    """initdb a cluster in `base` (an empty directory), start it on a free
    port of 127.0.0.1 and create the database `broker_test`. `settings`
    override SETTINGS (the bench turns fsync on)."""
    bindir = find_bindir()
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam(RUN_AS)  # KeyError: Debian's postgresql package creates this user
        os.chown(base, user.pw_uid, user.pw_gid)
        for parent in base.resolve().parents:
            if not parent.stat().st_mode & 0o001:
                raise RuntimeError(f"{parent} is not searchable by others: the {RUN_AS} user cannot reach {base}")
    for attempt in range(3):
        server = PgServer(base, bindir, free_port(), settings)
        server.initdb()
        server.sockdir.mkdir(mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(server.sockdir, RUN_AS, RUN_AS)
        try:
            server.start()
        except RuntimeError:
            # The free port may have been taken meanwhile: try another one.
            if attempt == 2 or "could not bind" not in server.log():
                raise
            for path in (server.datadir, server.sockdir):
                shutil.rmtree(path, ignore_errors=True)
            server.logfile.unlink()
            continue
        server.create_database(DBNAME)
        return server
    raise AssertionError("unreachable")


class ExternalPg:
    """A server given by BROKER_TEST_PG_DSN: used as it is, never started or
    stopped here (tests that kill or pause the server skip)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.admin_dsn = dsn
        info = conninfo_to_dict(dsn)
        self.port = int(str(info.get("port") or 5432))
        self.datadir: Path | None = None
        self.running = True

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
