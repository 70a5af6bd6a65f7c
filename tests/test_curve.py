"""CURVE on the ZMQ ingest and SIGHUP key reloads (DESIGN.md §7), end to
end: real certificates from `broker keygen`, engines as separate processes
(`broker push` with CURVE keys), the daemon as a subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import trio

from .conftest import ROOT
from .e2e import broker_cli, poll, uid


def keygen(name: str, directory: Path, tenant: str | None = None) -> tuple[Path, Path]:
    out = broker_cli("keygen", name, str(directory), *(["--tenant", tenant] if tenant else []))
    assert out.returncode == 0, out.stderr
    return directory / f"{name}.key", directory / f"{name}.key_secret"


async def push(
    daemon: Any, secret: Path | None, server_key: Path | None, *events: dict[str, Any], refused: bool = False
) -> None:
    """An engine process pushing `events` (with CURVE keys when given);
    `refused`: the broker must not take them (the push gives up)."""
    # A refused engine waits 1 s; an accepted one has time for the handshake on a loaded machine.
    timeout = "1" if refused else "10"
    args = [sys.executable, "-m", "broker", "push", "--endpoint", daemon.zmq, "--timeout", timeout]
    if secret is not None and server_key is not None:
        args += ["--curve-secret", str(secret), "--curve-server-key", str(server_key)]
    stdin = b"".join(orjson.dumps(e) + b"\n" for e in events)
    proc = await trio.run_process(args, cwd=ROOT, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    if refused:
        assert proc.returncode == 1 and "no broker at" in proc.stderr.decode(), proc.stderr.decode()
    else:
        assert proc.returncode == 0, proc.stderr.decode()


async def stats(c: httpx.AsyncClient) -> dict[str, Any]:
    return (await c.get("/v1/admin/stats")).json()


async def workflow(c: httpx.AsyncClient, wid: str) -> dict[str, Any] | None:
    r = await c.get(f"/v1/workflows/{wid}")
    return r.json() if r.status_code == 200 else None


@pytest.mark.slow
async def test_only_known_engines_get_in_and_certificates_bind_tenants(tmp_path: Path, broker_factory) -> None:
    server_dir, clients, engines = tmp_path / "server", tmp_path / "clients", tmp_path / "engines"
    server_pub, server_secret = keygen("broker", server_dir)
    acme_pub, acme_secret = keygen("acme-engine", engines, tenant="acme")
    free_pub, free_secret = keygen("free-engine", engines)
    _, stranger_secret = keygen("stranger", engines)
    clients.mkdir()
    for pub in (acme_pub, free_pub):
        (clients / pub.name).write_bytes(pub.read_bytes())
    daemon = broker_factory(ingest={"curve_secret_file": str(server_secret), "curve_clients_dir": str(clients)})
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=daemon.url) as c:
            st = await stats(c)
            assert st["security"]["zmq_curve"] is True and st["security"]["zmq_auth_failures"] == 0
            a, bad, free, stranger, plain = uid("acme"), uid("bad"), uid("free"), uid("stranger"), uid("plain")
            await push(
                daemon,
                acme_secret,
                server_pub,
                {"workflow_id": a, "type": "workflow.running"},
                {"workflow_id": bad, "type": "workflow.running", "tenant": "globex"},
            )
            await push(daemon, free_secret, server_pub, {"workflow_id": free, "type": "workflow.running"})
            snap = await poll(lambda: workflow(c, a), 10)
            assert snap["tenant"] == "acme"  # forced by its certificate
            assert (await poll(lambda: workflow(c, free), 10))["tenant"] == "default"
            rej = (await c.get("/v1/admin/rejected")).json()
            assert rej["by_reason"].get("tenant_mismatch") == 1, rej
            assert await workflow(c, bad) is None
            # An unknown key is refused in the handshake, counted; so is no CURVE at all.
            await push(
                daemon, stranger_secret, server_pub, {"workflow_id": stranger, "type": "workflow.running"}, refused=True
            )
            await poll(lambda: _failures_at_least(c, 1), 10)
            await push(daemon, None, None, {"workflow_id": plain, "type": "workflow.running"}, refused=True)
            marker = uid("marker")
            await push(daemon, free_secret, server_pub, {"workflow_id": marker, "type": "workflow.running"})
            await poll(lambda: workflow(c, marker), 10)
            assert await workflow(c, stranger) is None and await workflow(c, plain) is None

            # SIGHUP: the stranger's certificate is added, acme's removed.
            (clients / "stranger.key").write_bytes((engines / "stranger.key").read_bytes())
            (clients / acme_pub.name).unlink()
            daemon.proc.send_signal(signal.SIGHUP)
            await poll(lambda: _reloads_at_least(c, 1), 10)
            later = uid("stranger")
            await push(daemon, stranger_secret, server_pub, {"workflow_id": later, "type": "workflow.running"})
            assert (await poll(lambda: workflow(c, later), 10))["tenant"] == "default"
            before = (await stats(c))["security"]["zmq_auth_failures"]
            gone = uid("acme")
            await push(daemon, acme_secret, server_pub, {"workflow_id": gone, "type": "workflow.running"}, refused=True)
            await poll(lambda: _failures_at_least(c, before + 1), 10)
            assert await workflow(c, gone) is None
            # A reload that cannot read the directory keeps the keys in force.
            clients.rename(tmp_path / "elsewhere")
            daemon.proc.send_signal(signal.SIGHUP)
            await poll(lambda: _reloads_at_least(c, 2), 10)
            st = (await stats(c))["security"]
            assert st["reload_failures"] == 1
            kept = uid("stranger")
            await push(daemon, stranger_secret, server_pub, {"workflow_id": kept, "type": "workflow.running"})
            await poll(lambda: workflow(c, kept), 10)
    assert "the CURVE keys in force stay" in daemon.output()


async def _failures_at_least(c: httpx.AsyncClient, n: int) -> bool:
    return (await stats(c))["security"]["zmq_auth_failures"] >= n


async def _reloads_at_least(c: httpx.AsyncClient, n: int) -> bool:
    return (await stats(c))["security"]["reloads"] >= n


def jwt_for(secret: str, **claims: Any) -> str:
    body = {"sub": "ada", "tenant": "acme", "scope": "admin", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, secret, algorithm="HS256")


async def test_sighup_reloads_the_jwt_keys_without_dropping_a_stream(tmp_path: Path, broker_factory) -> None:
    secret_file = tmp_path / "jwt.secret"
    old, new = "old-secret-0123456789abcdef0123456789abcdef", "new-secret-0123456789abcdef0123456789abcdef"
    secret_file.write_text(old + "\n")
    daemon = broker_factory(auth={"mode": "jwt", "secret_file": str(secret_file)})
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=daemon.url) as c:

            def auth(secret: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {jwt_for(secret)}"}

            wid = uid("hup")
            r = await c.post(
                "/v1/events", content=orjson.dumps({"workflow_id": wid, "type": "workflow.running"}), headers=auth(old)
            )
            assert r.status_code == 202
            async with c.stream("GET", f"/v1/workflows/{wid}/stream", headers=auth(old)) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()

                async def until(text: str) -> None:
                    async for line in lines:
                        if text in line:
                            return

                await until("event: snapshot")
                secret_file.write_text(new + "\n")
                daemon.proc.send_signal(signal.SIGHUP)
                await poll(lambda: _reloads_ok(c, new), 10)
                assert (await c.get("/v1/admin/stats", headers=auth(old))).status_code == 401
                # The stream opened with the old key is still served.
                r = await c.post(
                    "/v1/events",
                    headers=auth(new),
                    content=orjson.dumps(
                        {"workflow_id": wid, "type": "log", "level": "info", "message": "after reload"}
                    ),
                )
                assert r.status_code == 202
                await until("after reload")
                # A broken reload (no secret file) keeps the new key.
                secret_file.unlink()
                daemon.proc.send_signal(signal.SIGHUP)
                await poll(lambda: _reload_failed(c, new), 10)
                assert (await c.get("/v1/admin/stats", headers=auth(new))).status_code == 200
    assert "the JWT keys in force stay" in daemon.output()


async def _reloads_ok(c: httpx.AsyncClient, secret: str) -> bool:
    r = await c.get("/v1/admin/stats", headers={"Authorization": f"Bearer {jwt_for(secret)}"})
    return r.status_code == 200 and r.json()["security"]["reloads"] >= 1


async def _reload_failed(c: httpx.AsyncClient, secret: str) -> bool:
    r = await c.get("/v1/admin/stats", headers={"Authorization": f"Bearer {jwt_for(secret)}"})
    return r.status_code == 200 and r.json()["security"]["reload_failures"] >= 1


@pytest.mark.slow
def test_curve_config_errors_are_one_line(tmp_path: Path) -> None:
    _, secret = keygen("broker", tmp_path / "server")
    public_only = tmp_path / "server" / "broker.key"

    def run(ingest: str) -> subprocess.CompletedProcess[str]:
        cfg = tmp_path / "b.toml"
        cfg.write_text(f'[ingest]\nzmq_bind = "tcp://127.0.0.1:*"\n{ingest}\n[http]\nbind = "127.0.0.1:0"\n')
        return broker_cli("run", "-c", str(cfg))

    for ingest, message in (
        (f'curve_secret_file = "{secret}"', "needs both ingest.curve_secret_file and ingest.curve_clients_dir"),
        (f'curve_secret_file = "{public_only}"\ncurve_clients_dir = "{tmp_path}"', "holds no secret key"),
        (f'curve_secret_file = "{secret}"\ncurve_clients_dir = "{tmp_path}/none"', "is not a directory"),
    ):
        out = run(ingest)
        assert out.returncode == 2 and message in out.stderr, (ingest, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


def test_keygen_writes_a_private_secret_and_a_tenant_in_the_public_certificate(tmp_path: Path) -> None:
    from broker.server.curve import load_clients

    pub, secret = keygen("e1", tmp_path, tenant="acme")
    assert secret.stat().st_mode & 0o777 == 0o600
    assert load_clients("x", str(tmp_path)) != {}
    assert list(load_clients("x", str(tmp_path)).values()) == ["acme"]
    bad = broker_cli("keygen", "e2", str(tmp_path), "--tenant", "a\nb")
    assert bad.returncode == 2 and "--tenant" in bad.stderr
