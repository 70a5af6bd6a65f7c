"""`broker bench --tiny`: the benchmark itself runs end to end (tiny numbers).

Not a performance test: it checks the bench's plumbing (broker, engines,
subscriber processes, the nginx + nchan reference when it can be installed)
and the behaviour figures that must hold at any scale: nothing lost or
repeated, every reconnecting client resumed at its cursor, every overload
subscriber ended in the workflow's final state. And that the overload
subscriber's checks see what they must (a scripted fake server).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import orjson
import pytest

from broker.bench.worker import overload_script, ovl_subscribe

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_bench_tiny_runs_every_scenario(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "bench", "--tiny", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "machine:" in proc.stdout and "scenario" in proc.stdout
    r = orjson.loads(out.read_bytes())
    assert r["machine"]["cores"] >= 1
    assert r["ingest"]["broker_eps"] > 0 and r["ingest"]["pull_ref_eps"] > 0
    fan = r["fanout"]["broker"]
    assert fan["delivered"] == fan["expected"] and fan["lost"] == 0 and fan["dups"] == 0
    nchan = r["fanout"]["nchan"]
    # The reference either ran, or the bench said plainly why not.
    assert "deliveries_per_s" in nchan or nchan.get("skipped")
    many = r["many"]
    assert many["delivered"] == many["expected"] and many["lost"] == 0
    assert r["idle"]["connections"] > 0 and r["idle"]["kb_per_conn"] > 0
    storm = r["storm"]
    assert storm["resumed_at_cursor"] == storm["clients"] == storm["complete"] == storm["ended"]
    assert storm["lost"] == 0 and storm["dups"] == 0
    # Every row has throughput, latency and memory (DESIGN §14).
    for row in (r["ingest"], fan, r["fanout"]["broker_flat_out"], many, storm):
        assert row["hwm_kb"] > 0
    assert r["ingest"]["pull_ref_hwm_kb"] > 0
    assert storm["resume_p99_ms"] > 0 and storm["deliveries_per_s"] > 0
    if "deliveries_per_s" in nchan:
        assert nchan["rss_kb"] > 0 and nchan["p99_ms"] > 0

    ovl = r["overload"]
    assert ovl["pull_ref_eps"] > 0
    send = ovl["send_ref"]  # the write path's reference: every send() went out, to every socket
    assert send["conns"] == 20 and send["sends"] == 2000 and send["blocked"] == 0 and send["rate"] > 0
    assert send["user_us"] + send["sys_us"] > 0
    steps = ovl["steps"]
    assert [s["rate"] for s in steps] == [100, 400]
    for s in steps:
        assert "error" not in s, s
        assert not s["timed_out"], s["problems"]
        # Correctness holds at any scale: every stream ended completed,
        # nothing lost, repeated or out of order.
        assert s["ended"] == s["ended_ok"] == s["conns"] == s["subscribers"] == 20, s
        assert s["lost"] == s["dups"] == s["disorder"] == s["bad_status"] == 0, s
        assert s["sent"] == s["events"] and s["send_rate"] > 0
        assert s["got"] == s["conns"] * (2 + 4 * s["tasks"])  # every state and log event
        assert s["samples"] > 0 and s["p99_ms"] > 0 and s["delivery_p99_ms"] > 0
        assert s["rss_kb"] > 0 and s["delivered"] > 0
        assert "latency" not in s and "ingest" not in s  # no raw arrays in the JSON
    # The overload summary row and the per-step table, one row per step.
    assert "overload: 10 wf × 2 SSE" in proc.stdout
    table = proc.stdout.split("overload steps:", 1)[1]
    assert "ingest p99" in table and "ended ok" in table
    rows = [line.split() for line in table.splitlines() if line[:1].isdigit()]
    assert [row[0] for row in rows] == ["100", "400"]
    assert all("20/20" in row for row in rows)


# ------------------------------------------- the overload subscriber's checks


def _frame(seq: int, kind: str, **data) -> bytes:
    return f"id: e:{seq}\nevent: {kind}\ndata: ".encode() + orjson.dumps({"kind": kind, "seq": seq, **data}) + b"\n\n"


def _event(seq: int, kind: str, i: int | None) -> bytes:
    t = time.time()
    data = {"t": t} if i is None else {"t": t, "i": i}
    return _frame(seq, kind, data=data, server_ts=int(t * 1000))


# Each script: the writes of one stream; (seq, kind, i) per frame. The
# subscriber compares reads, so every write goes out on its own.
SNAP = [(1, "snapshot", None)]
SCRIPTS = {
    "clean": [SNAP, [(2, "state", 0), (3, "progress", None)], [(4, "log", 1), (5, "state", 2)], [(6, "state", 3)]],
    "lost": [SNAP, [(2, "state", 0)], [(3, "state", 1)], [(5, "state", 3)]],
    "dup": [SNAP, [(2, "state", 0), (3, "state", 1)], [(4, "state", 1), (5, "state", 2), (6, "state", 3)]],
    "disorder": [SNAP, [(2, "state", 0), (4, "state", 1)], [(3, "progress", None)], [(5, "state", 2), (6, "state", 3)]],
    "resync": [SNAP, [(2, "state", 0)], [(4, "resync", None), (5, "state", 2)], [(6, "state", 3)]],
    "tail": [SNAP, [(2, "state", 0), (3, "state", 1), (4, "state", 2)]],
    "failed": [SNAP, [(2, "state", 0), (3, "state", 1), (4, "state", 2), (5, "state", 3)]],
    "noend": [SNAP, [(2, "state", 0)]],
}


def _serve(conn: socket.socket) -> None:
    with conn:
        name = conn.recv(4096).split()[1].rsplit(b"/", 1)[-1].decode()
        conn.sendall(b"HTTP/1.1 200 \r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writes = [[b"retry: 2000\n\n"]]
        for write in SCRIPTS[name]:
            frames = []
            for seq, kind, i in write:
                if kind in ("snapshot", "resync"):
                    frames.append(_frame(seq, kind, state="running", tasks={"a": {"result": {"rows": 3}}}))
                else:
                    frames.append(_event(seq, kind, i))
            writes.append(frames)
        last = SCRIPTS[name][-1][-1][0]
        if name != "noend":
            writes[-1].append(_frame(last, "end", state="failed" if name == "failed" else "completed"))
        for frames in writes:
            body = b"".join(frames)
            conn.sendall(b"%x\r\n%s\r\n" % (len(body), body))
            time.sleep(0.03)
        conn.sendall(b"0\r\n\r\n")


def test_overload_subscriber_sees_loss_duplicates_disorder_and_final_state():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        conns, samples, timed_out = ovl_subscribe("127.0.0.1", port, [f"/x/{n}" for n in SCRIPTS], 3, 20)
    finally:
        srv.close()
    assert not timed_out
    got = {c.path.rsplit("/", 1)[1]: c for c in conns}
    summary = {name: (c.ended, c.final_state, c.got, c.lost, c.dups, c.disorder, c.resyncs) for name, c in got.items()}
    assert summary == {
        "clean": (True, "completed", 4, 0, 0, 0, 0),
        "lost": (True, "completed", 3, 1, 0, 0, 0),
        "dup": (True, "completed", 5, 0, 1, 0, 0),
        "disorder": (True, "completed", 4, 0, 0, 1, 0),
        # The events a resync replaces are not lost.
        "resync": (True, "completed", 3, 0, 0, 0, 1),
        # The stream ended before the last state event came.
        "tail": (True, "completed", 3, 1, 0, 0, 0),
        "failed": (True, "failed", 4, 0, 0, 0, 0),
        "noend": (False, "", 1, 0, 0, 0, 0),
    }
    assert got["noend"].closed
    assert samples.latency and len(samples.delivery) == len(samples.ingest) == len(samples.latency)


def test_overload_script_is_a_realistic_workflow():
    script = overload_script(3)
    types = [fields["type"] for fields, _ in script]
    assert types[0] == "workflow.running" and types[-1] == "workflow.completed"
    assert types.count("task.running") == types.count("task.completed") == 3
    assert types.count("task.progress") == 15 and types.count("log") == 6
    progress = [f["progress"] for f, _ in script if f["type"] == "task.progress"][:5]
    assert progress[0] == 10 and progress[-1] == 100 and progress == sorted(progress)
    assert {f["level"] for f, _ in script if f["type"] == "log"} == {"info", "warning"}
    # "i" counts the state and log events, 0 … n-1; progress has none.
    counted = [i for f, i in script if f["type"] != "task.progress"]
    assert counted == list(range(len(counted))) and counted[-1] == 2 + 4 * 3 - 1
    assert all(i == -1 for f, i in script if f["type"] == "task.progress")
