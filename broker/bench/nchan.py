"""nginx + nchan as the fan-out reference server for `broker bench` (DESIGN §14).

What this module owns:

- `ensure_installed()`: makes Debian's nginx + `libnginx-mod-nchan` available
  (apt-get, non-interactive, only as root) or says in one line why it can't.
- `NchanServer`: a private nginx instance in a temp dir — its own config, pid
  file, error log and temp paths — listening only on 127.0.0.1 on a port it
  picks, with one HTTP publisher location and one EventSource subscriber
  location per channel id.

What it must never do: touch /etc/nginx, /var/log/nginx or the system nginx
service (the one exception nchan forces on us, an empty /var/lib/nginx/body,
is explained at `_nchan_hardwired_temp_dir`); listen on anything but
loopback; outlive the process that started it (context manager exit,
`stop()`, atexit, and a parent-death signal when started from the main
thread).

On the wire (what the bench runner relies on):

- publish: ``POST pub_url(channel)`` with the event as the body (any bytes;
  one request = one message). 201 = stored and at least one subscriber was
  attached, 202 = stored, nobody listening.
- subscribe: ``GET sub_url(channel)`` with ``Accept: text/event-stream``.
  nchan frames each message as ``id: <time>:<tag>`` then one ``data: <line>``
  per body line, then a blank line; see `_main` for a live sample.
- New subscribers start at the newest message (no backlog replay) unless they
  send ``Last-Event-ID``; the per-channel buffer is small on purpose so that
  memory is not what gets benchmarked.

Run ``python -m broker.bench.nchan`` for a self-check (exit 0 ok, 3 = nchan
can't be had here, 1 = it ran but didn't deliver).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import grp
import http.client
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = [
    "DEBIAN_PACKAGES",
    "NchanServer",
    "NchanStartError",
    "NchanStatistics",
    "ensure_installed",
    "find_nginx",
    "find_nchan_module",
]

# `nginx` alone is the binary and provides the nginx-abi-* the module depends
# on; nginx-light/-core/-full are only bundles of extra modules we don't need.
DEBIAN_PACKAGES = ("nginx", "libnginx-mod-nchan")

_NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
_MODULE_CANDIDATES = (
    "/usr/lib/nginx/modules/ngx_nchan_module.so",  # Debian / Ubuntu
    "/usr/share/nginx/modules/ngx_nchan_module.so",
    "/usr/lib64/nginx/modules/ngx_nchan_module.so",
    "/usr/local/nginx/modules/ngx_nchan_module.so",
)

# Compiled-in temp dirs nginx creates at startup unless the config overrides
# them: configure switch that disables the module -> directive to override.
_TEMP_PATH_DIRECTIVES = {
    "client_body_temp_path": None,  # core, always present
    "proxy_temp_path": "--without-http_proxy_module",
    "fastcgi_temp_path": "--without-http_fastcgi_module",
    "uwsgi_temp_path": "--without-http_uwsgi_module",
    "scgi_temp_path": "--without-http_scgi_module",
}

_APT_TIMEOUT = 900.0


class NchanStartError(RuntimeError):
    """nginx did not come up; the message carries the tail of its logs."""


# --------------------------------------------------------------------------
# Finding and installing


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in _NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_nchan_module() -> str | None:
    for candidate in _MODULE_CANDIDATES:
        if os.path.isfile(candidate):
            return candidate
    return None


@functools.lru_cache(maxsize=8)
def _nginx_configure_args(nginx: str) -> str:
    # `nginx -V` prints to stderr.
    proc = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=30)
    return proc.stderr + proc.stdout


def _nchan_hardwired_temp_dir(nginx: str) -> Path | None:
    """The one system path our nginx still creates, if missing.

    nchan 1.3.6 always registers `nchan_message_temp_path` with nginx's
    compiled-in client body temp path (Debian: /var/lib/nginx/body) and
    rejects overriding it in the config ("is duplicate"), so nginx mkdirs it
    at startup, and as root chowns it to the worker user. We run workers as
    Debian's own nginx user so an existing dir keeps its owner, and remove
    the dir again if we were the ones who created it (see NchanServer.stop).
    """
    match = re.search(r"--http-client-body-temp-path=(\S+)", _nginx_configure_args(nginx))
    return Path(match.group(1)) if match else None


def _worker_user() -> str:
    """`user` line for a root master: Debian's nginx user if there is one."""
    for name in ("www-data", "nginx", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        # Name the group explicitly: nginx's default group "nobody" doesn't
        # exist on Debian (it's "nogroup").
        return f"user {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};\n"
    return ""


def _probe() -> str | None:
    """None if nginx can load nchan with a config like ours, else why not."""
    nginx = find_nginx()
    if nginx is None:
        return "nginx binary not found"
    module = find_nchan_module()
    if module is None:
        return "nchan module (ngx_nchan_module.so) not found"
    hardwired = _nchan_hardwired_temp_dir(nginx)
    hardwired_existed = hardwired is None or hardwired.exists()
    with tempfile.TemporaryDirectory(prefix="nchan-probe-") as tmp:
        server = NchanServer(nginx=nginx, module=module, port=_free_loopback_port())
        server._prepare_dir(Path(tmp))
        try:
            proc = subprocess.run(
                server._nginx_argv(test_only=True),
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            if not hardwired_existed:
                _rmdir_quietly(hardwired)
        if proc.returncode != 0:
            detail = _last_meaningful_line(proc.stderr + proc.stdout)
            return f"nginx with {module} fails its config test: {detail}"
    return None


def _rmdir_quietly(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.rmdir()  # only if empty: never delete anything that is in use
    except OSError:
        pass


def _last_meaningful_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "[emerg]" in line or "[alert]" in line or "E:" in line]
    return (errors or lines or ["(no output)"])[-1]


def _apt_candidate(package: str, env: Mapping[str, str]) -> bool:
    proc = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, env=env, timeout=60)
    match = re.search(r"Candidate:\s*(\S+)", proc.stdout)
    return match is not None and match.group(1) != "(none)"


class _NoServiceStarts:
    """Keep dpkg maintainer scripts from starting the *system* nginx.

    Installing the `nginx` package would otherwise start the distribution's
    service on 0.0.0.0:80. A policy-rc.d that answers 101 ("action
    forbidden") is Debian's documented switch for that, honoured by
    invoke-rc.d and deb-systemd-invoke. An existing policy file is the
    administrator's and is left alone; ours is removed again afterwards.
    """

    path = Path("/usr/sbin/policy-rc.d")

    def __init__(self) -> None:
        self.created = False

    def __enter__(self) -> _NoServiceStarts:
        if not self.path.exists():
            try:
                self.path.write_text("#!/bin/sh\n# temporary, from broker.bench.nchan\nexit 101\n")
                self.path.chmod(0o755)
                self.created = True
            except OSError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.created:
            try:
                self.path.unlink()
            except OSError:
                pass


def ensure_installed(*, packages: tuple[str, ...] = DEBIAN_PACKAGES) -> str | None:
    """Make nginx + nchan usable. None on success, else a one-line reason.

    Never raises for "can't install": no root, no apt, no such package,
    a failed or timed-out apt-get all come back as the reason string.
    """
    try:
        reason = _probe()
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"probing nginx failed: {exc}"
    if reason is None:
        return None
    if os.geteuid() != 0:
        if find_nginx() and find_nchan_module():
            return reason  # installed but unusable for us: reinstalling won't help
        return f"{reason}; not root, so not installing (as root: apt-get install {' '.join(packages)})"
    if shutil.which("apt-get") is None or shutil.which("apt-cache") is None:
        return f"{reason}; no apt-get on this machine to install {' '.join(packages)}"

    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", NEEDRESTART_MODE="l")
    try:
        # Refresh the package lists only if they don't know the package yet
        # (fresh container) — or below, if an install from stale lists fails.
        updated = False
        if not all(_apt_candidate(p, env) for p in packages):
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=_APT_TIMEOUT)
            updated = True
            missing = [p for p in packages if not _apt_candidate(p, env)]
            if missing:
                return f"{reason}; Debian package(s) {', '.join(missing)} not available from the configured apt sources"
        argv = [
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            *packages,
        ]
        with _NoServiceStarts():
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=_APT_TIMEOUT)
            if proc.returncode != 0 and not updated:
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=_APT_TIMEOUT)
                proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=_APT_TIMEOUT)
        if proc.returncode != 0:
            detail = _last_meaningful_line(proc.stderr + proc.stdout)
            return f"apt-get install {' '.join(packages)} failed (exit {proc.returncode}): {detail}"
    except subprocess.TimeoutExpired:
        return f"apt-get install {' '.join(packages)} timed out after {_APT_TIMEOUT:.0f}s"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"apt-get install {' '.join(packages)} failed: {exc}"

    try:
        reason = _probe()
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"probing nginx failed: {exc}"
    if reason is not None:
        return f"installed {' '.join(packages)} but still unusable: {reason}"
    return None


