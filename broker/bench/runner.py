"""`broker bench`: the DESIGN.md §14 scenarios, end to end, against a real
broker process, each figure beside its reference measured in the same run.

Everything runs as separate processes on this machine, on 127.0.0.1 only:
the broker (`python -m broker run` on a generated config), engines
(`broker.bench.worker push|ovl-push`), subscribers (`broker.bench.worker
sse|idle|ovl-sse`, raw-socket clients, several processes), the bare pyzmq
PULL reference and nginx + nchan (broker/bench/nchan.py). Latency is
publish→receive from the send time each event carries. Runs are bounded in
count and time and stop by themselves.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

READY_RE = re.compile(r"ready http=(\S+) zmq=(\S+)")


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_kb(pid: int, key: str) -> int:
    """A `kB` line of /proc/PID/status: VmRSS (resident now), VmHWM (peak)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pid: int) -> int:
    return proc_kb(pid, "VmRSS")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def mb(kb: Any) -> str:
    return f"{kb / 1024:.1f}" if isinstance(kb, (int, float)) and kb else "n/a"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# How often an ingest scenario asks the broker whether it has it all. Each
# /v1/admin/stats costs the broker ≈ 1 ms of CPU: every 10 ms that took
# ≈ 10 % of the core it was measured on (py-spy); every 50 ms, ≈ 2 %, for
# at most 50 ms of error on the end time (the rate errs low, never high).
STATS_POLL = 0.05


class BenchError(Exception):
    pass


class Broker:
    """The broker as a subprocess on free ports, with a generated config."""

    def __init__(self, workdir: Path, **sections: dict[str, Any]) -> None:
        cfg: dict[str, dict[str, Any]] = {
            "node": {"id": "bench"},
            "ingest": {"zmq_bind": "tcp://127.0.0.1:*", "rcvhwm": 100000},
            "http": {"bind": "127.0.0.1:0", "backlog": 4096},
            "limits": {"global": 50000},
            "log": {"level": "info"},  # the `ready` line is at info
        }
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        path = workdir / f"broker-{time.monotonic_ns()}.toml"
        lines = []
        for name, values in cfg.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in values.items()]
        path.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run", "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        found: list[re.Match[str]] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:  # keep draining, so the pipe never fills
                m = READY_RE.search(line)
                if m and not found:
                    found.append(m)

        threading.Thread(target=read, daemon=True).start()
        try:
            wait_until(lambda: found or self.proc.poll() is not None, 30, "the broker to start")
        except BenchError:
            self.stop()
            raise
        if not found:
            raise BenchError(f"the broker exited with {self.proc.returncode} at start")
        self.http, self.zmq = found[0].group(1), found[0].group(2)
        self.url = f"http://{self.http}"
        self.port = int(self.http.rsplit(":", 1)[1])

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return orjson.loads(r.read())

    def stats(self, timeout: float = 30) -> dict[str, Any]:
        stats: dict[str, Any] = self.get("/v1/admin/stats", timeout)
        return stats

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

    def hwm_kb(self) -> int:
        """Peak RSS of this broker process (each scenario starts a fresh one)."""
        return proc_kb(self.proc.pid, "VmHWM")

    def push(self, events: list[dict[str, Any]]) -> None:
        """Setup events (not measured), sent from this process; waits until ingested."""
        import zmq

        before = self.stats()["counters"].get("ingested", 0)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 10000)
        sock.connect(self.zmq)
        for ev in events:
            sock.send(orjson.dumps(ev))
        sock.close()
        ctx.term()
        want = before + len(events)
        wait_until(lambda: self.stats()["counters"].get("ingested", 0) >= want, 30, "setup events")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _role(proc: subprocess.Popen[str]) -> str:
    args = proc.args
    return str(args[3]) if isinstance(args, list) and len(args) > 3 else "?"


class Workers:
    """Worker processes of one scenario; all killed when the scenario ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[str]] = []
        self._n = 0

    def start(self, role: str, *args: str, out: bool = True, stdin: bool = False) -> tuple[subprocess.Popen[str], Path]:
        self._n += 1
        path = self.workdir / f"{role}-{self._n}.json"
        cmd = [sys.executable, "-m", "broker.bench.worker", role, *args]
        if out:
            cmd += ["--out", str(path)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, text=True
        )
        self.procs.append(proc)
        return proc, path

    @staticmethod
    def wait_ready(proc: subprocess.Popen[str], timeout: float = 120) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = proc.stdout.readline()
        if line.strip() != "ready" or time.monotonic() > deadline:
            raise BenchError(f"worker {_role(proc)} did not get ready: {line!r}")

    @staticmethod
    def result(proc: subprocess.Popen[str], path: Path, timeout: float) -> dict[str, Any]:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BenchError(f"worker {_role(proc)} did not finish in {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise BenchError(f"worker {_role(proc)} exited {proc.returncode}")
        result: dict[str, Any] = orjson.loads(path.read_bytes())
        return result

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def merge_subs(results: list[dict[str, Any]]) -> dict[str, Any]:
    lat: list[float] = []
    for r in results:
        lat.extend(r["latency"])
    keys = ("conns", "delivered", "complete", "ended", "dups", "lost", "bad_status")
    out: dict[str, Any] = {k: sum(r[k] for r in results) for k in keys}
    out["min_per_conn"] = min(r["min_per_conn"] for r in results)
    out["last_rx"] = max(r["last_rx"] for r in results)
    out["p50_ms"] = percentile(lat, 0.50) * 1000
    out["p99_ms"] = percentile(lat, 0.99) * 1000
    out["max_ms"] = max(lat) * 1000 if lat else float("nan")
    out["samples"] = len(lat)
    # p99 of each second of the run (by arrival), seconds with ≥ 100 samples:
    # whether the tail is spread out or a few bad moments.
    by_second: dict[int, list[float]] = {}
    for r in results:
        for sec, value in zip(r.get("latency_at", []), r["latency"], strict=False):
            by_second.setdefault(sec, []).append(value)
    seconds = [(sec, v) for sec, v in sorted(by_second.items()) if len(v) >= 100]
    p99s = [percentile(v, 0.99) * 1000 for _, v in seconds]
    if p99s:
        out["first_second"] = seconds[0][0]  # Unix time of p99_by_second_ms[0]
        out["p99_by_second_ms"] = [round(x, 1) for x in p99s]
        out["p99_worst_second_ms"] = max(p99s)
        out["p99_median_second_ms"] = percentile(p99s, 0.5)
        out["seconds_p99_within_10ms"] = sum(1 for x in p99s if x <= 10)
    return out


# ---------------------------------------------------------------- scenarios


# Seconds subscribers of the fan-out and many-workflows runs keep their
# connections after all have their events (see `_subscribers`); the tiny
# smoke run measures nothing and keeps them less.
LINGER = 2.0


@dataclass
class Scale:
    ingest_events: int
    fanout_subs: int
    fanout_rate: int
    fanout_seconds: float
    flat_events: int
    many_workflows: int
    many_subs_each: int
    many_rate: int
    many_seconds: float
    idle_conns: int
    storm_clients: int
    # overload: the many-workflows load stepped up past saturation
    ovl_rates: tuple[int, ...] = (2000, 5000, 10000, 20000, 40000)
    ovl_seconds: float = 8
    ovl_workflows: int = 1000
    ovl_subs_each: int = 5
    ovl_pull_ref_events: int = 200_000
    ovl_send_ref_sends: int = 100_000
    linger: float = LINGER
    sub_procs: int = 4
    name: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Scale(500_000, 1000, 1000, 30, 20_000, 1000, 5, 5000, 30, 10_000, 1000, name="full")
QUICK = Scale(200_000, 1000, 1000, 8, 5_000, 1000, 5, 5000, 8, 4000, 1000, name="quick")
QUICK.ovl_rates, QUICK.ovl_seconds, QUICK.ovl_send_ref_sends = (2000, 10000, 40000), 4, 50_000
TINY = Scale(2_000, 20, 100, 1.5, 200, 10, 2, 200, 1.5, 40, 20, sub_procs=2, name="tiny")
TINY.ovl_rates, TINY.ovl_seconds, TINY.ovl_workflows, TINY.ovl_subs_each = (100, 400), 1.5, 10, 2
TINY.ovl_pull_ref_events, TINY.ovl_send_ref_sends, TINY.linger = 2_000, 2_000, 0.5


def pull_reference(workdir: Path, n: int) -> dict[str, Any]:
    """A bare pyzmq PULL loop receiving n frames like the broker's: the
    machine's speed today (it varies 3–4× between days)."""
    workers = Workers(workdir)
    try:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        ref, ref_out = workers.start("pull-ref", "--bind", endpoint, "--count", str(n))
        workers.wait_ready(ref)
        push, push_out = workers.start("push", "--endpoint", endpoint, "--count", str(n), "--workflows", "100")
        result = workers.result(ref, ref_out, 300)
        workers.result(push, push_out, 60)
        return result
    finally:
        workers.close()


