"""SIGHUP against the daemon as a subprocess: the limits and the log level
of the config file as it is now come into force without dropping a
connection; a file that does not load changes nothing and is counted."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import trio

from .conftest import BASE_SECTIONS, Daemon, write_config
from .e2e import uid
from .test_client import opened


def sections(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    merged = {name: dict(values) for name, values in BASE_SECTIONS.items()}
    for name, values in overrides.items():
        merged.setdefault(name, {}).update(values)
    return merged


async def stats(http: httpx.AsyncClient) -> dict[str, Any]:
    return (await http.get("/v1/admin/stats")).json()


async def reloaded(daemon: Daemon, http: httpx.AsyncClient, count: int) -> dict[str, Any]:
    """SIGHUP, then the stats once the reload is through."""
    daemon.proc.send_signal(signal.SIGHUP)
    while (st := await stats(http))["security"]["reloads"] < count:
        await trio.sleep(0.02)
    return st


async def test_sighup_brings_new_limits_and_log_level_without_dropping_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    write_config(path, sections(limits={"global": 1}))
    daemon = Daemon(path)
    try:
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as http:
            with trio.fail_after(30):
                wid = uid("reload")
                daemon.push({"workflow_id": wid, "type": "workflow.running"})
                async with http.stream("GET", f"/v1/workflows/{wid}/stream") as first:
                    assert first.status_code == 200
                    await opened(daemon)
                    second = await http.get(f"/v1/workflows/{wid}/stream", params={"types": "state", "states": "x"})
                    assert second.status_code == 503, second.text  # limits.global = 1

                    write_config(path, sections(limits={"global": 3, "per_user": 2}, log={"level": "warning"}))
                    st = await reloaded(daemon, http, 1)
                    assert st["in_force"] == {
                        "limits": {"global": 3, "per_user": 2, "per_tenant": 1000, "events_per_second": 0.0},
                        "log_level": "warning",
                    }
                    assert st["security"]["reload_failures"] == 0
                    assert st["connections"]["total"] == 1  # the open stream stays
                    # Now a second stream opens (it ends at once: the workflow ends).
                    async with http.stream("GET", f"/v1/workflows/{wid}/stream") as again:
                        assert again.status_code == 200
                        daemon.push({"workflow_id": wid, "type": "workflow.completed"})
                        body = (await again.aread()).decode()
                    assert "event: end" in body
                    rest = (await first.aread()).decode()
                    assert "event: end" in rest  # the first stream was never dropped

                # A file that does not load: nothing changes, counted as a failure.
                path.write_text("[limits\nglobal = 7\n")
                st = await reloaded(daemon, http, 2)
                assert st["security"]["reload_failures"] == 1
                assert st["in_force"]["limits"]["global"] == 3 and st["in_force"]["log_level"] == "warning"
    finally:
        assert daemon.stop() == 0, daemon.output()
    out = daemon.output()
    assert "reload: keys read again; limits.per_user 5 -> 2; limits.global 1 -> 3; log.level info -> warning" in out
    assert "reload: " in out and "nothing from the file changes" in out