# --------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class NchanStatistics:
    """Parsed `nchan_stub_status` (counts are server-wide, all workers)."""

    published_messages: int
    stored_messages: int
    channels: int
    subscribers: int
    raw: Mapping[str, str] = field(repr=False)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_live_servers: set[NchanServer] = set()
_live_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _live_lock:
        servers = list(_live_servers)
    for server in servers:
        server.stop()


def _parent_death_hook() -> Callable[[], object] | None:
    """A preexec_fn that asks Linux to SIGTERM nginx when we die.

    Prepared in the parent so the child only makes one libc call. Linux ties
    PR_SET_PDEATHSIG to the *thread* that forked, so it is only used when
    start() runs on the main thread (which lives as long as the process).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # parent already gone before prctl took effect
            os._exit(1)

    return hook


class NchanServer:
    """A private nginx + nchan on 127.0.0.1, for one benchmark run.

    Locations (channel ids are URL path segments, percent-encoded):

    - ``POST /pub/<channel>``: publish the request body as one message.
    - ``GET  /sub/<channel>``: EventSource subscriber (send
      ``Accept: text/event-stream``).
    - ``GET  /nchan_status``: nchan stub status, see `statistics()`.
    - ``GET  /health``: 204, used to know that nginx answers.

    Usage::

        with NchanServer() as srv:
            httpx.post(srv.pub_url("wf-1"), content=b'{"i": 0}')
    """

    def __init__(
        self,
        *,
        worker_processes: int = 1,
        worker_connections: int = 16384,
        message_buffer_length: int = 8,
        message_timeout_s: int = 60,
        shared_memory: str = "128M",
        max_body_bytes: int = 1 << 20,
        port: int | None = None,
        startup_timeout_s: float = 15.0,
        nginx: str | None = None,
        module: str | None = None,
    ) -> None:
        if worker_processes < 1:
            raise ValueError("worker_processes must be >= 1")
        self.worker_processes = worker_processes
        self.worker_connections = worker_connections
        self.message_buffer_length = message_buffer_length
        self.message_timeout_s = message_timeout_s
        self.shared_memory = shared_memory
        self.max_body_bytes = max_body_bytes
        self.startup_timeout_s = startup_timeout_s
        self._requested_port = port
        self._nginx = nginx
        self._module = module
        self.port: int = port or 0
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_file: IO[bytes] | None = None
        self._remove_on_stop: Path | None = None
        self._lock = threading.Lock()

    # ---- URLs

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pub_url(self, channel: str) -> str:
        return f"{self.base_url}/pub/{urllib.parse.quote(channel, safe='')}"

    def sub_url(self, channel: str) -> str:
        return f"{self.base_url}/sub/{urllib.parse.quote(channel, safe='')}"

    @property
    def status_url(self) -> str:
        return f"{self.base_url}/nchan_status"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def error_log(self) -> Path | None:
        return self.dir / "error.log" if self.dir is not None else None

    # ---- config

    def _worker_nofile(self) -> int:
        # Each subscriber is one fd in its worker; leave room for the
        # publisher, listeners, logs and nchan's own pipes.
        want = self.worker_connections + 1024
        if os.geteuid() != 0:
            # Without root a worker can't raise its hard limit.
            want = min(want, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        return want

    def render_config(self, root: Path) -> str:
        """The nginx.conf text for this server rooted at `root`."""
        nginx = self._nginx or find_nginx() or "nginx"
        module = self._module or find_nchan_module() or _MODULE_CANDIDATES[0]
        configure = _nginx_configure_args(nginx)
        temp_lines = []
        for directive, disabled_by in _TEMP_PATH_DIRECTIVES.items():
            if disabled_by is None or disabled_by not in configure:
                temp_lines.append(f"    {directive} {root / 'tmp' / directive.split('_temp')[0]};")
        user_line = _worker_user() if os.geteuid() == 0 else ""
        chan_re = r"^/{kind}/(.+)$"  # nginx has already %-decoded the URI
        return f"""\
