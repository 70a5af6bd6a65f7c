"""Regression tests for the review fixes, against the daemon as a real process.

Deep payloads over ZMQ and HTTP, config bounds on the command line, `204`
for a multi stream whose scope has ended, ZMQ MAXMSGSIZE, 503 while
draining, and an admin close of a stream that never runs dry.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import zmq

from .conftest import BASE_SECTIONS, ROOT, Daemon, write_config
from .e2e import (
    client_for,
    get_json,
    module_broker,
    open_sse,
    poll,
    post_events,
    rejected,
    stats,
    uid,
    wf_path,
    zmq_barrier,
)

MAX_FRAME = 65536

daemon = module_broker(ingest={"max_frame_bytes": MAX_FRAME})


def ev(wid: str, etype: str, **fields: Any) -> dict[str, Any]:
    return {"workflow_id": wid, "type": etype, **fields}


def nested_json(depth: int) -> bytes:
    """JSON text `depth` containers deep, built by hand (orjson encodes only ~254 levels)."""
    text = b'"leaf"'
    for i in range(depth):
        text = b'{"k":' + text + b"}" if i % 2 else b"[" + text + b"]"
    return text


def deep_event(wid: str, depth: int) -> bytes:
    return orjson.dumps(ev(wid, "tick"))[:-1] + b',"data":' + nested_json(depth) + b"}"


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def by_reason(rej: dict[str, Any], reason: str) -> int:
    return rej["by_reason"].get(reason, 0)


# ---------------------------------------------------------- 1. deep payloads


async def test_300_level_event_over_zmq_is_rejected_and_the_daemon_keeps_serving(daemon):
    deep, ok, after = uid("deep"), uid("deep64"), uid("after")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            before = await rejected(client)
            daemon.push(deep_event(deep, 300), deep_event(ok, 64), ev(after, "workflow.running"))
            await zmq_barrier(daemon, client)
            assert daemon.proc.poll() is None, "the daemon died:\n" + daemon.output()
            assert (await client.get("/healthz")).status_code == 200
            now = await rejected(client)
            listed = [r for r in now["recent"] if f'"{deep}"' in r["sample"]]
            assert (await client.get(f"/v1/workflows/{deep}")).status_code == 404
            assert (await client.get(f"/v1/workflows/{after}")).status_code == 200
            # 64 levels pass, and stream back as they were sent.
            async with open_sse(client, wf_path(ok), params={"since": "0"}) as s:
                got = await s.expect()
    assert by_reason(now, "invalid_field") == by_reason(before, "invalid_field") + 1
    assert len(listed) == 1 and listed[0]["reason"] == "invalid_field" and listed[0]["source"] == "zmq"
    assert "64" in listed[0]["detail"], listed[0]
    assert got.event == "event" and got.json["data"] == orjson.loads(nested_json(64))


async def test_300_level_event_over_http_is_400_not_500(daemon):
    deep, ok = uid("deep"), uid("deep64")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            r = await post_events(client, deep_event(deep, 300))
            batch = await post_events(client, b"[%s,%s]" % (deep_event(deep, 300), deep_event(ok, 64)))
            ok_status = (await client.get(f"/v1/workflows/{ok}")).status_code
    assert r.status_code == 400, (r.status_code, r.text)
    assert [x["reason"] for x in r.json()["rejected"]] == ["invalid_field"]
    assert batch.status_code == 202, (batch.status_code, batch.text)
    assert ok_status == 200
    assert batch.json()["accepted"] == 1
    assert [(x["index"], x["reason"]) for x in batch.json()["rejected"]] == [(0, "invalid_field")]


# --------------------------------------------- 8d. a scope that has ended: 204


async def test_multi_stream_over_workflows_that_all_ended_answers_204(daemon):
    a, b, c = uid("a"), uid("b"), uid("c")
    with trio.fail_after(15):
        async with client_for(daemon) as client:
            r = await post_events(
                client,
                [
                    ev(a, "workflow.running"),
                    ev(a, "workflow.completed"),
                    ev(b, "workflow.running"),
                    ev(b, "workflow.failed"),
                    ev(c, "workflow.running"),
                ],
            )
            assert r.status_code == 202
            done = await client.get("/v1/stream", params={"workflows": f"{a},{b}"})
            async with open_sse(client, "/v1/stream", params={"workflows": f"{a},{c}"}) as s:
                live_status = s.status
                first = await s.expect()
    assert done.status_code == 204, (done.status_code, done.text)
    assert done.content == b""
    assert live_status == 200 and first.event == "snapshot" and first.json["workflow_id"] == c


# ----------------------------------------------------------- 13. MAXMSGSIZE


def _wait_disconnected(monitor: zmq.Socket, timeout: float) -> bool:
    """Block until the monitored socket reports EVENT_DISCONNECTED (True) or timeout (False)."""
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(int(left * 1000)):
            if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                return True
    return False


async def test_frame_over_max_frame_bytes_is_counted_and_a_huge_one_never_reaches_the_broker(daemon):
    wid = uid("big")
    with trio.fail_after(20):
        async with client_for(daemon) as client:
            before = await rejected(client)
            # A little over the limit (and up to 4x + 64 KiB): received, rejected, counted.
            for size in (MAX_FRAME + 1000, 4 * MAX_FRAME):
                filler = "x" * (size - 60)
                daemon.push(ev(wid, "tick", data=filler))
            await zmq_barrier(daemon, client)
            mid = await rejected(client)
            assert by_reason(mid, "too_large") == by_reason(before, "too_large") + 2
            listed = [r for r in mid["recent"] if f'"{wid}"' in r["sample"]]
            assert [(r["reason"], r["source"]) for r in listed] == [("too_large", "zmq")] * 2
            # Far over it: 20 MB on its own connection. libzmq refuses it after
            # reading its size and drops the peer, before allocating anything.
            mem0 = proc_memory(daemon.proc.pid)
            ctx = zmq.Context()
            push = ctx.socket(zmq.PUSH)
            monitor = push.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            try:
                push.connect(daemon.zmq)
                huge = orjson.dumps(ev(uid("huge"), "tick"))[:-1] + b',"message":"' + b"x" * 20_000_000 + b'"}'
                push.send(huge, copy=False)
                disconnected = await trio.to_thread.run_sync(_wait_disconnected, monitor, 5.0)
            finally:
                push.disable_monitor()
                monitor.close(0)
                push.close(0)
                ctx.term()
            # Ingest still works and the daemon still answers.
            await zmq_barrier(daemon, client)
            after = await rejected(client)
            mem1 = proc_memory(daemon.proc.pid)
            assert (await client.get("/healthz")).status_code == 200
    grew = mem1["VmHWM"] - mem0["VmHWM"]
    # Peak RSS, not RSS: a 20 MB buffer taken and freed again leaves VmRSS
    # where it was, but not VmHWM.
    assert grew < 10_000, f"peak RSS grew by {grew} kB ({mem0} -> {mem1}): the 20 MB frame was read"
    assert mem1["VmRSS"] < mem0["VmRSS"] + 10_000, (mem0, mem1)
    assert by_reason(after, "too_large") == by_reason(mid, "too_large"), "the 20 MB frame reached the broker"
    assert disconnected, "the broker did not drop the peer that sent 20 MB"


# ------------------------------------------------------- 2. config bounds (CLI)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_toml(path: Path, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Path:
    """A config: top-level keys, then these sections merged over free-port binds."""
    merged: dict[str, dict[str, Any]] = {
        "http": {"bind": "127.0.0.1:0"},
        "ingest": {"zmq_bind": "tcp://127.0.0.1:*"},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    lines = [f"{_toml(k)} = {_toml(v)}" for k, v in top.items()]
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines.extend(f"{_toml(k)} = {_toml(v)}" for k, v in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


# (name, top-level keys, sections, the key the error must name)
BAD_CONFIGS: list[tuple[str, dict[str, Any], dict[str, dict[str, Any]], str]] = [
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


def assert_one_line(stderr: str, needle: str) -> None:
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in stderr


async def run_cli(*args: str, timeout: float) -> tuple[int | None, str, str]:
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


@pytest.mark.parametrize("top, sections, needle", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
async def test_check_config_rejects_out_of_range_values_in_one_line(tmp_path: Path, top, sections, needle):
    cfg = write_toml(tmp_path / "bad.toml", top, sections)
    with trio.fail_after(15):
        rc, out, err = await run_cli("check-config", "-c", str(cfg), timeout=10)
    assert rc == 2, (rc, out, err)
    assert_one_line(err, needle)
    assert out == ""


async def test_run_with_an_out_of_range_config_exits_2_at_once(tmp_path: Path):
    """`broker run` for every bad config above, side by side: each must exit 2
    with one line naming the key, and none may hang or start serving."""
    results: dict[str, tuple[int | None, str, str, float]] = {}

    async def one(i: int, name: str, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
        cfg = write_toml(tmp_path / f"bad-{i}.toml", top, sections)
        t0 = time.monotonic()
        rc, out, err = await run_cli("run", "-c", str(cfg), timeout=10)
        results[name] = (rc, out, err, time.monotonic() - t0)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i, (name, top, sections, _) in enumerate(BAD_CONFIGS):
                nursery.start_soon(one, i, name, top, sections)
    failures = []
    for name, _, _, needle in BAD_CONFIGS:
        rc, out, err, took = results[name]
        if rc is None:
            failures.append(f"{name}: still running after {took:.1f}s")
        elif rc != 2 or needle not in err or len(err.strip().splitlines()) != 1 or "ready" in out + err:
            failures.append(f"{name}: exit {rc}, stderr {err.strip()!r}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------- 11. 503 while draining


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


# ---------------------------------------------- 12. admin close of a busy stream


async def test_admin_close_ends_an_sse_stream_while_events_keep_flowing(broker_factory):
    # A paced stream (limits.events_per_second) always has events pending:
    # every pull returns something, so the stream never goes idle while the
    # firehose runs. The close must not wait for a quiet moment.
    d = broker_factory(limits={"events_per_second": 100})
    wid = uid("fire")
    firehose_exited = trio.Event()

    async def firehose(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cmd = [sys.executable, "-m", "tests.firehose", "--endpoint", d.zmq, "--workflow", wid]
        cmd += ["--count", "30000", "--rate", "2000"]
        task_status.started()
        try:
            await trio.run_process(cmd, cwd=ROOT, capture_stdout=True, check=False)
        finally:
            firehose_exited.set()

    with trio.fail_after(20):
        async with client_for(d) as client:
            r = await post_events(client, ev(wid, "workflow.running"))
            assert r.status_code == 202
            async with trio.open_nursery() as nursery:
                async with open_sse(client, wf_path(wid)) as s:
                    assert (await s.expect()).event == "snapshot"
                    await nursery.start(firehose)
                    seen = await s.take(150)  # the firehose is flowing, and paced
                    conns = (await get_json(client, "/v1/admin/connections"))["connections"]
                    mine = [c for c in conns if c["path"] == wf_path(wid)]
                    assert len(mine) == 1, conns
                    r = await client.delete(f"/v1/admin/connections/{mine[0]['id']}")
                    assert r.status_code == 202
                    try:
                        with trio.fail_after(4):
                            rest = await s.rest()
                    except trio.TooSlowError:
                        raise AssertionError("the stream was not closed within 4 s of the admin's DELETE") from None
                    still_flowing = not firehose_exited.is_set()
                nursery.cancel_scope.cancel()
            conns = (await get_json(client, "/v1/admin/connections"))["connections"]
    assert still_flowing, "the firehose ended first: the test proved nothing"
    assert {e.event for e in seen} <= {"event", "resync"} and any(e.event == "event" for e in seen)
    assert "end" not in [e.event for e in rest]
    assert [c for c in conns if c["path"] == wf_path(wid)] == []
