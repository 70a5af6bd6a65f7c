"""Running under systemd (Type=notify): READY/STATUS/WATCHDOG/STOPPING over
`$NOTIFY_SOCKET`, the watchdog fed only by the data-path probe (an event
through the broker's own ingest and back), the probe behind /readyz. The
daemon is a subprocess; the test binds the datagram socket systemd would.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from broker.server.notify import Notifier, message, socket_address

from .conftest import BASE_SECTIONS, Daemon, write_config
from .e2e import uid


def test_message_and_address() -> None:
    assert message(READY=1, STATUS="ready: http a\nb") == b"READY=1\nSTATUS=ready: http a b"
    assert socket_address("@systemd/notify") == "\0systemd/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    n = Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())})
    assert not n.enabled and n.watchdog == 2.0 and n.send(READY=1) is False
    assert Notifier({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog is None  # not for us
    assert Notifier({}).watchdog is None


def test_an_abstract_socket_gets_the_datagram() -> None:
    name = f"broker-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            assert n.send(READY=1, STATUS="x")
            assert server.recv(4096) == b"READY=1\nSTATUS=x"
        finally:
            n.close()


class Systemd:
    """The notify socket systemd would hold: every datagram, with its time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.got: list[tuple[float, dict[str, str]]] = []

    async def next(self) -> dict[str, str]:
        await trio.lowlevel.wait_readable(self.sock)
        data = self.sock.recv(65536).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines())
        self.got.append((time.monotonic(), fields))
        return fields

    async def until(self, key: str) -> dict[str, str]:
        while True:
            fields = await self.next()
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


def start(tmp_path: Path, env: dict[str, str], **sections: dict[str, Any]) -> Daemon:
    merged = {name: dict(values) for name, values in BASE_SECTIONS.items()}
    merged["service"] = {"probe_interval": 5}  # the shipped default (the other tests turn it off)
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return Daemon(write_config(tmp_path / f"b-{uid()}.toml", merged), env=env)


@pytest.fixture
def systemd(tmp_path: Path):
    s = Systemd(tmp_path / "notify")
    yield s
    s.close()


@pytest.mark.slow
async def test_ready_watchdog_from_the_probe_and_stopping(tmp_path: Path, systemd: Systemd) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "600000"}  # 0.6 s: probes every 0.2 s
    d = start(tmp_path, env)
    try:
        with trio.fail_after(20):
            first = await systemd.next()
            assert first == {"STATUS": "starting"}
            ready = await systemd.until("READY")
            assert ready["READY"] == "1" and ready["STATUS"].startswith("ready: http ")
            # By READY, ingest, HTTP and the probe's round trip all worked.
            async with httpx.AsyncClient(base_url=d.url) as client:
                r = await client.get("/readyz")
                assert r.status_code == 200, r.text
                assert r.json()["data_path"]["ok"] is True
                # The probe's workflow is not listed, nor streamed to tenants.
                assert (await client.get("/v1/workflows")).json()["workflows"] == []
            for _ in range(5):
                assert (await systemd.until("WATCHDOG"))["WATCHDOG"] == "1"
            times = [t for t, f in systemd.got if "WATCHDOG" in f]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            assert max(gaps) < 0.6, gaps  # within WatchdogSec, always
            # A stopped process sends nothing; once it runs again, the probe does.
            os.kill(d.proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            await trio.sleep(1.0)
            assert not any(t > stopped + 0.05 for t, f in systemd.got if "WATCHDOG" in f)
            os.kill(d.proc.pid, signal.SIGCONT)
            await systemd.until("WATCHDOG")
            d.proc.send_signal(signal.SIGTERM)
            stopping = await systemd.until("STOPPING")
            assert stopping == {"STOPPING": "1", "STATUS": "draining"}
            assert await trio.to_thread.run_sync(d.proc.wait) == 0
    finally:
        d.stop()


async def test_without_the_probe_the_loop_feeds_the_watchdog(tmp_path: Path, systemd: Systemd) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    d = start(tmp_path, env, service={"probe_interval": 0})
    try:
        with trio.fail_after(20):
            await systemd.until("READY")
            for _ in range(3):
                await systemd.until("WATCHDOG")
            async with httpx.AsyncClient(base_url=d.url) as client:
                body = (await client.get("/readyz")).json()
            assert "data_path" not in body and body["ready"] is True
    finally:
        d.stop()


async def test_no_notify_socket_no_notifications(tmp_path: Path) -> None:
    """Not under systemd: it runs as ever, and /readyz still shows the probe."""
    env = {k: "" for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    d = start(tmp_path, env, service={"probe_interval": 0.2})
    try:
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=d.url) as client:
                body = (await client.get("/readyz")).json()
                assert body["data_path"]["ok"] is True and body["data_path"]["interval"] == 0.2
                r = await client.get("/v1/workflows", params={"tenant": "_broker"})
                assert [w["workflow_id"] for w in r.json()["workflows"]] == ["_broker.probe"]
    finally:
        d.stop()
