"""The HTTP surface: Quart (trio) app with ingest, health and admin routes.

Streams live in sse.py and ws.py; this module builds the app, maps every
`BrokerError` (and Quart's own 404/405) to the JSON error of DESIGN.md §5,
and handles CORS.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..core.control import data_size, parse_request
from ..core.envelope import has_control
from ..core.errors import (
    BrokerError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Reject,
    ShuttingDown,
    Unavailable,
    error_for_status,
)
from ..core.limits import Principal
from ..core.subscribe import require
from . import dashboard
from .asgi import path_segments
from .cors import cors_headers
from .hub import Hub

MAX_CONTROL_BODY = 131072  # bytes of a cancel / signal request's body


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status=status, content_type="application/json")


def error_response(err: BrokerError) -> Response:
    response = json_response(err.to_json(), err.status)
    if err.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="broker"'
    return response


class _BodyRefused(Exception):
    """The request body was not read to its end: answer `err` and close."""

    def __init__(self, err: BrokerError) -> None:
        super().__init__(err.message)
        self.err = err


async def read_body(hub: Hub, limit: int, ingest: bool = True) -> bytes:  # the caller releases len() of it
    """The request body, within bounds (DESIGN §13, docs/protocol.md
    "Limits and timeouts"): at most `limit` bytes (else 400: for `ingest`
    bodies `ingest.max_frame_bytes`, counted as a reject like an oversized
    ZMQ frame; else a control request's own bound), all of it
    within `http.body_timeout` of the request's head and with no pause
    longer than `http.body_idle_timeout` (else 408), and the bodies of all
    requests in progress together within `http.max_pending_body_bytes`
    (else 503). Raises _BodyRefused: the rest is never read, so the
    connection must close. The bytes of the body returned stay counted
    until the caller `release_body_bytes()` them (ingest holds them and
    more)."""
    cfg = hub.config.http
    deadline = trio.current_time() + cfg.body_timeout
    chunks: list[bytes] = []
    size = 0
    body = request.body.__aiter__()
    complete = False
    try:
        while True:
            with trio.move_on_at(min(deadline, trio.current_time() + cfg.body_idle_timeout)) as waited:
                try:
                    chunk = await body.__anext__()
                except StopAsyncIteration:
                    complete = True
                    return b"".join(chunks)
            if waited.cancelled_caught:
                if trio.current_time() >= deadline:
                    raise _BodyRefused(DeadlineExceeded(f"the request body took longer than {cfg.body_timeout:g} s"))
                raise _BodyRefused(
                    DeadlineExceeded(f"the request body made no progress for {cfg.body_idle_timeout:g} s")
                )
            size += len(chunk)
            if size > limit:
                if not ingest:
                    raise _BodyRefused(InvalidArgument(f"a control request's body is at most {limit} bytes"))
                # Count it like an oversized ZMQ frame, without reading the rest.
                hub.state.record_reject(
                    Reject("too_large", f"body over {limit} bytes"), time.time(), "http", b"".join(chunks)
                )
                raise _BodyRefused(InvalidArgument(f"body exceeds ingest.max_frame_bytes ({limit} bytes)"))
            if not hub.hold_body_bytes(len(chunk)):
                raise _BodyRefused(Unavailable("too many request bodies in progress: retry later"))
            chunks.append(chunk)
    finally:
        if not complete:
            hub.release_body_bytes(sum(len(c) for c in chunks))


def create_app(hub: Hub) -> QuartTrio:
    from . import sse, ws  # the streams, served as plain ASGI

    app = QuartTrio("broker")
    # No redirects: `//` in a path is a 404 like any unknown path (werkzeug
    # would answer 308 with an HTML body), every error the JSON of §5.
    app.url_map.merge_slashes = False
    app.url_map.redirect_defaults = False
    app.config["MAX_CONTENT_LENGTH"] = None  # ingest enforces its own limit while reading
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 30
    cors = hub.config.http.cors_origins

    @app.errorhandler(BrokerError)
    async def _broker_error(err: BrokerError) -> Response:
        hub.refused(err, "http", request.remote_addr or "", g.get("principal"))
        return error_response(err)

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException) -> Response:
        # Quart's own 404 (no route), 405, 413: the same JSON as ours.
        return error_response(error_for_status(err.code or 500, err.description or err.name))

    @app.after_request
    async def _cors(response: Response) -> Response:
        for name, value in cors_headers(request.headers.get("Origin"), cors):
            response.headers[name] = value
        return response

    def principal(scope: str) -> Principal:
        """The request's principal, holding `scope` (401 / 403 otherwise)."""
        who = hub.principal_of(request.headers, request.args)
        g.principal = who  # a refusal after this (a scope) is audited with who it was
        require(who, scope)
        return who

    static = dashboard.load()

    def static_response(name: str) -> Response:
        found = static.get(name)
        if found is None:
            raise NotFound(f"no file '{name}'")
        body, content_type = found
        response = Response(body, status=200, content_type=content_type)
        response.headers.update(dashboard.HEADERS)
        return response

    @app.route("/")
    async def dashboard_page() -> Response:
        return static_response("index.html")

    @app.route("/static/<name>")
    async def static_file(name: str) -> Response:
        return static_response(name)

    @app.route("/v1/info")
    async def info() -> Response:
        # No token: what a client (the dashboard) needs before it has one.
        return json_response(
            {
                "version": __version__,
                "node": hub.config.node.id,
                "auth": hub.identity.mode,
                "control": hub.control is not None,
                "store": hub.store is not None,
            }
        )

    @app.route("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.route("/metrics")
    async def metrics() -> Response:
        # No token: it holds counts, never workflow data (labels are bounded).
        body, content_type = hub.metrics.render(request.headers.get("Accept"))
        return Response(body, status=200, content_type=content_type)

    @app.route("/readyz")
    async def readyz() -> Response:
        ready = not hub.draining and bool(hub.ingest_endpoint)
        body: dict[str, Any] = {"ready": ready, "ingest": hub.ingest_endpoint, "draining": hub.draining}
        probe = hub.probe
        if probe is not None:
            # An event through our own ingest and back (server/probe.py).
            body["data_path"] = probe.status()
            if probe.ok is False:
                ready = body["ready"] = False
        if hub.store is not None:
            # Streams go on from memory while the store is down: still ready.
            st = hub.store.statistics()
            body["store"] = st.status
            body["store_queue"] = st.queued
        return json_response(body, 200 if ready else 503)

    @app.route("/v1/events", methods=["POST"])
    async def post_events() -> Response:
        try:
            publisher = principal("publish")
        except BrokerError as err:
            hub.refused(err, "http", request.remote_addr or "", g.get("principal"))
            response = error_response(err)
            response.headers["Connection"] = "close"  # its body is never read
            return response
        if hub.draining:
            # Ingest has stopped: accepting now would lose the events.
            raise ShuttingDown("the broker is shutting down")
        try:
            body = await read_body(hub, hub.state.limits.max_frame_bytes)
        except _BodyRefused as refused:
            response = error_response(refused.err)
            # The rest of the body is never read, so this connection can't
            # carry another request: close it.
            response.headers["Connection"] = "close"
            return response
        durable = request.args.get("durable", "false")
        if durable not in ("true", "false", "1", "0"):
            hub.release_body_bytes(len(body))
            raise InvalidArgument("'durable' must be true or false")
        store = hub.store if durable in ("true", "1") else None
        if durable in ("true", "1") and store is None:
            hub.release_body_bytes(len(body))
            raise InvalidArgument("'durable' needs a store (store.backend = \"postgres\")")
        dropped = store.queue.dropped if store is not None else 0
        first = store.queue.pushed if store is not None else 0
        try:
            result = await hub.ingest_sliced(body, "http", publisher.tenant)
        finally:
            hub.release_body_bytes(len(body))
        if store is not None and (result.accepted or result.duplicates):
            # Group commit: wait for the transaction that holds every entry
            # queued so far (ours among them), shared with concurrent ones.
            if store.queue.dropped != dropped:
                raise Unavailable("the store's spill queue is full: not stored")
            if not await store.wait_committed(store.queue.pushed, first):
                timeout = store.config.durable_timeout
                raise Unavailable(f"not stored: not committed within store.durable_timeout ({timeout:g} s), or refused")
        rejected = [{"index": i, "reason": r.reason, "message": r.detail} for i, r in result.rejected]
        whole_body = len(result.rejected) == 1 and result.rejected[0][1].reason in ("invalid_json", "too_large")
        if whole_body:
            raise InvalidArgument(f"body is not a JSON event or array of events: {result.rejected[0][1].detail}")
        payload = {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": rejected}
        status = 202 if result.accepted or result.duplicates or not rejected else 400
        return json_response(payload, status)

    def workflow_path(action: str) -> str:
        """The workflow id of /v1/workflows/{id}[/{action}], from the raw
        path: an id is one percent-encoded segment and may hold a '/'
        (%2F), which the decoded path the routes match cannot tell from a
        separator. NotFound if the raw path is another one (an id ending
        in "%2Fhistory" is no history request)."""
        segments = path_segments(request.scope)
        if len(segments) != (5 if action else 4) or (action and segments[4] != action) or not segments[3]:
            raise NotFound(f"no such path: {request.path[:200]}")
        wid = segments[3]
        if has_control(wid):  # no workflow id holds one (the envelope refuses them)
            raise NotFound("workflow ids hold no control characters")
        return wid

    @app.route("/v1/workflows/<path:wid>")
    async def get_workflow(wid: str) -> Response:
        segments = path_segments(request.scope)
        if len(segments) == 5 and segments[4] == "history":  # /{id}/history, routed here by its %2F
            return await workflow_history(wid)
        wid = workflow_path("")
        reader = principal("subscribe")
        wf = hub.state.get(wid)
        if wf is None or not reader.may_see(wf.tenant, wf.id):  # another tenant's: as unknown
            raise NotFound(f"workflow '{wid}' not found")
        return json_response(wf.snapshot.to_message("snapshot", wf.epoch))

    @app.route("/v1/workflows")
    async def list_workflows() -> Response:
        who = principal("subscribe")
        return json_response(await hub.list_workflows(who, request.args))

    @app.route("/v1/workflows/<path:wid>/history")
    async def workflow_history(wid: str) -> Response:
        if len(path_segments(request.scope)) == 4:  # /{id} with an id ending in %2Fhistory
            return await get_workflow(wid)
        wid = workflow_path("history")
        who = principal("subscribe")
        body = await hub.history(who, wid, request.args)
        return Response(body, status=200, content_type="application/json")

    @app.route("/v1/workflows/<path:wid>/cancel", methods=["POST"])
    async def cancel_workflow(wid: str) -> Response:
        return await control_request("cancel", wid)

    @app.route("/v1/workflows/<path:wid>/signal", methods=["POST"])
    async def signal_workflow(wid: str) -> Response:
        return await control_request("signal", wid)

    async def control_request(kind: str, wid: str) -> Response:
        """DESIGN §8: 202 with the request id once published."""
        wid = workflow_path(kind)
        try:
            who = hub.principal_of(request.headers, request.args)
            body = await read_body(hub, MAX_CONTROL_BODY, ingest=False)
        except (BrokerError, _BodyRefused) as exc:
            err = exc.err if isinstance(exc, _BodyRefused) else exc
            hub.refused(err, "http", request.remote_addr or "", g.get("principal"))
            response = error_response(err)
            response.headers["Connection"] = "close"  # its body was not read to its end
            return response
        try:
            fields = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            raise InvalidArgument("the body must be a JSON object") from None
        finally:
            hub.release_body_bytes(len(body))
        if not isinstance(fields, dict):
            raise InvalidArgument("the body must be a JSON object")
        req = parse_request(kind, wid, fields, data_size(fields))
        request_id = await hub.request_control(who, req, request.remote_addr or "")
        return json_response({"request_id": request_id}, 202)

    @app.route("/v1/admin/rejected")
    async def admin_rejected() -> Response:
        principal("admin")
        st = hub.state
        return json_response(
            {"total": st.counters["rejected"], "by_reason": dict(st.rejected_by_reason), "recent": list(st.rejects)}
        )

    @app.route("/v1/admin/stats")
    async def admin_stats() -> Response:
        principal("admin")
        return json_response(hub.stats())

    @app.route("/v1/admin/connections")
    async def admin_connections() -> Response:
        principal("admin")
        return json_response({"connections": [c.to_json() for c in hub.connections.values()]})

    @app.route("/v1/admin/connections/<int:conn_id>")
    async def admin_connection(conn_id: int) -> Response:
        principal("admin")
        conn = hub.connections.get(conn_id)
        if conn is None:
            raise NotFound(f"no connection {conn_id}")
        return json_response(conn.to_json())

    @app.route("/v1/admin/connections/<int:conn_id>", methods=["DELETE"])
    async def admin_close_connection(conn_id: int) -> Response:
        admin = principal("admin")
        target = hub.connections.get(conn_id)
        if target is None or not hub.kick(conn_id):
            raise NotFound(f"no connection {conn_id}")
        hub.audit(
            "admin.connection_closed",
            user=admin.user,
            tenant=admin.tenant,
            transport=target.transport,
            remote=request.remote_addr,
            connection=conn_id,
            detail=f"of {target.principal.user or 'anonymous'} from {target.remote}",
        )
        return json_response({"closing": conn_id}, 202)

    quart_asgi = app.asgi_app

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        # Streams are plain ASGI, lighter per connection (SSE also writes
        # to its socket directly: see sse.py and direct.py).
        target = sse.stream_target(scope) if scope["type"] == "http" else None
        if target is None and not (scope["type"] == "websocket" and scope["path"] == "/v1/ws"):
            await quart_asgi(scope, receive, send)
            return
        began = trio.current_time()
        try:
            if target is not None:
                await sse.handle(hub, scope, receive, send, target)
            else:
                await ws.handle(hub, scope, receive, send)
        finally:
            hub.stream_request_ended(began)

    app.asgi_app = asgi_app  # type: ignore[method-assign]
    return app
