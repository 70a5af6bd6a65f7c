"""The daemon's lifecycle and command line (DESIGN.md §11, §13): graceful
SIGTERM with open streams, check-config, bad configs, ports in use, --version,
and no leak over 10,000 SSE connect/disconnect cycles."""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
import tomllib
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import zmq

import broker

from .builders import ev, log
from .conftest import BASE_SECTIONS, ROOT, Daemon, toml_value, write_config
from .e2e import client_for, open_sse, poll, post_events, stats, uid, wf_path, zmq_barrier


async def run_cli(*args: str, timeout: float = 15) -> tuple[int, str, str]:
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            [sys.executable, "-m", "broker", *args],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def assert_one_line(stderr: str, *needles: str) -> str:
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------- SIGTERM


SHUTDOWN_TIMEOUT = 2


@pytest.fixture
def short_shutdown_daemon(tmp_path: Path):
    """A daemon with shutdown_timeout = 2 (a top-level key, which broker_factory cannot set)."""
    cfg = write_config(tmp_path / "broker.toml", BASE_SECTIONS)
    cfg.write_text(f"shutdown_timeout = {SHUTDOWN_TIMEOUT}\n" + cfg.read_text())
    d = Daemon(cfg)
    yield d
    d.stop()


async def test_sigterm_with_open_streams_delivers_everything_then_closes_without_end(short_shutdown_daemon):
    d = short_shutdown_daemon
    a, b, t = uid("a"), uid("b"), uid("tenant")
    results: dict[str, list] = {}
    with trio.fail_after(20):
        async with client_for(d) as client:
            r = await post_events(client, [ev(a, "workflow.running", tenant=t), ev(b, "workflow.running")])
            assert r.status_code == 202
            streams = {
                "single": (wf_path(a), {}),
                "logs": (wf_path(a, "logs"), {}),
                "tasks": (wf_path(a, "tasks"), {}),
                "multi": ("/v1/stream", {"workflows": f"{a},{b}"}),
                "tenant": ("/v1/stream", {"tenant": t}),
            }
            opened = trio.Event()
            ready = 0

            async def watch(name: str, path: str, params: dict[str, str]) -> None:
                nonlocal ready
                async with open_sse(client, path, params=params) as s:
                    assert s.status == 200
                    first = await s.expect()
                    assert first.event == "snapshot"
                    ready += 1
                    if ready == len(streams):
                        opened.set()
                    results[name] = await s.rest()

            async with trio.open_nursery() as nursery:
                for name, (path, params) in streams.items():
                    nursery.start_soon(watch, name, path, params)
                await opened.wait()
                # Over ZMQ, confirmed ingested; then over HTTP (202 = ingested); then the signal
                # at once, before the subscribers can have read it all.
                d.push(*[log(a, f"zmq {i}") for i in range(50)], *[log(b, f"zmq b {i}") for i in range(20)])
                await zmq_barrier(d, client)
                r = await post_events(
                    client,
                    [log(a, f"http {i}") for i in range(100)]
                    + [ev(a, "task.running", task_id="t-1"), log(b, "last b")],
                )
                assert r.status_code == 202 and r.json()["accepted"] == 102
                t0 = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                rc = await trio.to_thread.run_sync(d.proc.wait, 10)
                exited_after = time.monotonic() - t0
    assert rc == 0, d.output()
    a_lines = [f"zmq {i}" for i in range(50)] + [f"http {i}" for i in range(100)]
    for name in ("single", "logs", "multi", "tenant"):
        got = results[name]
        assert "end" not in [e.event for e in got], name
        messages = [e.json.get("message") for e in got if e.json["workflow_id"] == a and e.event == "log"]
        assert messages == a_lines, name
    assert [e.event for e in results["single"]][-1] == "state"
    assert [e.json.get("task_id") for e in results["tasks"]] == ["t-1"]
    b_lines = [e.json["message"] for e in results["multi"] if e.json["workflow_id"] == b and e.event == "log"]
    assert b_lines == [f"zmq b {i}" for i in range(20)] + ["last b"]
    assert "draining" in d.output() and "stopped" in d.output()
    # DESIGN §11: exit 0 within shutdown_timeout. (Every stream above ended at
    # once; the client still holds an idle keep-alive connection, as browsers do.)
    assert exited_after < SHUTDOWN_TIMEOUT, f"exit took {exited_after:.2f}s, shutdown_timeout is {SHUTDOWN_TIMEOUT}s"