def send_reference(workdir: Path, conns: int, sends: int, rate: float) -> dict[str, Any]:
    """Bare `send()`s to `conns` loopback sockets (worker.role_send_ref):
    what one write costs the kernel today, the floor of a write pass."""
    workers = Workers(workdir)
    try:
        ref, ref_out = workers.start("send-ref", "--conns", str(conns), "--sends", str(sends), "--rate", str(rate))
        workers.wait_ready(ref)
        return workers.result(ref, ref_out, 60 + sends / rate)
    finally:
        workers.close()


def scenario_ingest(scale: Scale, workdir: Path) -> dict[str, Any]:
    n = scale.ingest_events
    # Reference: a bare pyzmq PULL loop receiving the same frames.
    ref = pull_reference(workdir, n)
    ref_rate = ref["rate"]
    broker = Broker(workdir)
    workers = Workers(workdir)
    try:
        push, push_out = workers.start("push", "--endpoint", broker.zmq, "--count", str(n), "--workflows", "100")
        wait_until(
            lambda: broker.stats()["counters"].get("ingested", 0) >= n,
            300,
            "the broker to ingest it all",
            interval=STATS_POLL,
        )
        done_wall = time.time()
        start_wall = workers.result(push, push_out, 60)["start_wall"]
        # From the engine's first send to the last event in a ring, as the
        # reference counts from its first receive to its last.
        rate = n / (done_wall - start_wall)
        rss, hwm = broker.rss_kb(), broker.hwm_kb()
    finally:
        workers.close()
        broker.stop()
    return {
        "events": n,
        "broker_eps": rate,
        "pull_ref_eps": ref_rate,
        "ratio": rate / ref_rate,
        "rss_kb": rss,
        "hwm_kb": hwm,
        "pull_ref_rss_kb": ref.get("rss_kb", 0),
        "pull_ref_hwm_kb": ref.get("hwm_kb", 0),
    }


def _subscribers(
    workers: Workers,
    url_base: str,
    paths: list[str],
    expect: int,
    duration: float,
    procs: int,
    extra: tuple[str, ...] = (),
    linger: float = 0.0,
) -> list[tuple[subprocess.Popen[str], Path]]:
    """Subscriber processes; with `linger`, each holds its connections that
    long after all of them have what they expect, so no teardown of
    thousands of connections shares the broker with the last deliveries
    of a measured run."""
    chunks = [paths[i::procs] for i in range(procs)]
    started = []
    for k, chunk in enumerate(chunks):
        if not chunk:
            continue
        paths_file = workers.workdir / f"paths-{k}-{time.monotonic_ns()}.txt"
        paths_file.write_text("\n".join(chunk))
        started.append(
            workers.start(
                "sse",
                "--url-base",
                url_base,
                "--paths-file",
                str(paths_file),
                "--expect",
                str(expect),
                "--duration",
                str(duration),
                "--linger",
                str(linger),
                *extra,
            )
        )
    for proc, _ in started:
        workers.wait_ready(proc)
    return started


def _fanout_broker(scale: Scale, workdir: Path, rate: int, count: int) -> dict[str, Any]:
    sections: dict[str, dict[str, Any]] = {}
    if not rate:
        # Flat out, the engine is never slowed (ZMQ PUSH): the whole burst is
        # in the ring before subscribers catch up. Size ring and lag limit to
        # the burst so this measures delivery, not the resync policy (nchan's
        # publisher, by contrast, waits for each message to be delivered).
        sections = {
            "buffer": {
                "ring_events": count + 16,
                "ring_bytes": 1024 * 1048576,
                "total_bytes": 1024 * 1048576,
                "journal_events": count + 16,
                "journal_bytes": 1024 * 1048576,
            },
            "stream": {"coalesce_after": count + 16},
        }
    broker = Broker(workdir, **sections)
    workers = Workers(workdir)
    try:
        broker.push([{"workflow_id": "fan", "type": "workflow.running"}])
        subs = _subscribers(
            workers,
            broker.url,
            ["/v1/workflows/fan/stream"] * scale.fanout_subs,
            count,
            count / max(rate, 1) + 60 if rate else 120,
            scale.sub_procs,
            linger=scale.linger,
        )
        wait_until(lambda: broker.stats()["connections"]["total"] >= scale.fanout_subs, 60, "subscribers")
        # --end: subscribers resynced past some events still stop at the end.
        push, push_out = workers.start(
            "push",
            "--endpoint",
            broker.zmq,
            "--count",
            str(count),
            "--workflow",
            "fan",
            "--rate",
            str(rate),
            "--end",
            "--stamp",
        )
        results = [workers.result(p, out, count / max(rate, 1) + 90 if rate else 180) for p, out in subs]
        start_wall = workers.result(push, push_out, 30)["start_wall"]
        merged = merge_subs(results)
        merged["elapsed"] = merged["last_rx"] - start_wall
        merged["deliveries_per_s"] = merged["delivered"] / merged["elapsed"]
        merged["expected"] = count * scale.fanout_subs
        merged["resyncs"] = broker.stats()["streams"].get("resyncs", 0)
        merged["rss_kb"] = broker.rss_kb()
        merged["hwm_kb"] = broker.hwm_kb()
        return merged
    finally:
        workers.close()
        broker.stop()


