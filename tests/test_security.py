"""Security end to end (DESIGN.md §7; docs/protocol.md "Authentication"):
the daemon as a subprocess with `auth.mode = "jwt"`, real PyJWT tokens, two
tenants, every read and write path. What one tenant's token can reach of
the other's is nothing: another tenant's workflow answers exactly as an
unknown one."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionClosed

from .e2e import broker_cli, client_for, module_broker, open_sse, uid, wf_path
from .ws_client import ws_client

SECRET = "security-test-secret-0123456789abcdef-0123456789abcdef"
WAIT = 0.5  # stream.unknown_workflow_wait of this module's broker

daemon = module_broker(
    auth={"mode": "jwt", "secret": SECRET, "audience": "broker", "leeway": 0},
    stream={"unknown_workflow_wait": WAIT},
    limits={"per_user": 2},
)


def token(sub: str = "ada", tenant: str = "acme", scope: str = "subscribe", ttl: float = 300, **claims: Any) -> str:
    body = {"sub": sub, "tenant": tenant, "scope": scope, "aud": "broker", "exp": int(time.time() + ttl), **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


PUBLISH = {t: token(sub=f"engine-{t}", tenant=t, scope="publish") for t in ("acme", "globex")}
ADMIN = token(sub="root", tenant="ops", scope="admin")


async def publish(client: httpx.AsyncClient, tenant: str, *events: dict[str, Any]) -> httpx.Response:
    return await client.post("/v1/events", content=orjson.dumps(list(events)), headers=bearer(PUBLISH[tenant]))


async def two_tenants(client: httpx.AsyncClient) -> tuple[str, str]:
    """One running workflow in each tenant: (acme's, globex's)."""
    a, g = uid("acme"), uid("globex")
    for tenant, wid in (("acme", a), ("globex", g)):
        r = await publish(client, tenant, {"workflow_id": wid, "type": "workflow.running"})
        assert r.status_code == 202 and r.json()["accepted"] == 1, r.text
    return a, g


async def test_without_a_valid_token_nothing_but_health_is_served(daemon) -> None:
    with trio.fail_after(20):
        async with client_for(daemon) as c:
            assert (await c.get("/healthz")).status_code == 200
            expired = token(ttl=-60)
            forged = jwt.encode(
                {"sub": "ada", "tenant": "acme", "scope": "admin", "aud": "broker", "exp": int(time.time()) + 60},
                "not-the-secret-but-long-enough-0123456789",
            )
            for headers in ({}, bearer(expired), bearer(forged), bearer("garbage")):
                for method, path in (
                    ("GET", wf_path("x")),
                    ("GET", "/v1/stream?tenant=acme"),
                    ("GET", "/v1/workflows/x"),
                    ("POST", "/v1/events"),
                    ("GET", "/v1/admin/stats"),
                    ("GET", "/v1/admin/connections"),
                ):
                    r = await c.request(method, path, headers=headers, content=b"{}" if method == "POST" else None)
                    assert r.status_code == 401, (method, path, r.status_code, r.text)
                    assert r.json()["error"]["code"] == "unauthenticated"
                    assert r.headers["www-authenticate"].startswith("Bearer")
                    for secret in (SECRET, expired, forged):
                        assert secret not in r.text
            reasons = {
                (await c.get("/v1/workflows/x", headers=bearer(t))).json()["error"]["message"]
                for t in (expired, forged, token(aud="other"))
            }
            assert any("expired" in m for m in reasons), reasons
            assert any("bad signature" in m for m in reasons), reasons
            assert any("audience" in m for m in reasons), reasons


async def test_scopes_gate_every_endpoint(daemon) -> None:
    with trio.fail_after(20):
        async with client_for(daemon) as c:
            a, _ = await two_tenants(c)
            reader = token(scope="subscribe")
            r = await c.post("/v1/events", content=b"{}", headers=bearer(reader))
            assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
            assert (await c.get("/v1/admin/stats", headers=bearer(reader))).status_code == 403
            assert (await c.get(f"/v1/workflows/{a}", headers=bearer(PUBLISH["acme"]))).status_code == 403
            async with open_sse(c, wf_path(a), headers=bearer(PUBLISH["acme"])) as s:
                assert s.status == 403
            assert (await c.get("/v1/admin/stats", headers=bearer(ADMIN))).status_code == 200
            # admin implies the others (its own tenant "ops" sees no acme workflow).
            assert (await c.get(f"/v1/workflows/{a}", headers=bearer(ADMIN))).status_code == 404


async def test_another_tenants_workflow_is_exactly_an_unknown_one(daemon) -> None:
    with trio.fail_after(30):
        async with client_for(daemon) as c:
            a, g = await two_tenants(c)
            mine = bearer(token(tenant="acme"))
            r = await c.get(f"/v1/workflows/{a}", headers=mine)
            assert r.status_code == 200 and r.json()["workflow_id"] == a
            theirs = await c.get(f"/v1/workflows/{g}", headers=mine)
            unknown = await c.get("/v1/workflows/no-such-workflow", headers=mine)
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
            assert theirs.json()["error"]["message"].replace(g, "ID") == unknown.json()["error"]["message"].replace(
                "no-such-workflow", "ID"
            )
            # A stream of it waits like one for an unknown workflow, then 404.
            took = {}
            for name, wid in (("theirs", g), ("unknown", uid("nobody"))):
                began = time.monotonic()
                async with open_sse(c, wf_path(wid), headers=mine) as s:
                    assert s.status == 404
                took[name] = time.monotonic() - began
            assert WAIT <= took["theirs"] < WAIT + 1.5 and WAIT <= took["unknown"] < WAIT + 1.5, took
            async with open_sse(c, wf_path(a), headers=mine) as s:
                assert s.status == 200 and (await s.expect()).event == "snapshot"


async def test_multi_workflow_streams_show_only_the_principals_workflows(daemon) -> None:
    with trio.fail_after(30):
        async with client_for(daemon) as c:
            a, g = await two_tenants(c)
            kid_a, kid_g = uid("acme-kid"), uid("globex-kid")
            # acme's root with a child in each tenant: trees do not cross
            # tenants, so globex's child is not in it (tests/core/test_visibility.py).
            assert (
                await publish(c, "acme", {"workflow_id": kid_a, "type": "workflow.running", "parent_id": a})
            ).status_code == 202
            assert (
                await publish(c, "globex", {"workflow_id": kid_g, "type": "workflow.running", "parent_id": a})
            ).status_code == 202
            mine = bearer(token(tenant="acme"))
            async with open_sse(c, "/v1/stream?tenant=globex", headers=mine) as s:
                assert s.status == 403 and "tenant" in (await s.resp.aread()).decode()
            for query in (f"workflows={a},{g},{kid_g}", "tenant=acme", f"parent={a}"):
                async with open_sse(c, f"/v1/stream?{query}", headers=mine) as s:
                    assert s.status == 200, query
                    want = {a} if query.startswith("workflows") else {a, kid_a}
                    # Live: events of both tenants; only acme's come through.
                    await publish(
                        c,
                        "globex",
                        {"workflow_id": g, "type": "log", "level": "info", "message": "g"},
                        {"workflow_id": kid_g, "type": "log", "level": "info", "message": "kg"},
                    )
                    mark = f"mark {query}"
                    await publish(c, "acme", {"workflow_id": a, "type": "log", "level": "info", "message": mark})
                    got = await s.until(lambda e, mark=mark: e.json.get("message") == mark)
                    snaps = {e.json["workflow_id"] for e in got if e.event == "snapshot"}
                    live = {e.json["workflow_id"] for e in got if e.event != "snapshot"}
                    assert all(e.json["tenant"] == "acme" for e in got if e.event == "snapshot"), query
                    if query.startswith("tenant"):  # every acme workflow of this module's tests
                        assert want <= snaps and not snaps & {g, kid_g}
                    else:
                        assert snaps == want, query
                    assert live == {a}, query


async def test_the_workflows_claim_narrows_within_the_tenant(daemon) -> None:
    with trio.fail_after(30):
        async with client_for(daemon) as c:
            base = uid("claim")
            ids = [f"{base}-x", f"{base}-pre-1", f"{base}-other"]
            for wid in ids:
                assert (await publish(c, "acme", {"workflow_id": wid, "type": "workflow.running"})).status_code == 202
            narrow = bearer(token(tenant="acme", workflows=[ids[0], f"{base}-pre*"]))
            assert (await c.get(f"/v1/workflows/{ids[0]}", headers=narrow)).status_code == 200
            assert (await c.get(f"/v1/workflows/{ids[1]}", headers=narrow)).status_code == 200
            assert (await c.get(f"/v1/workflows/{ids[2]}", headers=narrow)).status_code == 404
            async with open_sse(c, "/v1/stream?workflows=" + ",".join(ids), headers=narrow) as s:
                snaps = await s.take(2)
                assert {e.json["workflow_id"] for e in snaps} == set(ids[:2])


async def test_published_events_take_the_tokens_tenant(daemon) -> None:
    with trio.fail_after(20):
        async with client_for(daemon) as c:
            wid = uid("pub")
            r = await publish(
                c,
                "globex",
                {"workflow_id": wid, "type": "workflow.running"},
                {"workflow_id": uid("pub"), "type": "workflow.running", "tenant": "acme"},
            )
            assert r.status_code == 202
            body = r.json()
            assert body["accepted"] == 1 and [x["reason"] for x in body["rejected"]] == ["tenant_mismatch"]
            assert (await c.get(f"/v1/workflows/{wid}", headers=bearer(token(tenant="acme")))).status_code == 404
            snap = (await c.get(f"/v1/workflows/{wid}", headers=bearer(token(tenant="globex")))).json()
            assert snap["tenant"] == "globex"
            # acme's publisher cannot write into globex's workflow.
            r = await publish(c, "acme", {"workflow_id": wid, "type": "log", "level": "info", "message": "x"})
            assert r.status_code == 400 and r.json()["rejected"][0]["reason"] == "tenant_mismatch"


async def test_tokens_from_the_query_and_the_cookie(daemon) -> None:
    with trio.fail_after(20):
        async with client_for(daemon) as c:
            a, _ = await two_tenants(c)
            tok = token(tenant="acme")
            async with open_sse(c, wf_path(a) + f"?access_token={tok}") as s:
                assert s.status == 200 and (await s.expect()).event == "snapshot"
            async with open_sse(c, wf_path(a), headers={"Cookie": f"broker_token={tok}"}) as s:
                assert s.status == 200 and (await s.expect()).event == "snapshot"


async def test_an_sse_stream_ends_when_its_token_expires_with_its_resume_id(daemon) -> None:
    with trio.fail_after(20):
        async with client_for(daemon) as c:
            a, _ = await two_tenants(c)
            async with open_sse(c, wf_path(a), headers=bearer(token(tenant="acme", ttl=2))) as s:
                assert s.status == 200
                snap = await s.expect()
                await publish(c, "acme", {"workflow_id": a, "type": "log", "level": "info", "message": "before"})
                line = await s.expect()
                assert line.json["message"] == "before"
                err = await s.expect()
                assert err.event == "error" and err.json["code"] == "unauthenticated"
                assert err.id == line.id == err.json["cursor"] and snap.id != line.id
                assert await s.next() is None  # closed
            # Resumed with a fresh token from that id: exactly what came after.
            await publish(c, "acme", {"workflow_id": a, "type": "log", "level": "info", "message": "after"})
            headers = {**bearer(token(tenant="acme")), "Last-Event-ID": err.id}
            async with open_sse(c, wf_path(a), headers=headers) as s:
                assert (await s.expect()).json["message"] == "after"


async def test_websocket_auth_by_first_message_refresh_and_expiry(daemon) -> None:
    url = daemon.ws_url + "/v1/ws"
    with trio.fail_after(30):
        async with client_for(daemon) as c:
            a, g = await two_tenants(c)
        # No token at all: closed 4001 after the wait (here: a wrong first message).
        async with ws_client(url) as ws:
            await ws.send({"op": "subscribe", "sub": "s", "workflow": a})
            msg = await ws.next()
            assert msg["kind"] == "error" and msg["code"] == "unauthenticated"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.next()
            assert closed.value.reason.code == 4001
        # The first message brings the token; then subscriptions follow its tenant.
        async with ws_client(url) as ws:
            await ws.send({"op": "auth", "token": token(tenant="acme", ttl=3)})
            assert (await ws.next())["kind"] == "authenticated"
            await ws.send({"op": "subscribe", "sub": "mine", "workflow": a})
            assert (await ws.next_sub("mine"))["kind"] == "snapshot"
            await ws.send({"op": "subscribe", "sub": "theirs", "workflow": g})
            err = await ws.next_sub("theirs")
            assert err["kind"] == "error" and err["code"] == "not_found"
            await ws.send({"op": "subscribe", "sub": "t", "tenant": "globex"})
            assert (await ws.next_sub("t"))["code"] == "permission_denied"
            # A refresh must keep the user and tenant; a good one extends the life.
            await ws.send({"op": "auth", "token": token(tenant="globex")})
            assert (await ws.next(lambda m: m.get("kind") == "error"))["code"] == "unauthenticated"
            await ws.send({"op": "auth", "token": token(tenant="acme", ttl=4)})
            assert await ws.next(lambda m: m.get("kind") == "authenticated")
            began = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.next()
            assert closed.value.reason.code == 4001
            assert time.monotonic() - began > 2  # the refreshed token, not the first
        # A token in the request works as before.
        async with ws_client(url, extra_headers=[(b"Authorization", f"Bearer {token(tenant='acme')}".encode())]) as ws:
            await ws.send({"op": "subscribe", "sub": "s", "workflow": a})
            assert (await ws.next_sub("s"))["kind"] == "snapshot"


async def test_per_user_limits_count_real_principals(daemon) -> None:
    with trio.fail_after(30):
        async with client_for(daemon) as c:
            a, _ = await two_tenants(c)
            ada, bob = bearer(token(sub="ada-limits")), bearer(token(sub="bob-limits"))
            async with open_sse(c, wf_path(a), headers=ada) as first:
                await first.expect()
                async with open_sse(c, wf_path(a), headers=bob) as other:
                    await other.expect()
                    async with open_sse(c, wf_path(a), headers=ada) as second:
                        await second.expect()
                        async with open_sse(c, wf_path(a), headers=ada) as third:
                            await third.expect()
                            # limits.per_user = 2: ada's oldest goes, bob's stays.
                            assert await first.rest() == [] or first.eof
                            conns = (await c.get("/v1/admin/connections", headers=bearer(ADMIN))).json()
                            users = [x.get("user") for x in conns["connections"]]
                            assert users.count("ada-limits") == 2 and users.count("bob-limits") == 1, users


def test_check_config_reads_the_key_files_and_hides_the_secret(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "public.pem"
    pem.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-0123456789\n")

    def check(auth: str) -> subprocess.CompletedProcess[str]:
        cfg = tmp_path / "b.toml"
        cfg.write_text(f"[auth]\n{auth}\n")
        return broker_cli("check-config", "-c", str(cfg))

    ok = check(f'mode = "jwt"\nsecret = "{SECRET}"')
    assert ok.returncode == 0 and SECRET not in ok.stdout and '"secret": "***"' in ok.stdout
    ok = check(
        f'mode = "jwt"\nalgorithms = ["RS256", "HS256"]\nsecret_file = "{secret_file}"\npublic_key_file = "{pem}"'
    )
    assert ok.returncode == 0, ok.stderr
    for auth, message in (
        ('mode = "jwt"', "no auth.secret"),
        (f'mode = "jwt"\nsecret_file = "{tmp_path}/missing"', "'auth.secret_file': cannot read"),
        (f'mode = "jwt"\nalgorithms = ["RS256"]\npublic_key_file = "{secret_file}"', "not a PEM public key"),
        ('mode = "jwt"\nalgorithms = ["none"]\nsecret = "x"', "unknown algorithm 'none'"),
        (f'mode = "jwt"\nalgorithms = ["RS256"]\njwks_file = "{secret_file}"', "not JSON"),
    ):
        bad = check(auth)
        assert bad.returncode == 2 and message in bad.stderr, (auth, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1


async def test_a_huge_exp_is_refused_not_a_server_error(daemon) -> None:
    with trio.fail_after(10):
        async with client_for(daemon) as c:
            tok = jwt.encode(
                {"sub": "ada", "tenant": "acme", "scope": "admin", "aud": "broker", "exp": 10**400}, SECRET, "HS256"
            )
            r = await c.get("/v1/admin/stats", headers=bearer(tok))
            assert r.status_code == 401 and "exp" in r.json()["error"]["message"]


async def test_a_busy_stream_is_closed_at_its_tokens_expiry_too(broker_factory) -> None:
    """A paced stream always has more to write: the expiry is checked
    between its writes too, not only when it waits."""
    d = broker_factory(
        auth={"mode": "jwt", "secret": SECRET, "audience": "broker", "leeway": 0}, limits={"events_per_second": 5}
    )
    with trio.fail_after(30):
        async with client_for(d) as c:
            wid = uid("busy")
            assert (await publish(c, "acme", {"workflow_id": wid, "type": "workflow.running"})).status_code == 202

            async def flood() -> None:
                for n in range(300):
                    await publish(c, "acme", {"workflow_id": wid, "type": "log", "level": "info", "message": f"{n}"})
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                async with open_sse(c, wf_path(wid), headers=bearer(token(tenant="acme", ttl=2))) as s:
                    began = time.monotonic()
                    events = await s.rest()
                    took = time.monotonic() - began
                nursery.cancel_scope.cancel()
            assert events[-1].event == "error" and events[-1].json["code"] == "unauthenticated"
            assert took < 3.5, took


async def test_websockets_waiting_for_their_auth_message_count_against_the_limit(broker_factory) -> None:
    d = broker_factory(auth={"mode": "jwt", "secret": SECRET, "audience": "broker"}, limits={"global": 2})
    url = d.ws_url + "/v1/ws"
    with trio.fail_after(20):
        async with ws_client(url) as first, ws_client(url) as second, ws_client(url) as third:
            msg = await third.next()
            assert msg["kind"] == "error" and msg["code"] == "unavailable", msg
            # The first two are still waiting for their auth message; one sends it.
            await first.send({"op": "auth", "token": token(tenant="acme")})
            assert (await first.next())["kind"] == "authenticated"
            del second


async def test_control_requests_need_a_control_channel(daemon) -> None:
    with trio.fail_after(10):
        async with client_for(daemon) as c:
            a, _ = await two_tenants(c)
            r = await c.post(f"/v1/workflows/{a}/cancel", content=b"{}", headers=bearer(token(scope="control")))
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
