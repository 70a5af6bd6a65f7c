"""The audit stream end to end (DESIGN.md §7): the daemon as a subprocess
with JWT auth; facts seen on `GET /v1/audit/stream` and the WebSocket
`audit` subscription, resumed by cursor, one log line each."""

from __future__ import annotations

import itertools
import socket
import time
from typing import Any

import jwt
import trio

from .builders import tick
from .e2e import client_for, module_broker, open_sse, uid, wf_path
from .ws_client import ws_client

SECRET = "audit-test-secret-0123456789abcdef-0123456789abcdef"

daemon = module_broker(auth={"mode": "jwt", "secret": SECRET}, audit={"ring_events": 50})


def bearer(scope: str = "admin", tenant: str = "ops", sub: str = "root") -> dict[str, str]:
    tok = jwt.encode({"sub": sub, "tenant": tenant, "scope": scope, "exp": int(time.time()) + 300}, SECRET, "HS256")
    return {"Authorization": f"Bearer {tok}"}


async def test_admins_watch_security_facts_and_resume(daemon) -> None:
    with trio.fail_after(30):
        async with client_for(daemon) as c:
            async with open_sse(c, "/v1/audit/stream", headers=bearer(scope="subscribe")) as s:
                assert s.status == 403
            path = "/v1/audit/stream?actions=auth.failed,access.denied,connection.opened,admin.connection_closed"
            async with open_sse(c, path, headers=bearer()) as audit:
                assert audit.status == 200
                first = await audit.expect()  # its own connection, opened
                assert first.event == "audit" and first.json["action"] == "connection.opened"
                assert first.json["user"] == "root" and first.json["detail"] == "/v1/audit/stream"
                assert (await c.get("/v1/workflows/x", headers={"Authorization": "Bearer nonsense"})).status_code == 401
                failed = await audit.expect()
                assert failed.json["action"] == "auth.failed" and failed.json["transport"] == "http"
                assert failed.json["remote"] == "127.0.0.1" and "malformed" in failed.json["detail"]
                assert "nonsense" not in failed.data
                r = await c.get("/v1/admin/stats", headers=bearer(scope="subscribe", tenant="acme", sub="ada"))
                assert r.status_code == 403
                denied = await audit.expect()
                assert denied.json["action"] == "access.denied"
                assert (denied.json["user"], denied.json["tenant"]) == ("ada", "acme")  # its token was valid
                # An admin closes a stream: its opening and the close are facts.
                wid = uid("aud")
                pub = bearer(scope="publish", tenant="acme", sub="engine")
                await c.post("/v1/events", json={"workflow_id": wid, "type": "workflow.running"}, headers=pub)
                reader = bearer(scope="subscribe", tenant="acme", sub="ada")
                async with open_sse(c, wf_path(wid), headers=reader) as s:
                    await s.expect()
                    opened = await audit.expect()
                    assert opened.json["action"] == "connection.opened" and opened.json["tenant"] == "acme"
                    conn_id = opened.json["connection"]
                    r = await c.delete(f"/v1/admin/connections/{conn_id}", headers=bearer())
                    assert r.status_code == 202
                    closed = await audit.expect()
                    assert closed.json["action"] == "admin.connection_closed"
                    assert closed.json["connection"] == conn_id and closed.json["user"] == "root"
                    assert await s.rest() == [] or s.eof
            # Resumed from a cursor: exactly what came after it.
            headers = {**bearer(), "Last-Event-ID": failed.id or ""}
            async with open_sse(
                c, "/v1/audit/stream?actions=access.denied,admin.connection_closed", headers=headers
            ) as s:
                got = await s.take(2)
                assert [e.id for e in got] == [denied.id, closed.id]
    assert any('"action":"auth.failed"' in line for line in daemon.lines)