# Generated by broker.bench.nchan; lives and dies with one benchmark run.
load_module {module};
{user_line}daemon off;
master_process on;
worker_processes {self.worker_processes};
worker_rlimit_nofile {self._worker_nofile()};
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;

events {{
    worker_connections {self.worker_connections};
    multi_accept on;
}}

http {{
    access_log off;
    server_tokens off;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
    client_max_body_size {self.max_body_bytes};
    client_body_buffer_size {self.max_body_bytes};
{chr(10).join(temp_lines)}

    nchan_shared_memory_size {self.shared_memory};

    server {{
        listen 127.0.0.1:{self.port} backlog=4096;

        location ~ "{chan_re.format(kind="pub")}" {{
            nchan_publisher http;
            nchan_channel_id $1;
            nchan_message_buffer_length {self.message_buffer_length};
            nchan_message_timeout {self.message_timeout_s}s;
        }}

        location ~ "{chan_re.format(kind="sub")}" {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_subscriber_first_message newest;
        }}

        location = /nchan_status {{
            nchan_stub_status;
        }}

        location = /health {{
            return 204;
        }}

        location / {{
            return 404;
        }}
    }}
}}
"""

    def _prepare_dir(self, root: Path) -> None:
        self.dir = root  # first, so that stop() removes it whatever fails next
        (root / "tmp").mkdir(exist_ok=True)
        if os.geteuid() == 0:
            # Workers run unprivileged and must reach the temp dirs nginx creates
            # (and chowns) under tmp/; traverse-only for everyone else.
            root.chmod(0o711)
            (root / "tmp").chmod(0o711)
        (root / "nginx.conf").write_text(self.render_config(root))

    def _nginx_argv(self, *, test_only: bool = False) -> list[str]:
        assert self.dir is not None
        nginx = self._nginx or find_nginx()
        if nginx is None:
            raise NchanStartError("nginx binary not found (run ensure_installed() first)")
        # -p/-e keep even the startup error log out of /var/log/nginx.
        argv = [nginx, "-p", f"{self.dir}/", "-e", str(self.dir / "error.log"), "-c", str(self.dir / "nginx.conf")]
        if test_only:
            argv.append("-t")
        return argv

    # ---- lifecycle

    def start(self) -> NchanServer:
        """Write the config, start nginx, return once it answers HTTP."""
        with self._lock:
            if self._proc is not None:
                return self
            if (self._nginx or find_nginx()) is None or (self._module or find_nchan_module()) is None:
                raise NchanStartError("nginx or the nchan module is not installed (call ensure_installed() first)")
            attempts = 1 if self._requested_port else 5
            for attempt in range(attempts):
                self.port = self._requested_port or _free_loopback_port()
                try:
                    self._start_once()
                    return self
                except NchanStartError as exc:
                    # Someone took the port between our probe and nginx's bind.
                    if "Address already in use" not in str(exc) or attempt == attempts - 1:
                        raise
            raise AssertionError("unreachable")

    def _start_once(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="nchan-bench-"))
        try:
            self._prepare_dir(root)
            hardwired = _nchan_hardwired_temp_dir(self._nginx or find_nginx() or "nginx")
            if hardwired is not None and not hardwired.exists():
                self._remove_on_stop = hardwired
            stderr = open(root / "stderr.log", "wb")  # closed in stop()
            self._stderr_file = stderr
            self._proc = subprocess.Popen(
                self._nginx_argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # own process group: stop() can kill master + workers
                preexec_fn=_parent_death_hook(),
                close_fds=True,
            )
            with _live_lock:
                _live_servers.add(self)
            self._wait_ready()
        except NchanStartError as exc:
            tail = self._log_tail()
            self.stop()
            raise NchanStartError(f"nginx + nchan did not start on 127.0.0.1:{self.port}: {exc}: {tail}") from None
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise NchanStartError(f"nginx exited with {self._proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
                try:
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 204:
                        return
                finally:
                    conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NchanStartError(f"nginx did not answer within {self.startup_timeout_s:.0f}s")
            time.sleep(0.02)

    def _log_tail(self, lines: int = 5) -> str:
        if self.dir is None:
            return ""
        text = ""
        for name in ("stderr.log", "error.log"):
            try:
                text += (self.dir / name).read_text(errors="replace")
            except OSError:
                pass
        picked: list[str] = []
        for line in text.splitlines():
            # Drop the "nginx: " (stderr) and "2026/01/01 00:00:00 [emerg]
            # 123#123: " (error.log) prefixes so the same error from both
            # places, and nginx's repeated bind() retries, collapse into one.
            line = re.sub(r"^(?:nginx: |\S+ \S+ )(\[\w+\]) (?:\d+#\d+: )?", r"\1 ", line.strip())
            if line and line not in picked:
                picked.append(line)
        important = [line for line in picked if "[emerg]" in line or "[alert]" in line]
        return " | ".join((important or picked)[-lines:])

    def stop(self) -> None:
        """Stop nginx (master and workers) and remove the temp dir. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # nginx: fast shutdown
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                # Workers that outlived the master, or a master stuck past 5 s.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(timeout=5)
            except (OSError, subprocess.SubprocessError):
                pass
        with _live_lock:
            _live_servers.discard(self)
        if self._stderr_file is not None:
            try:
                self._stderr_file.close()
            except OSError:
                pass
            self._stderr_file = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self._remove_on_stop is not None:
            _rmdir_quietly(self._remove_on_stop)
            self._remove_on_stop = None

    def __enter__(self) -> NchanServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- introspection

    def statistics(self, timeout_s: float = 5.0) -> NchanStatistics:
        """nchan's own counters — e.g. wait until `subscribers` reaches N before publishing."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request("GET", "/nchan_status")
            body = conn.getresponse().read().decode("utf-8", "replace")
        finally:
            conn.close()
        raw: dict[str, str] = {}
        for line in body.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                raw[key.strip()] = value.strip()

        def count(key: str) -> int:
            try:
                return int(raw.get(key, "0"))
            except ValueError:
                return 0

        return NchanStatistics(
            published_messages=count("total published messages"),
            stored_messages=count("stored messages"),
            channels=count("channels"),
            subscribers=count("subscribers"),
            raw=raw,
        )

    def wait_subscribers(self, n: int, timeout_s: float = 30.0) -> NchanStatistics:
        """Poll `statistics()` until at least `n` subscribers are attached."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.statistics()
            if stats.subscribers >= n:
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {stats.subscribers} of {n} nchan subscribers after {timeout_s:.0f}s")
            time.sleep(0.05)

    def __repr__(self) -> str:
        state = f"pid={self.pid} port={self.port}" if self._proc is not None else "stopped"
        return f"<NchanServer {state} workers={self.worker_processes}>"


