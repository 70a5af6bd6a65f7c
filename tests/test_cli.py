"""The first ten minutes with the command line: `broker push` and
`broker simulate` with no broker or a bad endpoint, `push` checking each
line with the broker's rules, `simulate --help`, `check-config` as TOML
that reads back, `broker run` naming its config. Subprocesses, as a user
runs them; the broker is a daemon subprocess.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import orjson
import trio

from .conftest import ROOT
from .e2e import broker_cli, client_for, module_broker, poll, uid

daemon = module_broker()


def free_endpoint() -> str:
    """A loopback TCP endpoint nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def cli(*args: str, stdin: str = "", timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "broker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    return done, time.monotonic() - began


def test_push_with_no_broker_says_so_and_exits_1() -> None:
    endpoint = free_endpoint()
    done, took = cli("push", "--endpoint", endpoint, "--timeout", "1", stdin='{"workflow_id":"w","type":"x.y"}\n')
    assert done.returncode == 1, done.stderr
    assert f"no broker at {endpoint}" in done.stderr
    assert "Traceback" not in done.stderr
    assert 0.9 <= took < 10, took


def test_simulate_with_no_broker_says_so_and_exits_1() -> None:
    endpoint = free_endpoint()
    done, took = cli("simulate", "--endpoint", endpoint, "--timeout", "1", "--workflows", "1")
    assert done.returncode == 1, done.stderr
    assert f"no broker at {endpoint}" in done.stderr and "Traceback" not in done.stderr
    assert took < 10, took


def test_a_malformed_endpoint_is_one_line_and_exit_2() -> None:
    for command in ("push", "simulate"):
        for endpoint in ("foo", "tcp://nohost", "tcp://127.0.0.1:notaport"):
            done, _ = cli(command, "--endpoint", endpoint, stdin="{}\n")
            assert done.returncode == 2, (command, endpoint, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "bad --endpoint" in lines[0] and endpoint in lines[0], done.stderr


async def test_push_sends_the_good_lines_and_names_the_bad_ones(daemon) -> None:
    wid = uid("push")
    lines = [
        orjson.dumps({"workflow_id": wid, "type": "workflow.running"}).decode(),
        "not json",
        orjson.dumps({"type": "task.running", "task_id": "t"}).decode(),  # no workflow_id
        "",
        orjson.dumps({"workflow_id": wid, "type": "task.running", "task_id": "t"}).decode(),
        orjson.dumps({"workflow_id": wid, "type": "task.progress", "task_id": "t", "progress": 150}).decode(),
        orjson.dumps([{"workflow_id": wid, "type": "log", "level": "info", "message": "a"}]).decode(),
    ]
    done = await trio.to_thread.run_sync(lambda: cli("push", "--endpoint", daemon.zmq, stdin="\n".join(lines) + "\n"))
    proc = done[0]
    assert proc.returncode == 1, proc.stderr  # some lines were refused
    err = proc.stderr
    assert "line 2: invalid_json:" in err
    assert "line 3: " in err and "workflow_id" in err
    assert "line 6: " in err and "progress" in err
    assert "line 1:" not in err and "line 5:" not in err and "line 7:" not in err
    assert "pushed 3 events" in err and "3 lines refused" in err
    with trio.fail_after(10):
        async with client_for(daemon) as client:

            async def arrived() -> dict | None:
                r = await client.get(f"/v1/workflows/{wid}")
                return r.json() if r.status_code == 200 and r.json()["seq"] == 3 else None

            snap = await poll(arrived, 8)
    assert snap["tasks"]["t"]["state"] == "running"


async def test_push_names_a_line_that_is_not_utf8_and_sends_the_rest(daemon) -> None:
    wid = uid("push")
    good = orjson.dumps({"workflow_id": wid, "type": "workflow.running"})
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "broker", "push", "--endpoint", daemon.zmq],
            input=b'\xff\xfe{"a": 1}\n' + good + b"\n",
            capture_output=True,
            cwd=ROOT,
            timeout=30,
        )
    )
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert "line 1: invalid_json:" in err and "pushed 1 events" in err


async def test_push_of_good_lines_exits_0(daemon) -> None:
    wid = uid("push")
    stdin = orjson.dumps({"workflow_id": wid, "type": "workflow.running"}).decode() + "\n"
    proc, _ = await trio.to_thread.run_sync(lambda: cli("push", "--endpoint", daemon.zmq, stdin=stdin))
    assert proc.returncode == 0 and "pushed 1 events" in proc.stderr, proc.stderr


async def test_simulate_runs_shows_progress_and_the_workflows_arrive(daemon) -> None:
    prefix = uid("sim")
    args = ("simulate", "--endpoint", daemon.zmq, "--workflows", "3", "--rate", "0", "--prefix", prefix, "-v")
    proc, _ = await trio.to_thread.run_sync(lambda: cli(*args, "--seed", "7"))
    assert proc.returncode == 0, proc.stderr
    assert "simulate: pushed" in proc.stderr
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=daemon.url) as client:

            async def listed() -> bool:
                r = await client.get("/v1/workflows", params={"limit": "1000"})
                ids = {w["workflow_id"] for w in r.json()["workflows"]}
                return {f"{prefix}-1", f"{prefix}-2", f"{prefix}-3"} <= ids

            await poll(listed, 8)


def test_simulate_help_shows_the_defaults() -> None:
    done, _ = cli("simulate", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "(default: tcp://127.0.0.1:5557)" in text and "(default: 20)" in text and "(default: 0.05)" in text


def test_check_config_prints_toml_that_reads_back(tmp_path: Path) -> None:
    shipped = broker_cli("check-config", "-c", str(ROOT / "broker.toml"))
    assert shipped.returncode == 0, shipped.stderr
    assert shipped.stdout.startswith("# broker check-config: the effective configuration, from ")
    effective = tomllib.loads(shipped.stdout)
    assert effective["http"]["bind"] == "127.0.0.1:8080" and effective["store"]["backend"] == "memory"
    again = tmp_path / "effective.toml"
    again.write_text(shipped.stdout)
    second = broker_cli("check-config", "-c", str(again))
    assert second.returncode == 0, second.stderr
    assert tomllib.loads(second.stdout) == effective
    as_json = broker_cli("check-config", "-c", str(again), "--json")
    assert orjson.loads(as_json.stdout) == effective  # stdout is JSON as it stands
    assert "the effective configuration, from " in as_json.stderr
    defaults = broker_cli("check-config")
    assert "from the built-in defaults" in defaults.stdout.splitlines()[0]


def test_run_names_the_config_it_uses(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text('[http]\nbind = "127.0.0.1:0"\n[ingest]\nzmq_bind = "tcp://127.0.0.1:0"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "run", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    deadline = threading.Timer(20, proc.kill)  # a readline that never returns fails, not hangs
    deadline.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"config: {cfg}" in first, first
    finally:
        deadline.cancel()
        proc.terminate()
        proc.wait(15)
        assert proc.stdout is not None
        proc.stdout.close()