def _fanout_nchan(scale: Scale, workdir: Path, rate: int, count: int) -> dict[str, Any]:
    from .nchan import NchanServer

    workers = Workers(workdir)
    with NchanServer() as nchan:
        try:
            url_base = f"http://127.0.0.1:{nchan.port}"
            sub_path = "/" + nchan.sub_url("fan").split("/", 3)[3]
            subs = _subscribers(
                workers,
                url_base,
                [sub_path] * scale.fanout_subs,
                count,
                count / max(rate, 1) + 60 if rate else 120,
                scale.sub_procs,
                linger=scale.linger,
            )
            nchan.wait_subscribers(scale.fanout_subs, 60)
            push, push_out = workers.start(
                "http-push", "--url", nchan.pub_url("fan"), "--count", str(count), "--rate", str(rate)
            )
            results = [workers.result(p, out, count / max(rate, 1) + 90 if rate else 180) for p, out in subs]
            pushed = workers.result(push, push_out, 60)
            merged = merge_subs(results)
            merged["elapsed"] = merged["last_rx"] - pushed["start_wall"]
            merged["deliveries_per_s"] = merged["delivered"] / merged["elapsed"]
            merged["expected"] = count * scale.fanout_subs
            # nchan answers a POST only after writing it to every subscriber,
            # so it may not hold the offered rate.
            merged["publish_rate_achieved"] = count / pushed["elapsed"]
            merged.update(_nginx_memory(nchan.pid))
            return merged
        finally:
            workers.close()


def _nginx_memory(master: int | None) -> dict[str, Any]:
    """nginx's memory, as the broker's is counted: the worker processes'
    VmRSS and VmHWM (the master only reads the config), from /proc."""
    if not master:
        return {}
    workers = children(master)
    if not workers:
        return {}
    return {
        "rss_kb": sum(proc_kb(w, "VmRSS") for w in workers),
        "hwm_kb": sum(proc_kb(w, "VmHWM") for w in workers),
        "nginx_workers": len(workers),
        "nginx_master_rss_kb": proc_kb(master, "VmRSS"),
    }


def scenario_fanout(scale: Scale, workdir: Path, nchan_reason: str | None) -> dict[str, Any]:
    count = int(scale.fanout_rate * scale.fanout_seconds)
    out: dict[str, Any] = {"subscribers": scale.fanout_subs, "rate": scale.fanout_rate, "events": count}
    out["broker"] = _fanout_broker(scale, workdir, scale.fanout_rate, count)
    out["broker_flat_out"] = _fanout_broker(scale, workdir, 0, scale.flat_events)
    if nchan_reason is None:
        out["nchan"] = _fanout_nchan(scale, workdir, scale.fanout_rate, count)
        out["nchan_flat_out"] = _fanout_nchan(scale, workdir, 0, scale.flat_events)
        ours, theirs = out["broker_flat_out"], out["nchan_flat_out"]
        if ours["delivered"] == ours["expected"]:
            out["ratio_flat_out"] = ours["deliveries_per_s"] / theirs["deliveries_per_s"]
        else:
            # Events replaced by resync snapshots are not deliveries: no ratio.
            out["ratio_flat_out_note"] = (
                f"no ratio: the broker delivered {ours['delivered']} of {ours['expected']} events, "
                f"the rest as resync snapshots"
            )
    else:
        out["nchan"] = {"skipped": nchan_reason}
    return out


def _gc_pause_ms(r: dict[str, Any]) -> float:
    return sum(g["pause_total_ms"] for g in r.get("gc_during_run", {}).values())