@pytest.mark.slow
async def test_sigterm_exits_within_shutdown_timeout_while_a_client_has_stopped_reading(tmp_path: Path):
    """DESIGN §11: exit within shutdown_timeout, even with an SSE client
    that stopped reading (its socket full, a write blocked in the kernel)
    and a slow-consumer timeout far beyond it: the sockets still open at
    the deadline are cut."""
    sections = {**BASE_SECTIONS, "stream": {**BASE_SECTIONS.get("stream", {}), "slow_consumer_timeout": 20}}
    cfg = write_config(tmp_path / "broker.toml", sections)
    cfg.write_text(f"shutdown_timeout = {SHUTDOWN_TIMEOUT}\n" + cfg.read_text())
    d = Daemon(cfg)
    try:
        wid = uid("stuck")
        with trio.fail_after(40):
            async with client_for(d) as client:
                await post_events(client, ev(wid, "workflow.running"))
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                host, port = d.http.rsplit(":", 1)
                await sock.connect((host, int(port)))
                await sock.send(f"GET {wf_path(wid)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert (await sock.recv(4096)).startswith(b"HTTP/1.1 200")
                # Never read again: a few MB of logs fill both socket buffers.
                big = "x" * 4000
                for _ in range(20):
                    r = await post_events(client, [log(wid, big) for _ in range(100)])
                    assert r.status_code == 202
                await poll(lambda: _write_in_flight(client), 10)
                t0 = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                rc = await trio.to_thread.run_sync(d.proc.wait, 30)
                exited_after = time.monotonic() - t0
                sock.close()
        assert rc == 0, d.output()
        assert exited_after < SHUTDOWN_TIMEOUT + 1.5, f"exit took {exited_after:.2f}s"
    finally:
        d.stop()


async def _write_in_flight(client: httpx.AsyncClient) -> bool:
    """A stream's write is blocked (its client reads nothing)."""
    conns = (await client.get("/v1/admin/connections")).json()["connections"]
    return any(c["blocked"] > 0 for c in conns)


async def test_sigterm_applies_and_delivers_what_ingest_had_read(short_shutdown_daemon):
    """DESIGN §11: stop ingest, deliver what is buffered. Four ZMQ frames
    of 2,500 events each, SIGTERM at once: what the ingest had read (or its
    socket held) is applied whole and streamed before the stream closes,
    nothing half-applied."""
    d = short_shutdown_daemon
    wid = uid("held")
    frames, per = 4, 2500
    with trio.fail_after(30):
        async with client_for(d) as client:
            await post_events(client, ev(wid, "workflow.running"))
            async with open_sse(client, wf_path(wid, "logs")) as s:
                assert (await s.expect()).event == "snapshot"
                for f in range(frames):
                    d.push([log(wid, f"{f}.{i}") for i in range(per)])
                await trio.sleep(0.05)  # in the broker's socket, or being applied
                d.proc.send_signal(signal.SIGTERM)
                got = await s.rest()
            rc = await trio.to_thread.run_sync(d.proc.wait, 10)
    assert rc == 0, d.output()
    lines = [e.json["message"] for e in got if e.event == "log"]
    skipped = sum(e.json["dropped"] for e in got if e.event == "gap")  # a busy stream skips, counted
    assert len(lines) + skipped == frames * per, (len(lines), skipped, d.output()[-2000:])
    last = got[-1].json
    assert last.get("to", last["seq"]) == 1 + frames * per  # up to the last event (a line, or a gap's end)
    assert "not applied" not in d.output()


def _all_threads_stopped(pid: int) -> bool:
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state not in ("T", "t"):
            return False
    return True


async def read_http_response(stream: trio.SocketStream) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection closed before a response; got {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    return status, rest[:length]


async def test_while_draining_unknown_workflow_wait_and_post_answer_503(tmp_path: Path):
    sections = {name: dict(values) for name, values in BASE_SECTIONS.items()}
    sections["stream"]["unknown_workflow_wait"] = 10
    cfg = write_config(tmp_path / "broker.toml", sections)
    cfg.write_text("shutdown_timeout = 1\n" + cfg.read_text())
    d = Daemon(cfg)
    pid = d.proc.pid
    host, port = d.http.rsplit(":", 1)
    body = orjson.dumps(ev(uid("late"), "workflow.running"))
    post = (
        b"POST /v1/events HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    waited: dict[str, Any] = {}
    try:
        with trio.fail_after(20):
            async with client_for(d) as client:
                # A keep-alive connection, already open, for a POST sent during the drain.
                raw = await trio.open_tcp_stream(host, int(port))
                await raw.send_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
                assert (await read_http_response(raw))[0] == 200

                async def wait_for_unknown() -> None:
                    r = await client.get(wf_path(uid("never")))
                    waited["response"], waited["at"] = r, time.monotonic()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_for_unknown)

                    async def request_waits() -> bool:
                        return (await stats(client))["waiters"] >= 1

                    await poll(request_waits, 5)
                    # Freeze the daemon so the POST is already on its socket when
                    # it wakes to the SIGTERM: the POST is then handled while draining.
                    os.kill(pid, signal.SIGSTOP)

                    async def stopped() -> bool:
                        return _all_threads_stopped(pid)

                    await poll(stopped, 5, interval=0.005)
                    await raw.send_all(post)
                    os.kill(pid, signal.SIGTERM)
                    signalled = time.monotonic()
                    os.kill(pid, signal.SIGCONT)
                    post_status, post_body = await read_http_response(raw)
                await raw.aclose()
            rc = await trio.to_thread.run_sync(d.proc.wait, 10)
    finally:
        if d.proc.poll() is None:
            os.kill(pid, signal.SIGCONT)
        d.stop()
    r = waited["response"]
    assert (r.status_code, post_status) == (503, 503), (
        f"stream: {r.status_code} {r.text}; POST: {post_status} {post_body!r}"
    )
    assert r.json()["error"]["code"] == "unavailable"
    assert waited["at"] - signalled < 5, "the waiting request was not answered at the start of the drain"
    assert orjson.loads(post_body)["error"]["code"] == "unavailable"
    assert rc == 0, d.output()


# ------------------------------------------------------------- command line


async def test_version():
    rc, out, err = await run_cli("--version")
    assert rc == 0, err
    assert out.strip() == f"broker {broker.__version__}"


async def test_check_config_prints_the_effective_config(tmp_path: Path):
    cfg = tmp_path / "b.toml"
    cfg.write_text(
        "shutdown_timeout = 2.5\n"
        '[node]\nid = "node-x"\n'
        '[http]\nbind = "127.0.0.1:9999"\ncors_origins = ["https://a.example"]\n'
        "[stream]\nkeepalive = 0.5\n"
        "[order]\nreorder_window_ms = 50\n"
    )
    rc, out, err = await run_cli("check-config", "-c", str(cfg))
    assert rc == 0, err
    conf = tomllib.loads(out)
    assert conf["shutdown_timeout"] == 2.5
    assert conf["node"]["id"] == "node-x"
    assert conf["http"]["bind"] == "127.0.0.1:9999"
    assert conf["http"]["cors_origins"] == ["https://a.example"]
    assert conf["stream"]["keepalive"] == 0.5
    assert conf["order"]["reorder_window_ms"] == 50
    # Defaults of DESIGN.md §13 for what was not given.
    assert conf["stream"]["retry_ms"] == 2000 and conf["stream"]["unknown_workflow_wait"] == 5
    assert conf["stream"]["coalesce_after"] == 256 and conf["stream"]["slow_consumer_timeout"] == 10
    assert conf["ingest"] == {**conf["ingest"], "zmq_bind": "tcp://127.0.0.1:5557", "max_frame_bytes": 1048576}
    assert conf["buffer"] == {
        **conf["buffer"],
        "ring_events": 1024,
        "ring_bytes": 1048576,
        "journal_events": 100000,
        "max_workflows": 100000,
        "terminal_ttl": 600,
    }
    assert conf["order"]["dedup_window"] == 100000
    assert conf["limits"] == {**conf["limits"], "per_user": 5, "per_tenant": 1000, "global": 20000}
    assert conf["auth"]["mode"] == "none" and conf["store"]["backend"] == "memory"
    assert conf["log"] == {**conf["log"], "level": "info", "format": "text"}

    rc, out, err = await run_cli("check-config")
    assert rc == 0, err
    assert tomllib.loads(out)["http"]["bind"] == "127.0.0.1:8080"


BAD_CONFIGS = [
    ("unknown key", "[stream]\nkeepalve = 1\n", "stream.keepalve"),
    ("unknown section", "[streams]\nkeepalive = 1\n", "streams"),
    ("unknown top-level key", "shutdown_timout = 3\n", "shutdown_timout"),
    ("string for a duration", '[stream]\nkeepalive = "fast"\n', "stream.keepalive"),
    ("float for a count", "[buffer]\nring_events = 1.5\n", "buffer.ring_events"),
    ("zero count", "[buffer]\nring_events = 0\n", "buffer.ring_events"),
    ("negative duration", "[stream]\nunknown_workflow_wait = -1\n", "stream.unknown_workflow_wait"),
    ("bool for a number", "[order]\nreorder_window_ms = true\n", "order.reorder_window_ms"),
    ("number for a string", "[node]\nid = 5\n", "node.id"),
    ("string for a list", '[http]\ncors_origins = "*"\n', "http.cors_origins"),
    ("unknown choice", '[log]\nlevel = "loud"\n', "log.level"),
    ("section not a table", "stream = 5\n", "stream"),
    ("bad http.bind", '[http]\nbind = "nonsense"\n', "http.bind"),
    ("bad zmq endpoint", '[ingest]\nzmq_bind = "127.0.0.1:5557"\n', "ingest.zmq_bind"),
    ("bad TOML", "[stream\nkeepalive = 1\n", "TOML"),
    ("duplicate key", "[stream]\nkeepalive = 1\nkeepalive = 2\n", "TOML"),
]

# Key files, read once the config has loaded.
BAD_KEYS = [
    (
        "CURVE key pair unreadable",
        '[ingest]\ncurve_secret_file = "/nonexistent/b.key_secret"\ncurve_clients_dir = "/tmp"\n',
        "ingest.curve_secret_file",
    ),
    (
        "CURVE half set",
        '[control]\nbind = "tcp://127.0.0.1:0"\ncurve_secret_file = "/x"\n',
        "control.curve_clients_dir",
    ),
]


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize(
    "text, needle, loaded",
    [(*c[1:], False) for c in BAD_CONFIGS] + [(*c[1:], True) for c in BAD_KEYS],
    ids=[c[0] for c in BAD_CONFIGS + BAD_KEYS],
)
async def test_bad_config_is_one_line_naming_the_key_and_exit_2(tmp_path: Path, command, text, needle, loaded):
    """check-config and run refuse alike; `loaded`: a key file, checked
    once the config has loaded (run has begun logging to stdout by then)."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    rc, out, err = await run_cli(command, "-c", str(cfg))
    assert rc == 2, (rc, out, err)
    assert_one_line(err, needle)
    assert out == "" or loaded


@pytest.mark.parametrize("command", ["check-config", "run"])
async def test_missing_config_file(tmp_path: Path, command):
    missing = tmp_path / "nope.toml"
    rc, out, err = await run_cli(command, "-c", str(missing))
    assert rc == 2
    assert_one_line(err, str(missing))
    assert out == ""


async def test_http_port_in_use_is_one_line_exit_2_and_nothing_left(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        zmq_port = free_port()
        cfg = tmp_path / "b.toml"
        cfg.write_text(f'[http]\nbind = "127.0.0.1:{port}"\n[ingest]\nzmq_bind = "tcp://127.0.0.1:{zmq_port}"\n')
        rc, out, err = await run_cli("run", "-c", str(cfg))
    assert rc == 2, (out, err)
    assert_one_line(err, "http.bind", str(port), "in use")
    assert "ready" not in out
    # Nothing half-started: the ZMQ port it bound first was released.
    assert port_is_free(zmq_port)


async def test_zmq_port_in_use_is_one_line_exit_2_and_nothing_left(tmp_path: Path):
    ctx = zmq.Context()
    taken = ctx.socket(zmq.PULL)
    taken.setsockopt(zmq.LINGER, 0)
    try:
        taken.bind("tcp://127.0.0.1:*")
        endpoint = taken.getsockopt_string(zmq.LAST_ENDPOINT)
        http_port = free_port()
        cfg = tmp_path / "b.toml"
        cfg.write_text(f'[http]\nbind = "127.0.0.1:{http_port}"\n[ingest]\nzmq_bind = "{endpoint}"\n')
        rc, out, err = await run_cli("run", "-c", str(cfg))
    finally:
        taken.close(0)
        ctx.term()
    assert rc == 2, (out, err)
    assert_one_line(err, "ingest.zmq_bind", endpoint, "in use")
    assert "ready" not in out
    assert port_is_free(http_port)


def write_toml(path: Path, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Path:
    """A config: top-level keys, then these sections merged over free-port binds."""
    merged: dict[str, dict[str, Any]] = {
        "http": {"bind": "127.0.0.1:0"},
        "ingest": {"zmq_bind": "tcp://127.0.0.1:*"},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    lines = [f"{toml_value(k)} = {toml_value(v)}" for k, v in top.items()]
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines.extend(f"{toml_value(k)} = {toml_value(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


# (name, top-level keys, sections, the key the error must name)
OUT_OF_RANGE_CONFIGS: list[tuple[str, dict[str, Any], dict[str, dict[str, Any]], str]] = [
    ("nan duration", {}, {"stream": {"unknown_workflow_wait": math.nan}}, "stream.unknown_workflow_wait"),
    ("inf duration", {}, {"buffer": {"terminal_ttl": math.inf}}, "buffer.terminal_ttl"),
    ("nan top-level duration", {"shutdown_timeout": math.nan}, {}, "shutdown_timeout"),
    ("backlog over 2**31-1", {}, {"http": {"backlog": 2**31}}, "http.backlog"),
    ("rcvhwm over 2**31-1", {}, {"ingest": {"rcvhwm": 2**32}}, "ingest.rcvhwm"),
    ("zero keepalive", {}, {"stream": {"keepalive": 0}}, "stream.keepalive"),
    ("zero slow_consumer_timeout", {}, {"stream": {"slow_consumer_timeout": 0}}, "stream.slow_consumer_timeout"),
    ("zero ws_ping_interval", {}, {"stream": {"ws_ping_interval": 0}}, "stream.ws_ping_interval"),
    ("empty top-level key", {"": 1}, {}, "config key ''"),
    ("peer pub not a string", {}, {"cluster": {"peers": [{"pub": 5}]}}, "cluster.peers[0]"),
    (
        "peer replay not a string",
        {},
        {"cluster": {"peers": [{"pub": "tcp://127.0.0.1:7000", "replay": 7}]}},
        "cluster.peers[0]",
    ),
]


async def run_cli_or_none(*args: str, timeout: float) -> tuple[int | None, str, str]:
    """Run `python -m broker ARGS`; returncode None if it was still running after `timeout`."""
    result: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        proc = await trio.run_process(
            [sys.executable, "-m", "broker", *args], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
        result["proc"] = proc
    if "proc" not in result:
        return None, "", ""
    proc = result["proc"]
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.mark.parametrize(
    "top, sections, needle", [c[1:] for c in OUT_OF_RANGE_CONFIGS], ids=[c[0] for c in OUT_OF_RANGE_CONFIGS]
)
async def test_check_config_rejects_out_of_range_values_in_one_line(tmp_path: Path, top, sections, needle):
    cfg = write_toml(tmp_path / "bad.toml", top, sections)
    with trio.fail_after(15):
        rc, out, err = await run_cli_or_none("check-config", "-c", str(cfg), timeout=10)
    assert rc == 2, (rc, out, err)
    assert_one_line(err, needle)
    assert out == ""


@pytest.mark.slow
async def test_run_with_an_out_of_range_config_exits_2_at_once(tmp_path: Path):
    """`broker run` for every bad config above, side by side: each must exit 2
    with one line naming the key, and none may hang or start serving."""
    results: dict[str, tuple[int | None, str, str, float]] = {}

    async def one(i: int, name: str, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
        cfg = write_toml(tmp_path / f"bad-{i}.toml", top, sections)
        t0 = time.monotonic()
        rc, out, err = await run_cli_or_none("run", "-c", str(cfg), timeout=10)
        results[name] = (rc, out, err, time.monotonic() - t0)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i, (name, top, sections, _) in enumerate(OUT_OF_RANGE_CONFIGS):
                nursery.start_soon(one, i, name, top, sections)
    failures = []
    for name, _, _, needle in OUT_OF_RANGE_CONFIGS:
        rc, out, err, took = results[name]
        if rc is None:
            failures.append(f"{name}: still running after {took:.1f}s")
        elif rc != 2 or needle not in err or len(err.strip().splitlines()) != 1 or "ready" in out + err:
            failures.append(f"{name}: exit {rc}, stderr {err.strip()!r}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------- no leak


def _proc_status(pid: int) -> tuple[int, int]:
    """(RSS in kB, open fds) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


CYCLES = 10_000
CLIENTS = 8


@pytest.mark.slow
async def test_no_leak_after_10000_sse_connect_disconnect_cycles(broker_factory):
    d = broker_factory()
    wid = uid()
    with trio.fail_after(120):
        async with client_for(d) as client:
            r = await post_events(client, ev(wid, "workflow.running"))
            assert r.status_code == 202
            # Warm up, then take the baseline.
            for _ in range(50):
                async with client.stream("GET", wf_path(wid)) as resp, aclosing(resp.aiter_raw()) as chunks:
                    async for _chunk in chunks:
                        break
            await poll(lambda: _idle(client), 10)
            rss0, fds0 = _proc_status(d.proc.pid)

            left = CYCLES
            done = 0
            t0 = time.monotonic()

            async def cycle_worker() -> None:
                nonlocal left, done
                limits = httpx.Limits(max_keepalive_connections=0)
                async with httpx.AsyncClient(base_url=d.url, timeout=10, limits=limits) as c:
                    while left > 0:
                        left -= 1
                        async with c.stream("GET", wf_path(wid)) as resp:
                            assert resp.status_code == 200
                            async with aclosing(resp.aiter_raw()) as chunks:
                                async for chunk in chunks:
                                    assert b"snapshot" in chunk
                                    break
                        done += 1

            async with trio.open_nursery() as nursery:
                for _ in range(CLIENTS):
                    nursery.start_soon(cycle_worker)
            elapsed = time.monotonic() - t0
            assert done == CYCLES
            print(f"\n{CYCLES} SSE connect/disconnect cycles with {CLIENTS} clients in {elapsed:.1f}s")

            final = await poll(lambda: _idle(client), 10)
            assert final["connections"]["total"] == 0 and final["waiters"] == 0
            assert (await client.get("/v1/admin/connections")).json()["connections"] == []
            rss1, fds1 = _proc_status(d.proc.pid)
            assert rss1 - rss0 < 16 * 1024, f"RSS grew by {rss1 - rss0} kB over {CYCLES} cycles"
            assert fds1 <= fds0 + 4, f"open fds {fds0} -> {fds1}"
            # Still serving, and still delivering.
            async with open_sse(client, wf_path(wid)) as s:
                assert (await s.expect()).event == "snapshot"
                await post_events(client, log(wid, "after the storm"))
                assert (await s.expect()).json["message"] == "after the storm"


async def _idle(client: httpx.AsyncClient) -> dict[str, Any] | None:
    st = await stats(client)
    return st if st["connections"]["total"] == 0 and st["waiters"] == 0 else None


async def test_shipped_configs_are_valid():
    for name in ("broker.toml", "config/broker.full.toml"):
        rc, out, err = await run_cli("check-config", "-c", str(ROOT / name))
        assert rc == 0, (name, err)