# --------------------------------------------------------------------------
# Self-check: python -m broker.bench.nchan


def _main() -> int:
    import json

    import httpx

    reason = ensure_installed()
    if reason is not None:
        print(f"nchan unavailable: {reason}", file=sys.stderr)
        return 3

    channel = "selfcheck-wf"
    received: list[str] = []
    connected = threading.Event()
    done = threading.Event()

    with NchanServer() as srv:
        print(f"nginx + nchan on {srv.base_url} (pid {srv.pid}, config in {srv.dir}, loopback only)")
        print(f"publisher:  POST {srv.pub_url(channel)}")
        print(f"subscriber: GET  {srv.sub_url(channel)}  (Accept: text/event-stream)")

        def subscribe() -> None:
            try:
                with httpx.stream(
                    "GET",
                    srv.sub_url(channel),
                    headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"},
                    timeout=httpx.Timeout(10.0),
                ) as resp:
                    received.append(f"# HTTP {resp.status_code} content-type: {resp.headers.get('content-type')}")
                    connected.set()
                    for line in resp.iter_lines():
                        received.append(line)
                        if sum(1 for x in received if x.startswith("data:")) >= 3:
                            break
            except httpx.HTTPError as exc:
                received.append(f"# subscriber error: {exc!r}")
            finally:
                connected.set()
                done.set()

        thread = threading.Thread(target=subscribe, daemon=True)
        thread.start()
        connected.wait(10)
        try:
            srv.wait_subscribers(1, timeout_s=10)
        except TimeoutError as exc:
            print(f"subscriber did not attach: {exc}")
        with httpx.Client(timeout=10.0) as client:
            for i in range(3):
                body = json.dumps({"t": round(time.time(), 3), "i": i}).encode()
                resp = client.post(srv.pub_url(channel), content=body, headers={"Content-Type": "application/json"})
                print(f"POST #{i} -> {resp.status_code}")
        done.wait(10)
        print("subscriber received (raw SSE lines):")
        for line in received:
            print(f"  {line!r}")
        got = sum(1 for x in received if x.startswith("data:"))
    print(f"{'ok' if got == 3 else 'FAILED'}: {got}/3 messages delivered")
    return 0 if got == 3 else 1


if __name__ == "__main__":
    sys.exit(_main())