def _gc_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Collections and pause time between two `gc` stats snapshots."""
    out = {}
    for gen, a in after.items():
        b = before.get(gen, {})
        out[gen] = {
            "collections": a["collections"] - b.get("collections", 0),
            "pause_total_ms": round(a["pause_total_ms"] - b.get("pause_total_ms", 0.0), 1),
        }
    return out


def scenario_many(scale: Scale, workdir: Path) -> dict[str, Any]:
    wfs = scale.many_workflows
    count = int(scale.many_rate * scale.many_seconds)
    per_wf = count // wfs
    count = per_wf * wfs
    broker = Broker(workdir)
    workers = Workers(workdir)
    try:
        broker.push([{"workflow_id": f"many-{w}", "type": "workflow.running"} for w in range(wfs)])
        paths = [f"/v1/workflows/many-{w}/stream" for w in range(wfs) for _ in range(scale.many_subs_each)]
        subs = _subscribers(
            workers, broker.url, paths, per_wf, scale.many_seconds + 60, scale.sub_procs, linger=scale.linger
        )
        wait_until(lambda: broker.stats()["connections"]["total"] >= len(paths), 60, "subscribers")
        gc_before = broker.stats().get("gc", {})
        start = time.monotonic()
        push, push_out = workers.start(
            "push",
            "--endpoint",
            broker.zmq,
            "--count",
            str(count),
            "--workflow",
            "many",
            "--workflows",
            str(wfs),
            "--rate",
            str(scale.many_rate),
        )
        workers.result(push, push_out, scale.many_seconds + 90)
        # Every event delivered (besides the snapshots): the run's window
        # ends here, before the subscribers close (the GC figures are this
        # window's; closing 5,000 connections makes a full collection due).
        delivered = per_wf * len(paths) + len(paths)
        stats = wait_until(
            lambda: (st := broker.stats())["delivered"].get("sse", 0) >= delivered and st, 60, "deliveries"
        )
        elapsed = time.monotonic() - start
        results = [workers.result(p, out, scale.many_seconds + 90) for p, out in subs]
        merged = merge_subs(results)
        merged.update(
            workflows=wfs,
            subscribers=len(paths),
            rate=scale.many_rate,
            events=count,
            expected=per_wf * len(paths),
            elapsed=elapsed,
            deliveries_per_s=merged["delivered"] / elapsed,
            rss_kb=broker.rss_kb(),
            hwm_kb=broker.hwm_kb(),
            streams=stats["streams"],
            gc_during_run=_gc_delta(gc_before, stats.get("gc", {})),
        )
        return merged
    finally:
        workers.close()
        broker.stop()


def scenario_idle(scale: Scale, workdir: Path) -> dict[str, Any]:
    broker = Broker(workdir)
    workers = Workers(workdir)
    try:
        broker.push([{"workflow_id": "idle", "type": "workflow.running"}])
        time.sleep(0.5)
        before = broker.rss_kb()
        per = scale.idle_conns // scale.sub_procs
        opening = time.monotonic()
        procs = [
            workers.start(
                "idle",
                "--url-base",
                broker.url,
                "--path",
                "/v1/workflows/idle/stream",
                "--workflow",
                "idle",
                "--kind",
                "mixed",
                "--conns",
                str(per),
                out=False,
                stdin=True,
            )[0]
            for _ in range(scale.sub_procs)
        ]
        for p in procs:
            workers.wait_ready(p, 180)
        total = per * len(procs)
        st = wait_until(lambda: (s := broker.stats()) and s["connections"]["total"] >= total and s, 60, "idle conns")
        # Worker start-up included: a lower bound of the rate the broker accepts them at.
        open_s = time.monotonic() - opening
        time.sleep(1.0)
        after = broker.rss_kb()
        return {
            "connections": total,
            "sse": st["connections"].get("sse", 0),
            "ws": st["connections"].get("ws", 0),
            "rss_before_kb": before,
            "rss_after_kb": after,
            "hwm_kb": broker.hwm_kb(),
            "kb_per_conn": (after - before) / total,
            "open_s": open_s,
            "opened_per_s": total / open_s,
        }
    finally:
        for p in workers.procs:
            if p.stdin:
                p.stdin.close()
        workers.close()
        broker.stop()


def scenario_storm(scale: Scale, workdir: Path) -> dict[str, Any]:
    before, live, resume_after = 500, 200, 250
    broker = Broker(workdir)
    workers = Workers(workdir)
    try:
        broker.push([{"workflow_id": "storm", "type": "workflow.running"}])
        push, push_out = workers.start(
            "push", "--endpoint", broker.zmq, "--count", str(before), "--workflow", "storm", "--stamp"
        )
        workers.result(push, push_out, 60)
        wait_until(lambda: broker.get("/v1/workflows/storm")["seq"] >= before + 1, 30, "storm events")
        epoch = broker.get("/v1/workflows/storm")["epoch"]
        # seq 1 is workflow.running; tick i has seq i + 2.
        cursor = f"{epoch}:{resume_after + 1}"
        expect = before + live - resume_after
        subs = _subscribers(
            workers,
            broker.url,
            ["/v1/workflows/storm/stream"] * scale.storm_clients,
            expect,
            90,
            scale.sub_procs,
            ("--last-event-id", cursor, "--report-first", "--expect-end"),
        )
        push, push_out = workers.start(
            "push",
            "--endpoint",
            broker.zmq,
            "--count",
            str(live),
            "--workflow",
            "storm",
            "--rate",
            "400",
            "--end",
            "--first-i",
            str(before),
        )
        results = [workers.result(p, out, 120) for p, out in subs]
        workers.result(push, push_out, 30)
        merged = merge_subs(results)
        firsts = [f for r in results for f in r["first_i"]]
        merged["resumed_at_cursor"] = sum(1 for f in firsts if f == resume_after)
        merged.update(clients=scale.storm_clients, expect_each=expect)
        # The storm's latency is the resume: request sent → first event back
        # (publish→receive of the backlog would be its age, not a delay).
        delays = [d for r in results for d in r.get("first_delay", [])]
        merged["resume_p50_ms"] = percentile(delays, 0.50) * 1000
        merged["resume_p99_ms"] = percentile(delays, 0.99) * 1000
        merged["resume_max_ms"] = max(delays) * 1000 if delays else float("nan")
        started = min((r["started_wall"] for r in results if "started_wall" in r), default=0.0)
        if started and merged["last_rx"] > started:
            merged["elapsed"] = merged["last_rx"] - started
            merged["deliveries_per_s"] = merged["delivered"] / merged["elapsed"]
        merged["rss_kb"] = broker.rss_kb()
        merged["hwm_kb"] = broker.hwm_kb()
        return merged
    finally:
        workers.close()
        broker.stop()


# Overload (DESIGN §14): the many-workflows load stepped past saturation.
OVL_P99_TARGET_MS = 250.0


def _wait_result(proc: subprocess.Popen[str], path: Path, timeout: float) -> dict[str, Any] | None:
    """A worker's result, or None: killed at the timeout or died (what it wrote
    before, if anything, still counts)."""
    try:
        proc.wait(max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        result: dict[str, Any] = orjson.loads(path.read_bytes())
        return result
    except (OSError, orjson.JSONDecodeError):
        return None


def _step_stats(broker: Broker, before: dict[str, Any]) -> dict[str, Any]:
    """Broker counters over the step: after − before."""
    try:
        after = broker.stats(timeout=10)
    except OSError as exc:
        return {"stats_error": f"{type(exc).__name__}: {exc}"}
    b_streams, a_streams = before.get("streams", {}), after.get("streams", {})
    out = {
        "delivered": after["delivered"].get("sse", 0) - before["delivered"].get("sse", 0),
        # `writes` is new in the broker: 0 where it does not count them yet.
        "writes": a_streams.get("writes", 0) - b_streams.get("writes", 0),
        "coalesced": a_streams.get("coalesced", 0) - b_streams.get("coalesced", 0),
        "resyncs": a_streams.get("resyncs", 0) - b_streams.get("resyncs", 0),
        "slow_consumer_closed": a_streams.get("slow_consumer_closed", 0) - b_streams.get("slow_consumer_closed", 0),
        # Direct writes the socket did not take whole: finished by the stream's task.
        "direct_partial": a_streams.get("direct_partial", 0) - b_streams.get("direct_partial", 0),
        "ingested": after["counters"].get("ingested", 0) - before["counters"].get("ingested", 0),
        "gc_during_step": _gc_delta(before.get("gc", {}), after.get("gc", {})),
    }
    return out


def _overload_step(scale: Scale, workdir: Path, rate: int) -> dict[str, Any]:
    from .worker import EVENTS_PER_TASK, overload_script

    wfs, each = scale.ovl_workflows, scale.ovl_subs_each
    # Each workflow runs workflow.running, T tasks, workflow.completed; T is
    # chosen so that the step lasts about `ovl_seconds` at this rate.
    tasks = max(1, round((rate * scale.ovl_seconds / wfs - 2) / EVENTS_PER_TASK))
    script = overload_script(tasks)
    per_wf = len(script)
    last_index = max(i for _, i in script)  # "i" of workflow.completed
    total = per_wf * wfs
    nominal = total / rate
    # The step must be over (every `end` in) this long after the engine starts.
    limit = 2 * nominal + 10
    step: dict[str, Any] = {
        "rate": rate,
        "workflows": wfs,
        "subscribers": wfs * each,
        "tasks": tasks,
        "events": total,
        "events_per_workflow": per_wf,
        "state_log_events_per_workflow": last_index + 1,
        "nominal_s": nominal,
        "limit_s": limit,
    }
    prefix = f"ovl{rate}"
    broker = Broker(workdir)
    workers = Workers(workdir)
    try:
        # Each workflow exists before its subscribers come (seq 1: the engine's).
        broker.push([{"workflow_id": f"{prefix}-{w}", "type": "workflow.created", "seq": 1} for w in range(wfs)])
        # The engine starts first (its imports overlap the subscribers'), and waits.
        push, push_out = workers.start(
            "ovl-push",
            "--endpoint",
            broker.zmq,
            "--prefix",
            prefix,
            "--workflows",
            str(wfs),
            "--tasks",
            str(tasks),
            "--rate",
            str(rate),
            "--deadline",
            str(limit - 2),
            "--linger",
            "2",
            stdin=True,
        )
        paths = [f"/v1/workflows/{prefix}-{w}/stream" for w in range(wfs) for _ in range(each)]
        subs = []
        for k in range(scale.sub_procs):
            chunk = paths[k :: scale.sub_procs]
            if not chunk:
                continue
            paths_file = workdir / f"ovl-paths-{rate}-{k}.txt"
            paths_file.write_text("\n".join(chunk))
            subs.append(
                workers.start(
                    "ovl-sse",
                    "--url-base",
                    broker.url,
                    "--paths-file",
                    str(paths_file),
                    "--last-index",
                    str(last_index),
                    "--duration",
                    str(limit + 90),
                    stdin=True,
                )
            )
        for proc, _ in subs:
            workers.wait_ready(proc)
        # Connected, and every snapshot written: the step starts clean.
        wait_until(
            lambda: (
                (st := broker.stats())["connections"]["total"] >= len(paths)
                and st["delivered"].get("sse", 0) >= len(paths)
            ),
            60,
            "subscribers",
        )
        workers.wait_ready(push)  # connected; its clock starts at "go"
        before = broker.stats()
        cpu0 = cpu_s(broker.proc.pid)
        engine_started = time.time()
        assert push.stdin is not None
        push.stdin.write("go\n")
        push.stdin.flush()
        stop_wall = engine_started + limit
        for proc, _ in subs:
            assert proc.stdin is not None
            proc.stdin.write(f"{stop_wall}\n")
            proc.stdin.flush()
        pushed = _wait_result(push, push_out, limit + 10)
        results = [_wait_result(proc, out, stop_wall - time.time() + 20) for proc, out in subs]
        broker_cpu = cpu_s(broker.proc.pid) - cpu0
        rss, hwm = broker.rss_kb(), broker.hwm_kb()
        step.update(_step_stats(broker, before))
    finally:
        workers.close()
        broker.stop()

    problems: list[str] = []
    timed_out = False
    if pushed is None:
        problems.append("the engine reported nothing")
        pushed, timed_out = {}, True
    elif pushed.get("timed_out"):
        problems.append(f"the engine sent {pushed['sent']} of {total} within the limit")
        timed_out = True
    got = [r for r in results if r is not None]
    if len(got) < len(results):
        problems.append(f"{len(results) - len(got)} subscriber processes reported nothing")
        timed_out = True
    if any(r.get("timed_out") for r in got):
        problems.append(f"not every stream ended within the limit ({limit:.0f}s)")
        timed_out = True
    lat = [x for r in got for x in r["latency"]]
    ing = [x for r in got for x in r["ingest"]]
    dlv = [x for r in got for x in r["delivery"]]
    keys = (
        "conns",
        "bad_status",
        "ended",
        "ended_ok",
        "closed_early",
        "errors",
        "got",
        "resynced_conns",
        "resync_frames",
        "lost",
        "dups",
        "lost_after_resync",
        "dups_after_resync",
        "disorder",
    )
    step.update({k: sum(r[k] for r in got) for k in keys})
    step["conns"] = len(paths)  # also those of a process that reported nothing
    start_wall = pushed.get("start_wall", engine_started)
    last_rx = max((r["last_rx"] for r in got), default=0.0)
    elapsed = last_rx - start_wall if last_rx > start_wall else pushed.get("elapsed", nominal)
    writes = step.get("writes", 0)
    step.update(
        sent=pushed.get("sent", 0),
        send_rate=pushed.get("send_rate", 0.0),
        blocked_sends=pushed.get("blocked_sends", 0),
        elapsed=elapsed,
        p50_ms=percentile(lat, 0.50) * 1000,
        p99_ms=percentile(lat, 0.99) * 1000,
        max_ms=max(lat) * 1000 if lat else float("nan"),
        ingest_p50_ms=percentile(ing, 0.50),
        ingest_p99_ms=percentile(ing, 0.99),
        delivery_p50_ms=percentile(dlv, 0.50),
        delivery_p99_ms=percentile(dlv, 0.99),
        samples=len(lat),
        writes_per_s=writes / elapsed if writes else 0.0,
        events_per_write=step.get("delivered", 0) / writes if writes else 0.0,
        rss_kb=rss,
        hwm_kb=hwm,
        # Share of one core over the step: ≈ 100 % is a saturated broker
        # (its event loop is one thread); the clients share the same cores.
        broker_cpu_pct=100 * broker_cpu / elapsed,
        subscribers_cpu_pct=100 * sum(r.get("cpu_s", 0.0) for r in got) / elapsed,
        engine_cpu_pct=100 * pushed.get("cpu_s", 0.0) / elapsed,
    )
    # Worst second's p99 (by arrival): a steady tail or a few bad moments.
    by_second: dict[int, list[float]] = {}
    for r in got:
        for sec, value in zip(r["latency_at"], r["latency"], strict=False):
            by_second.setdefault(sec, []).append(value)
    p99s = [percentile(v, 0.99) * 1000 for _, v in sorted(by_second.items()) if len(v) >= 100]
    if p99s:
        step["p99_by_second_ms"] = [round(x, 1) for x in p99s]
        step["p99_worst_second_ms"] = max(p99s)
    if step["ended_ok"] < step["conns"]:
        problems.append(f"{step['conns'] - step['ended_ok']} of {step['conns']} streams did not end completed")
    for what in ("lost", "dups", "disorder"):
        if step[what]:
            problems.append(f"{what} {step[what]}")
    step["timed_out"] = timed_out
    step["correct"] = step["ended_ok"] == step["conns"] and not (step["lost"] or step["dups"] or step["disorder"])
    step["met"] = step["correct"] and not step["timed_out"] and step["p99_ms"] <= OVL_P99_TARGET_MS
    step["problems"] = problems
    return step


def scenario_overload(scale: Scale, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "workflows": scale.ovl_workflows,
        "subs_each": scale.ovl_subs_each,
        "step_seconds": scale.ovl_seconds,
        "target": f"p99 ≤ {OVL_P99_TARGET_MS:.0f} ms at every step; every subscriber ends in the true final state",
    }
    # Today's machine speed, beside the steps (once per overload run).
    ref = pull_reference(workdir, scale.ovl_pull_ref_events)
    out["pull_ref_eps"] = ref["rate"]
    out["pull_ref_events"] = scale.ovl_pull_ref_events
    # … and what one write costs: a send() to one of as many sockets as the
    # steps have subscribers (a write pass writes each of them once).
    subs = scale.ovl_workflows * scale.ovl_subs_each
    out["send_ref"] = send_reference(workdir, subs, scale.ovl_send_ref_sends, 25_000)
    steps = []
    for rate in scale.ovl_rates:
        print(f"  overload step {rate}/s", flush=True)
        try:
            step = _overload_step(scale, workdir, rate)
        except (BenchError, OSError) as exc:  # this step only: the bench moves on
            reason = f"failed: {exc}"
            step = {"rate": rate, "error": reason, "met": False, "timed_out": False, "problems": [reason]}
        for p in step.get("problems", []):
            print(f"    {rate}/s: {p}", flush=True)
        steps.append(step)
    out["steps"] = steps
    out["steps_met"] = sum(1 for s in steps if s.get("met"))
    out["all_met"] = out["steps_met"] == len(steps)
    return out


# -------------------------------------------------------------------- report


def _mix_ingest(broker: Broker, workers: Workers, prefix: str, workflows: int, count: int) -> dict[str, Any]:
    """Push `count` events of the realistic mix flat out; the ingest rate
    (engine's first send → last event in a ring), and when it was done."""
    from .worker import EVENTS_PER_TASK

    per_workflow = -(-count // workflows)
    tasks = max(1, -(-(per_workflow - 2) // EVENTS_PER_TASK))  # the script is 2 + 9 per task
    before = broker.stats()["counters"].get("ingested", 0)
    push, push_out = workers.start(
        "mix-push",
        "--endpoint",
        broker.zmq,
        "--prefix",
        prefix,
        "--workflows",
        str(workflows),
        "--tasks",
        str(tasks),
        "--count",
        str(count),
    )
    wait_until(
        lambda: broker.stats()["counters"].get("ingested", 0) >= before + count,
        600,
        "the broker to ingest the mix",
        interval=STATS_POLL,
    )
    done_wall = time.time()
    start_wall = workers.result(push, push_out, 60)["start_wall"]
    return {"eps": count / (done_wall - start_wall), "start_wall": start_wall, "done_wall": done_wall}


def scenario_store(scale: Scale, workdir: Path) -> dict[str, Any]:
    """DESIGN §10 targets: events/s written into PostgreSQL (fsync on) with
    ingest beside the in-memory rate of the same run, and restart-to-ready
    with 10,000 active workflows, beside an in-memory broker's start."""
    from ..tools.postgres import start_postgres

    n = scale.ingest_events
    wfs = 1000
    base = Path(tempfile.mkdtemp(prefix="broker-bench-pg-"))
    base.chmod(0o755)  # the postgres user must reach it when we run as root
    # A durable cluster: fsync and full-page writes on (the tests turn them off).
    pg = start_postgres(base / "pg", {"fsync": "on", "full_page_writes": "on", "shared_buffers": "128MB"})
    out: dict[str, Any] = {"events": n, "workflows": wfs}
    workers = Workers(workdir)
    try:
        broker = Broker(workdir)
        try:
            out["memory_eps"] = _mix_ingest(broker, workers, "mem", wfs, n)["eps"]
            out["memory_rss_kb"] = broker.rss_kb()
        finally:
            broker.stop()
        store = {"backend": "postgres", "dsn": pg.dsn}
        broker = Broker(workdir, store=store)
        try:
            got = _mix_ingest(broker, workers, "st", wfs, n)
            out["store_ingest_eps"] = got["eps"]
            wait_until(lambda: broker.stats()["store"]["written"] >= n, 600, "the store to write it all", 0.01)
            written_wall = time.time()
            st = broker.stats()["store"]
            out["store_write_eps"] = n / (written_wall - got["start_wall"])
            out["store_lag_s"] = written_wall - got["done_wall"]
            out["store_rss_kb"] = broker.rss_kb()
            for key in ("batches", "queue_peak", "commit_ms_p50", "commit_ms_p99", "dropped"):
                out[f"store_{key}"] = st[key]
            # Restart with 10,000 active workflows (19 events each, none ended).
            active = 10_000
            _mix_ingest(broker, workers, "act", active, active * 19)
            want = st["written"] + active * 19
            wait_until(lambda: broker.stats()["store"]["written"] >= want, 600, "the active workflows written", 0.02)
        finally:
            broker.stop()
        began = time.monotonic()
        broker = Broker(workdir, store=store)
        out["restart_to_ready_s"] = time.monotonic() - began
        try:
            restored = broker.stats()["store"]["restore"]
            out["restored"] = restored
        finally:
            broker.stop()
        began = time.monotonic()
        broker = Broker(workdir)
        out["memory_start_to_ready_s"] = time.monotonic() - began
        broker.stop()
    finally:
        workers.close()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
    out["ingest_ratio"] = out["store_ingest_eps"] / out["memory_eps"]
    return out


def machine_line() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import zmq

    versions = {}
    for dist in ("trio", "pyzmq", "hypercorn", "quart", "quart-trio", "orjson", "h11"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "?"
    versions["libzmq"] = zmq.zmq_version()
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


def fmt(v: Any, spec: str = ".0f") -> str:
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def _lat(r: dict[str, Any], prefix: str = "") -> str:
    """`p50 / p99 / max` in ms, or "—" where the figures are missing."""
    keys = [f"{prefix}p50_ms", f"{prefix}p99_ms", f"{prefix}max_ms"]
    if not all(isinstance(r.get(k), (int, float)) for k in keys):
        return "—"
    return " / ".join(f"{r[k]:.1f}" for k in keys)


def _peak(r: dict[str, Any]) -> str:
    return mb(r.get("hwm_kb") or r.get("rss_kb"))


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _render(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    """One row per measured run, each with its throughput, latency and
    memory (peak RSS of the broker process, fresh for every run), and the
    reference of the same run right below it (↳) in the same columns."""
    rows: list[tuple[str, str, str, str, str]] = []
    r = results.get("ingest")
    if r:
        rows.append(
            (
                f"ingest: {r['events']} events, no subscribers",
                f"{fmt(r['broker_eps'], ',.0f')} ev/s",
                "— (nothing delivered)",
                _peak(r),
                f"{r['ratio'] * 100:.0f} % of bare PULL (target ≥ 60 %): {_yes(r['ratio'] >= 0.6)}",
            )
        )
        rows.append(
            (
                "  ↳ bare pyzmq PULL loop (reference)",
                f"{fmt(r['pull_ref_eps'], ',.0f')} ev/s",
                "—",
                mb(r.get("pull_ref_hwm_kb")),
                "",
            )
        )
    r = results.get("fanout")
    if r:
        nchan = r["nchan"]
        flat_events = r["broker_flat_out"]["expected"] // r["subscribers"]
        runs = [
            (f"fan-out: {r['subscribers']} SSE × {r['rate']} ev/s", r["broker"], nchan),
            (
                f"fan-out flat out: {flat_events} ev × {r['subscribers']} SSE",
                r["broker_flat_out"],
                r.get("nchan_flat_out", nchan),
            ),
        ]
        for label, b, n in runs:
            flat = b is r["broker_flat_out"]
            verdict = f"{b['delivered']}/{b['expected']} delivered, lost {b['lost']}, dups {b['dups']}"
            if flat:
                verdict += f", resyncs {b.get('resyncs', 0)}"
                if "ratio_flat_out" in r:
                    ratio = r["ratio_flat_out"]
                    verdict += f"; {ratio:.2f} × nchan (target ≥ 2): {_yes(ratio >= 2)}"
                elif "ratio_flat_out_note" in r:
                    verdict += "; no ratio: events lost to resync"
            else:
                verdict += f"; p99 ≤ 100 ms: {_yes(b['p99_ms'] <= 100)}"
            rows.append((label, f"{fmt(b['deliveries_per_s'], ',.0f')} deliv/s", _lat(b), _peak(b), verdict))
            if "deliveries_per_s" in n:
                note = f"{n['delivered']}/{n['expected']} delivered"
                if "publish_rate_achieved" in n and not flat:
                    note += f"; its publisher held {n['publish_rate_achieved']:.0f} ev/s"
                rows.append(
                    (
                        "  ↳ nginx + nchan (reference)",
                        f"{fmt(n['deliveries_per_s'], ',.0f')} deliv/s",
                        _lat(n),
                        _peak(n),
                        note,
                    )
                )
            else:
                rows.append(("  ↳ nginx + nchan (reference)", "n/a", "n/a", "n/a", str(n.get("skipped", ""))))
    r = results.get("many")
    if r:
        thr = r.get("deliveries_per_s") or (r["delivered"] / r["elapsed"] if r.get("elapsed") else "-")
        rows.append(
            (
                f"many: {r['workflows']} wf × {r['subscribers'] // r['workflows']} SSE, {r['rate']} ev/s",
                f"{fmt(thr, ',.0f')} deliv/s",
                _lat(r),
                _peak(r),
                f"{r['delivered']}/{r['expected']} delivered, lost {r['lost']}; p99 ≤ 10 ms: "
                f"{_yes(r['p99_ms'] <= 10)}; GC paused {_gc_pause_ms(r):.0f} ms",
            )
        )
        if "p99_by_second_ms" in r:
            rows.append(
                (
                    "  p99 of each second: median / worst",
                    "",
                    f"{r['p99_median_second_ms']:.1f} / {r['p99_worst_second_ms']:.1f}",
                    "",
                    f"{r['seconds_p99_within_10ms']} of {len(r['p99_by_second_ms'])} seconds within 10 ms",
                )
            )
    r = results.get("overload")
    if r:
        steps = r["steps"]
        ran = [s for s in steps if "error" not in s]
        worst = max((s["p99_ms"] for s in ran if isinstance(s.get("p99_ms"), (int, float))), default=float("nan"))
        sent = max((s.get("send_rate", 0.0) for s in ran), default=0.0)
        rows.append(
            (
                f"overload: {r['workflows']} wf × {r['subs_each']} SSE, "
                + "→".join(f"{s['rate'] // 1000}k" if s["rate"] >= 1000 else str(s["rate"]) for s in steps)
                + " ev/s",
                f"sent ≤ {fmt(sent, ',.0f')} ev/s",
                f"worst p99 {worst:.1f}",
                mb(max((s.get("hwm_kb", 0) for s in ran), default=0)),
                f"{r['steps_met']}/{len(steps)} steps meet p99 ≤ {OVL_P99_TARGET_MS:.0f} ms + all end completed "
                "(table below)",
            )
        )
        rows.append(
            (
                f"  ↳ bare pyzmq PULL loop, {r['pull_ref_events']} frames (machine speed)",
                f"{fmt(r['pull_ref_eps'], ',.0f')} ev/s",
                "—",
                "",
                "",
            )
        )
    r = results.get("idle")
    if r:
        rows.append(
            (
                f"idle: {r['connections']} conns ({r['sse']} SSE, {r['ws']} WS)",
                f"{r['connections']} held (opened ≥ {fmt(r.get('opened_per_s', '-'), ',.0f')}/s)",
                "— (idle)",
                f"{mb(r['rss_after_kb'])} ({r['kb_per_conn']:.1f} KB each)",
                f"≤ 25 KB each: {_yes(r['kb_per_conn'] <= 25)}",
            )
        )
    r = results.get("storm")
    if r:
        rows.append(
            (
                f"reconnect storm: {r['clients']} clients, Last-Event-ID",
                f"{fmt(r.get('deliveries_per_s', '-'), ',.0f')} deliv/s",
                "resume " + _lat(r, "resume_"),
                _peak(r),
                f"{r['resumed_at_cursor']}/{r['clients']} resumed at cursor, {r['complete']} complete, "
                f"{r['ended']} ended, lost {r['lost']}, dups {r['dups']} (target 0)",
            )
        )
    head = ("scenario", "throughput", "latency p50 / p99 / max ms", "RSS MB (peak)", "result, against target")
    return _render(head, list(rows))


def store_table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [
        ("ingest, in memory", f"{fmt(r['memory_eps'])} ev/s", "", mb(r["memory_rss_kb"])),
        (
            "ingest, with the store",
            f"{fmt(r['store_ingest_eps'])} ev/s",
            f"{r['ingest_ratio'] * 100:.0f} % of in memory (target ≥ 90 %)",
            mb(r["store_rss_kb"]),
        ),
        (
            "written to PostgreSQL",
            f"{fmt(r['store_write_eps'])} ev/s",
            f"target ≥ 50,000; {r['store_batches']} batches, commit p50 {r['store_commit_ms_p50']} ms "
            f"p99 {r['store_commit_ms_p99']} ms, queue peak {r['store_queue_peak']}, "
            f"last write {r['store_lag_s']:.2f} s after ingest",
            "",
        ),
        (
            "restart to ready, 10,000 active",
            f"{r['restart_to_ready_s']:.2f} s",
            f"target ≤ 5 s; in-memory start {r['memory_start_to_ready_s']:.2f} s; restored "
            f"{r['restored'].get('workflows')} workflows, {r['restored'].get('entries')} entries "
            f"in {r['restored'].get('total_s')} s",
            "",
        ),
    ]
    return _render(("", "rate / time", "beside", "RSS"), rows)


def overload_table(r: dict[str, Any]) -> str:
    """One row per overload step (DESIGN §14: p99 ≤ 250 ms at every step,
    every subscriber ends in the true final state)."""
    head = (
        "offered/s",
        "sent/s",
        "p50 / p99 / max ms",
        "ingest p99",
        "deliv p99",
        "writes/s",
        "ev/write",
        "coalesced",
        "resyncs (conns)",
        "ended ok",
        "lost/dup/ooo",
        "broker CPU",
        "RSS MB",
        f"target p99 ≤ {OVL_P99_TARGET_MS:.0f} ms, all ended",
    )
    rows: list[tuple[str, ...]] = []
    for s in r["steps"]:
        if "error" in s:
            rows.append((fmt(s["rate"], ",d"), *["-"] * (len(head) - 2), f"NO: {s['error']}"))
            continue
        writes = s.get("writes", 0)
        if s["met"]:
            verdict = "yes"
        else:
            why = []
            if not s["p99_ms"] <= OVL_P99_TARGET_MS:
                why.append("p99")
            if not s["correct"]:
                why.append("final state/loss")
            if s["timed_out"]:
                why.append("timed out")
            verdict = "NO: " + ", ".join(why)
        rows.append(
            (
                fmt(s["rate"], ",d"),
                fmt(s["send_rate"], ",.0f"),
                _lat(s),
                f"{s['ingest_p99_ms']:.1f}",
                f"{s['delivery_p99_ms']:.1f}",
                fmt(s["writes_per_s"], ",.0f") if writes else "n/a",
                f"{s['events_per_write']:.2f}" if writes else "n/a",
                fmt(s.get("coalesced", "-"), ",d") if isinstance(s.get("coalesced"), int) else "n/a",
                f"{s.get('resyncs', 'n/a')} ({s['resynced_conns']})",
                f"{s['ended_ok']}/{s['conns']}",
                f"{s['lost']}/{s['dups']}/{s['disorder']}",
                f"{s['broker_cpu_pct']:.0f} %",
                mb(s["rss_kb"]),
                verdict,
            )
        )
    ref = f"bare pyzmq PULL loop, same run: {fmt(r['pull_ref_eps'], ',.0f')} frames/s"
    send = r.get("send_ref")
    if send:
        ref += (
            f"\nbare send() of {send['bytes']} B to {fmt(send['conns'], ',d')} loopback sockets, same run: "
            f"{send['user_us'] + send['sys_us']:.1f} µs of CPU each ({send['sys_us']:.1f} in the kernel) "
            f"at {fmt(send['rate'], ',.0f')}/s: a write pass over them all ≥ "
            f"{send['conns'] * (send['user_us'] + send['sys_us']) / 1000:.0f} ms"
        )
    note = (
        "latency: publish→receive (from each event's send time t); ingest = server_ts − t (the ZMQ queue), "
        "deliv = receive − server_ts (hub + write); broker CPU: share of one core; RSS at the step's end"
    )
    return _render(head, rows) + f"\n{ref}\n{note}"


SCENARIOS = ("ingest", "fanout", "many", "overload", "idle", "storm", "store", "compression")
# compression: (subscribers, events/s, seconds) per scale
COMPRESSION = {"full": (50, 2000, 15.0), "quick": (20, 2000, 6.0), "tiny": (3, 200, 1.5)}


def run(args: argparse.Namespace) -> int:
    scale = TINY if args.tiny else QUICK if args.quick else FULL
    wanted = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        print(f"broker bench: unknown scenario {sorted(unknown)[0]} (use {', '.join(SCENARIOS)})", file=sys.stderr)
        return 2
    machine = machine_line()
    print(
        f"machine: {machine['cores']} cores, {machine['cpu']}, Python {machine['python']}, kernel "
        f"{machine['kernel']}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        flush=True,
    )
    nchan_reason: str | None = "not requested (--no-nchan)"
    if "fanout" in wanted and not args.no_nchan:
        from .nchan import ensure_installed

        nchan_reason = ensure_installed()
        if nchan_reason:
            print(f"broker bench: nginx + nchan reference unavailable: {nchan_reason}", flush=True)
    results: dict[str, Any] = {"machine": machine, "scale": scale.name}
    failed = False
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="broker-bench-")))
        for name in wanted:
            print(f"… {name}", flush=True)
            started = time.monotonic()
            try:
                if name == "ingest":
                    results[name] = scenario_ingest(scale, workdir)
                elif name == "fanout":
                    results[name] = scenario_fanout(scale, workdir, nchan_reason)
                elif name == "many":
                    results[name] = scenario_many(scale, workdir)
                elif name == "overload":
                    results[name] = scenario_overload(scale, workdir)
                elif name == "idle":
                    results[name] = scenario_idle(scale, workdir)
                elif name == "storm":
                    results[name] = scenario_storm(scale, workdir)
                elif name == "store":
                    results[name] = scenario_store(scale, workdir)
                elif name == "compression":
                    from .compression import scenario_compression

                    subs, rate, seconds = COMPRESSION[scale.name]
                    results[name] = scenario_compression(Broker, workdir, subs, rate, seconds)
            except BenchError as exc:
                print(f"broker bench: {name} failed: {exc}", flush=True)
                results[name + "_error"] = str(exc)
                failed = True
            print(f"  {name}: {time.monotonic() - started:.1f}s", flush=True)
    print()
    print(table(results))
    if "overload" in results:
        print()
        print("overload steps:")
        print(overload_table(results["overload"]))
    if "store" in results:
        print()
        print("store (PostgreSQL, fsync on; the realistic mix):")
        print(store_table(results["store"]))
    if "compression" in results:
        from .compression import compression_table

        print()
        print("compression (SSE gzip; the realistic mix of broker simulate, every subscriber on its tenant stream):")
        print(compression_table(results["compression"]))
    if args.json:
        for r in results.values():
            if isinstance(r, dict):
                for sub in r.values():
                    if isinstance(sub, dict):
                        sub.pop("latency", None)
                        sub.pop("latency_at", None)
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
        print(f"\nJSON written to {args.json}")
    return 1 if failed else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a one-minute run with smaller counts")
    p.add_argument("--tiny", action="store_true", help="tiny numbers: a smoke test of the bench itself")
    p.add_argument("--scenarios", help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    p.add_argument("--no-nchan", action="store_true", help="skip the nginx + nchan reference")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
