"""The control channel (DESIGN.md §8) end to end: the daemon as a
subprocess with `control.bind` and JWT auth, an engine as a separate
process subscribed with pyzmq SUB, requests over HTTP and WebSocket."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import jwt
import orjson
import trio

from .conftest import ROOT
from .e2e import client_for, module_broker, uid
from .ws_client import ws_client

SECRET = "control-test-secret-0123456789abcdef-0123456789abcdef"

daemon = module_broker(
    auth={"mode": "jwt", "secret": SECRET},
    control={"bind": "tcp://127.0.0.1:*"},
)

# The engine: SUB to the control socket for one workflow id; prints "ready",
# then each message's topic and body, one JSON line each, until stdin closes.
# Only its main thread touches the socket (a zmq socket is not thread-safe:
# closed from the stdin thread while a recv was in progress, the process
# once failed to exit); the stdin thread only says when to stop.
ENGINE = r"""
import sys, threading, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.SUB)
s.connect(sys.argv[1]); s.setsockopt(zmq.SUBSCRIBE, sys.argv[2].encode())
print("ready", flush=True)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
while not done.is_set():
    if s.poll(50):
        topic, body = s.recv_multipart()
        print(topic.decode() + " " + body.decode(), flush=True)
s.close(0)
ctx.term()
"""


def token(tenant: str = "acme", scope: str = "control subscribe", sub: str = "ada") -> str:
    return jwt.encode({"sub": sub, "tenant": tenant, "scope": scope, "exp": int(time.time()) + 300}, SECRET, "HS256")


def bearer(tenant: str = "acme", scope: str = "control subscribe", sub: str = "ada") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(tenant, scope, sub)}"}


def control_endpoint(d: Any) -> str:
    line = next(line for line in d.lines if "ready http=" in line)
    return line.split(" control=", 1)[1].split()[0]


class Engine:
    """The engine process: its control messages, read in a thread."""

    def __init__(self, endpoint: str, topic: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE, endpoint, topic],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    async def next(self) -> tuple[str, dict[str, Any]]:
        assert self.proc.stdout is not None
        line = await trio.to_thread.run_sync(self.proc.stdout.readline)
        topic, _, body = line.partition(" ")
        return topic, orjson.loads(body)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


async def start_workflow(c: Any, tenant: str = "acme") -> str:
    wid = uid(f"ctl-{tenant}")
    pub = {"Authorization": f"Bearer {token(tenant, 'publish')}"}
    r = await c.post("/v1/events", content=orjson.dumps({"workflow_id": wid, "type": "workflow.running"}), headers=pub)
    assert r.status_code == 202, r.text
    return wid


async def until_received(c: Any, engine: Engine, send: Any) -> tuple[str, dict[str, Any], str]:
    """Send requests (PUB/SUB: the first may go before the subscription
    is in place) until the engine gets one; (topic, body, its request id)."""
    ids: list[str] = []
    got: list[tuple[str, dict[str, Any]]] = []

    async def read() -> None:
        got.append(await engine.next())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        while not got:
            ids.append(await send())
            with trio.move_on_after(0.3):
                while not got:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    topic, body = got[0]
    assert body["request_id"] in ids
    return topic, body, body["request_id"]


async def test_an_http_cancel_reaches_the_engine_as_the_documented_body(daemon) -> None:
    with trio.fail_after(30):
        async with client_for(daemon) as c:
            wid = await start_workflow(c)
            engine = Engine(control_endpoint(daemon), wid)
            try:

                async def cancel() -> str:
                    r = await c.post(
                        f"/v1/workflows/{wid}/cancel", content=b'{"reason": "operator said so"}', headers=bearer()
                    )
                    assert r.status_code == 202, r.text
                    return str(r.json()["request_id"])

                before = time.time()
                topic, body, request_id = await until_received(c, engine, cancel)
                assert topic == wid
                ts = body.pop("ts")
                assert before * 1000 - 1000 <= ts <= time.time() * 1000 + 1000
                assert body == {
                    "type": "cancel",
                    "workflow_id": wid,
                    "task_id": None,
                    "name": None,
                    "data": None,
                    "reason": "operator said so",
                    "requested_by": "ada",
                    "request_id": request_id,
                }
                # A WebSocket signal, with the client's own request id and a task.
                async with ws_client(
                    daemon.ws_url + "/v1/ws", extra_headers=[(b"Authorization", bearer()["Authorization"].encode())]
                ) as ws:
                    await ws.send(
                        {
                            "op": "signal",
                            "workflow": wid,
                            "name": "approve",
                            "data": {"by": "ada", "n": [1, 2]},
                            "task_id": "t-1",
                            "request_id": "client-1",
                        }
                    )
                    ack = await ws.next(lambda m: m.get("kind") in ("ack", "error"))
                    assert ack == {"kind": "ack", "op": "signal", "request_id": "client-1"}
                    topic, body = await engine.next()
                    assert topic == wid and body["type"] == "signal" and body["name"] == "approve"
                    assert body["data"] == {"by": "ada", "n": [1, 2]} and body["task_id"] == "t-1"
                    assert body["request_id"] == "client-1" and body["requested_by"] == "ada"
                    # An error is per request: the connection stays.
                    await ws.send({"op": "cancel", "workflow": uid("nowhere")})
                    err = await ws.next(lambda m: m.get("kind") in ("ack", "error"))
                    assert err["code"] == "not_found"
                    await ws.roundtrip()
                # Its log line names the workflow, findable by id (broker/logs.py).
                line = next(line for line in daemon.lines if f"control cancel of {wid!r}" in line)
                assert line.endswith(f'workflow="{wid}"'), line
            finally:
                engine.close()


async def test_control_requests_are_refused_as_section_8_says(daemon) -> None:
    with trio.fail_after(30):
        async with client_for(daemon) as c:
            wid = await start_workflow(c)
            theirs = await start_workflow(c, "globex")

            async def status(path: str, body: bytes = b"{}", headers: dict[str, str] | None = None) -> tuple[int, str]:
                r = await c.post(path, content=body, headers=bearer() if headers is None else headers)
                return r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else ""

            assert await status(f"/v1/workflows/{wid}/cancel", headers={}) == (401, "unauthenticated")
            assert await status(f"/v1/workflows/{wid}/cancel", headers=bearer(scope="subscribe")) == (
                403,
                "permission_denied",
            )
            other = await status(f"/v1/workflows/{theirs}/cancel")
            unknown = await status(f"/v1/workflows/{uid('nobody')}/cancel")
            assert other == unknown == (404, "not_found")
            assert await status(f"/v1/workflows/{wid}/signal") == (400, "invalid_argument")  # no name
            assert await status(f"/v1/workflows/{wid}/cancel", b'{"name": "x"}') == (400, "invalid_argument")
            assert await status(f"/v1/workflows/{wid}/cancel", b'{"extra": 1}') == (400, "invalid_argument")
            assert await status(f"/v1/workflows/{wid}/cancel", b"[1]") == (400, "invalid_argument")
            assert await status(f"/v1/workflows/{wid}/cancel", b"nope") == (400, "invalid_argument")
            # A body past 128 KiB: refused for what it is, not counted as an ingest reject.
            rejected = (await c.get("/v1/admin/rejected", headers=bearer(scope="admin"))).json()
            big = await c.post(f"/v1/workflows/{wid}/cancel", content=b" " * 131073, headers=bearer())
            assert big.status_code == 400 and big.json()["error"]["message"] == (
                "a control request's body is at most 131072 bytes"
            )
            assert (await c.get("/v1/admin/rejected", headers=bearer(scope="admin"))).json() == rejected
            pub = {"Authorization": f"Bearer {token('acme', 'publish')}"}
            done = orjson.dumps({"workflow_id": wid, "type": "workflow.completed"})
            assert (await c.post("/v1/events", content=done, headers=pub)).status_code == 202
            assert await status(f"/v1/workflows/{wid}/cancel") == (409, "failed_precondition")
            # The rate per principal: bursts of 20, then 429.
            live = await start_workflow(c)
            codes = [(await status(f"/v1/workflows/{live}/cancel", headers=bearer(sub="eager")))[0] for _ in range(30)]
            assert codes[:20] == [202] * 20 and 429 in codes[20:], codes
            assert (await status(f"/v1/workflows/{live}/cancel", headers=bearer(sub="calm")))[0] == 202