async def test_the_ws_audit_subscription_and_the_ring_bound(daemon) -> None:
    url = daemon.ws_url + "/v1/ws"
    with trio.fail_after(30):
        async with ws_client(url, extra_headers=[(b"Authorization", bearer()["Authorization"].encode())]) as ws:
            await ws.send({"op": "subscribe", "sub": "a", "audit": {"actions": ["auth.failed"], "tenant": None}})
            await ws.roundtrip()
            async with client_for(daemon) as c:
                for _ in range(60):  # more than audit.ring_events
                    await c.get("/v1/admin/stats")
            facts: list[dict[str, Any]] = []
            while len(facts) < 60:
                msg = await ws.next_sub("a")
                facts.extend(msg["events"] if msg.get("kind") == "batch" else [msg])
            assert {f["action"] for f in facts} == {"auth.failed"} and all(f["kind"] == "audit" for f in facts)
            # One fact more, alone in its message: its cursor comes once,
            # beside `sub`, not again inside.
            async with client_for(daemon) as c:
                await c.get("/v1/admin/stats")
            one = await ws.next_sub("a")
            assert one["kind"] == "audit" and one["action"] == "auth.failed"
            frame = next(str(f) for f in reversed(ws.frames) if '"sub":"a"' in str(f))
            assert frame.count('"cursor"') == 1, frame
            # Not an admin: refused for that subscription only.
        async with ws_client(
            url, extra_headers=[(b"Authorization", bearer("subscribe")["Authorization"].encode())]
        ) as ws:
            await ws.send({"op": "subscribe", "sub": "a", "audit": {}})
            assert (await ws.next_sub("a"))["code"] == "permission_denied"
        # An old cursor: the ring kept 50, so a gap says how many were lost.
        async with client_for(daemon) as c:
            epoch = facts[0]["cursor"].split(".")[0]
            async with open_sse(c, "/v1/audit/stream?last_event_id=" + f"{epoch}.1", headers=bearer()) as s:
                gap = await s.expect()
                assert gap.event == "gap" and gap.json["missed"] > 0


async def test_a_consumer_that_stops_reading_is_a_slow_consumer_closed_fact(broker_factory) -> None:
    """A stream whose client stops reading (a raw socket with a 4 KiB
    receive buffer, as in test_backpressure.py) is marked slow after
    `stream.slow_consumer_timeout` (0.5 s here): one `slow_consumer.closed`
    fact with its user, tenant and connection, then its
    `connection.closed` says why (`slow_consumer`)."""
    d = broker_factory(auth={"mode": "jwt", "secret": SECRET}, stream={"slow_consumer_timeout": 0.5})
    wid = uid("sloth")
    d.push({"workflow_id": wid, "type": "workflow.running", "tenant": "acme"})
    facts = "connection.opened,slow_consumer.closed,connection.closed"
    with trio.fail_after(20):
        async with (
            client_for(d) as c,
            open_sse(c, f"/v1/audit/stream?tenant=acme&actions={facts}", headers=bearer()) as audit,
        ):
            assert audit.status == 200
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            with sock:
                await sock.connect(("127.0.0.1", d.port))
                auth = bearer(scope="subscribe", tenant="acme", sub="sloth")["Authorization"]
                await sock.send(f"GET {wf_path(wid)} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n".encode())
                opened = await audit.expect()
                assert (opened.json["action"], opened.json["user"]) == ("connection.opened", "sloth")

                async def pump() -> None:  # 8 KB events until its writes block
                    for i in itertools.count():
                        d.push(*[{**tick(wid, i * 20 + k, 8000), "tenant": "acme"} for k in range(20)])
                        await trio.sleep(0.005)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump)
                    slow = (await audit.expect()).json
                    nursery.cancel_scope.cancel()
            # The socket is closed (reset: unread data): the stream ends.
            closed = (await audit.expect()).json
    assert slow["action"] == "slow_consumer.closed", slow
    assert (slow["user"], slow["tenant"], slow["transport"]) == ("sloth", "acme", "sse")
    assert slow["connection"] == opened.json["connection"] and slow["detail"] == "no write progress for 0.5 s"
    assert closed["action"] == "connection.closed" and closed["connection"] == slow["connection"]
    assert closed["detail"] == "slow_consumer"
    assert not [line for line in d.lines if "Traceback" in line], d.output()
