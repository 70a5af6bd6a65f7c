"""`broker bench`: the DESIGN.md §14 scenarios, end to end, against a real
broker process, each figure beside its reference measured in the same run.

Everything runs as separate processes on this machine, on 127.0.0.1 only:
the broker (`python -m broker run` on a generated config), engines
(`broker.bench.worker push`), subscribers (`broker.bench.worker sse|idle`,
raw-socket clients, several processes), the bare pyzmq PULL reference and
nginx + nchan (broker/bench/nchan.py). Latency is publish→receive from the
send time each event carries. Runs are bounded in count and time and stop
by themselves.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
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


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


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

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return orjson.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self.get("/v1/admin/stats")

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

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
            raise BenchError(f"worker {proc.args[3]} did not get ready: {line!r}")

    @staticmethod
    def result(proc: subprocess.Popen[str], path: Path, timeout: float) -> dict[str, Any]:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BenchError(f"worker {proc.args[3]} did not finish in {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise BenchError(f"worker {proc.args[3]} exited {proc.returncode}")
        return orjson.loads(path.read_bytes())

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
# connections after all have their events (see `_subscribers`).
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
    sub_procs: int = 4
    name: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Scale(500_000, 1000, 1000, 30, 20_000, 1000, 5, 5000, 30, 10_000, 1000, name="full")
QUICK = Scale(200_000, 1000, 1000, 8, 5_000, 1000, 5, 5000, 8, 4000, 1000, name="quick")
TINY = Scale(2_000, 20, 100, 1.5, 200, 10, 2, 200, 1.5, 40, 20, sub_procs=2, name="tiny")


def scenario_ingest(scale: Scale, workdir: Path) -> dict[str, Any]:
    n = scale.ingest_events
    workers = Workers(workdir)
    try:
        # Reference: a bare pyzmq PULL loop receiving the same frames.
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        ref, ref_out = workers.start("pull-ref", "--bind", endpoint, "--count", str(n))
        workers.wait_ready(ref)
        push, push_out = workers.start("push", "--endpoint", endpoint, "--count", str(n), "--workflows", "100")
        ref_rate = workers.result(ref, ref_out, 300)["rate"]
        workers.result(push, push_out, 60)
    finally:
        workers.close()
    broker = Broker(workdir)
    workers = Workers(workdir)
    try:
        push, push_out = workers.start("push", "--endpoint", broker.zmq, "--count", str(n), "--workflows", "100")
        wait_until(
            lambda: broker.stats()["counters"].get("ingested", 0) >= n,
            300,
            "the broker to ingest it all",
            interval=0.01,
        )
        done_wall = time.time()
        start_wall = workers.result(push, push_out, 60)["start_wall"]
        # From the engine's first send to the last event in a ring, as the
        # reference counts from its first receive to its last.
        rate = n / (done_wall - start_wall)
        rss = broker.rss_kb()
    finally:
        workers.close()
        broker.stop()
    return {"events": n, "broker_eps": rate, "pull_ref_eps": ref_rate, "ratio": rate / ref_rate, "rss_kb": rss}


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
            linger=LINGER,
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
                linger=LINGER,
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
            return merged
        finally:
            workers.close()


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
        subs = _subscribers(workers, broker.url, paths, per_wf, scale.many_seconds + 60, scale.sub_procs, linger=LINGER)
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
            rss_kb=broker.rss_kb(),
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
        time.sleep(1.0)
        after = broker.rss_kb()
        return {
            "connections": total,
            "sse": st["connections"].get("sse", 0),
            "ws": st["connections"].get("ws", 0),
            "rss_before_kb": before,
            "rss_after_kb": after,
            "kb_per_conn": (after - before) / total,
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
        return merged
    finally:
        workers.close()
        broker.stop()


# -------------------------------------------------------------------- report


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


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    r = results.get("ingest")
    if r:
        rows.append(
            (
                "ingest events/s (no subscribers)",
                fmt(r["broker_eps"]),
                f"bare PULL {fmt(r['pull_ref_eps'])}",
                f"{r['ratio'] * 100:.0f} % (target ≥ 60 %)",
            )
        )
    r = results.get("fanout")
    if r:
        b = r["broker"]
        rows.append(
            (
                f"fan-out {r['subscribers']} SSE × {r['rate']}/s: delivered",
                f"{b['delivered']}/{b['expected']}",
                "",
                f"lost {b['lost']}, dups {b['dups']}",
            )
        )
        rows.append(("  deliveries/s", fmt(b["deliveries_per_s"]), fmt(r["nchan"].get("deliveries_per_s", "-")), ""))
        rows.append(
            (
                "  latency p50 / p99 / max (ms)",
                f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} / {b['max_ms']:.1f}",
                (
                    f"{r['nchan']['p50_ms']:.1f} / {r['nchan']['p99_ms']:.1f} / {r['nchan']['max_ms']:.1f}"
                    if "p50_ms" in r["nchan"]
                    else r["nchan"].get("skipped", "")
                ),
                "target p99 ≤ 100 ms",
            )
        )
        f = r["broker_flat_out"]
        nf = r.get("nchan_flat_out", {})
        rows.append(
            (
                "  flat out: delivered",
                f"{f['delivered']}/{f['expected']}",
                f"{nf['delivered']}/{nf['expected']}" if nf.get("expected") else "-",
                f"broker resyncs: {f.get('resyncs', 0)}",
            )
        )
        rows.append(
            (
                "  flat out: deliveries/s",
                fmt(f["deliveries_per_s"]),
                fmt(nf.get("deliveries_per_s", "-")),
                f"ratio {r['ratio_flat_out']:.2f} (target ≥ 2)"
                if "ratio_flat_out" in r
                else ("no ratio: events lost to resync" if "ratio_flat_out_note" in r else ""),
            )
        )
    r = results.get("many")
    if r:
        rows.append(
            (
                f"many: {r['workflows']} wf × {r['subscribers'] // r['workflows']} subs, {r['rate']}/s",
                f"p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms",
                f"{r['delivered']}/{r['expected']} delivered; GC paused {_gc_pause_ms(r):.0f} ms",
                "target p99 ≤ 10 ms",
            )
        )
        if "p99_by_second_ms" in r:
            rows.append(
                (
                    "  p99 of each second: median / worst",
                    f"{r['p99_median_second_ms']:.1f} / {r['p99_worst_second_ms']:.1f} ms",
                    f"{r['seconds_p99_within_10ms']} of {len(r['p99_by_second_ms'])} seconds within 10 ms",
                    "",
                )
            )
    r = results.get("idle")
    if r:
        rows.append(
            (
                f"idle: {r['connections']} conns ({r['sse']} SSE, {r['ws']} WS)",
                f"{r['kb_per_conn']:.1f} KB RSS each",
                "",
                "target ≤ 25 KB",
            )
        )
    r = results.get("storm")
    if r:
        rows.append(
            (
                f"reconnect storm: {r['clients']} clients, Last-Event-ID",
                f"{r['resumed_at_cursor']}/{r['clients']} resumed",
                f"{r['complete']} complete, {r['ended']} ended",
                f"lost {r['lost']}, dups {r['dups']} (target 0)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)] if rows else [0] * 4
    head = ("scenario", "broker", "reference", "against target")
    widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


SCENARIOS = ("ingest", "fanout", "many", "idle", "storm")


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
                elif name == "idle":
                    results[name] = scenario_idle(scale, workdir)
                elif name == "storm":
                    results[name] = scenario_storm(scale, workdir)
            except BenchError as exc:
                print(f"broker bench: {name} failed: {exc}", flush=True)
                results[name + "_error"] = str(exc)
                failed = True
            print(f"  {name}: {time.monotonic() - started:.1f}s", flush=True)
    print()
    print(table(results))
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
