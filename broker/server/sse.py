"""Server-Sent Events endpoints (DESIGN.md §5), served as plain ASGI.

Why not a Quart route: a streaming Quart response keeps a request object,
a response object and a nursery of two tasks for the stream's whole life,
and every write goes through its generator. Measured on the bench machine
with 4,000 idle streams: ≈ 31 KB of RSS per stream through Quart, ≈ 20 KB
as a plain ASGI handler on the same Hypercorn. So `http.py` hands the
stream paths to `handle()` here; everything else stays in Quart.

Every decision that can fail (bad filter, bad cursor, unknown workflow, 204
at the end, connection limit) is made before the response starts, so it is
a JSON error with a status code. Then the stream is one task:

    retry + first pull → one write
    loop: pull everything pending → one write
          nothing → park: the hub writes new events to the socket itself
          (server/direct.py) and hands the stream back when it must act;
          `stream.keepalive` of silence → `: keepalive`

The parked task waits on the request's ASGI `receive()`, so a client that
disconnects ends the stream at once; the hub hands it back by cancelling
that wait. Each event's SSE frame is cached on the entry: a write is one
join of pre-encoded bytes. On shutdown the stream flushes what is pending
and closes without `end`: the workflow did not end, the client reconnects
with its cursor.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio

from ..core.errors import (
    BrokerError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from ..core.filters import Filter
from ..core.reader import NO_CONTENT, MultiReader, WorkflowReader, plan_multi_start, plan_workflow_start
from ..core.state import Workflow
from .asgi import ScopeInfo, path_segments
from .direct import DirectSocket
from .hub import JOURNAL, NEW_WORKFLOW, Connection, Hub
from .identity import principal_of

log = logging.getLogger("broker.sse")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

_VIEWS = {("stream",): "all", ("tasks", "stream"): "tasks", ("logs", "stream"): "logs"}


def stream_target(scope: dict[str, Any]) -> tuple[str | None, str] | None:
    """(workflow id, view) for `/v1/workflows/{id}/stream` (and the tasks
    and logs views), (None, "") for `/v1/stream`, None for any other path.
    The id is its own percent-decoded segment (it may hold a '/')."""
    path = scope["path"]
    if path == "/v1/stream":
        return None, ""
    if not path.startswith("/v1/workflows/") or not path.endswith("/stream"):
        return None
    segments = path_segments(scope)
    if len(segments) < 5 or segments[:3] != ["", "v1", "workflows"] or not segments[3]:
        return None
    view = _VIEWS.get(tuple(segments[4:]))
    return None if view is None else (segments[3], view)


def sse_error(err: BrokerError) -> bytes:
    """An `error` message; the stream closes after it (DESIGN.md §5)."""
    body = orjson.dumps({"kind": "error", "code": err.code, "message": err.message})
    return b"event: error\ndata: %s\n\n" % body


def cors_headers(origin: str | None, allowed: list[str]) -> list[tuple[str, str]]:
    """CORS response headers for a request from `origin` (http.cors_origins)."""
    if not origin or not allowed or not ("*" in allowed or origin in allowed):
        return []
    return [
        ("Access-Control-Allow-Origin", "*" if "*" in allowed else origin),
        ("Vary", "Origin"),
        ("Access-Control-Allow-Headers", "Content-Type, Authorization, Last-Event-ID"),
        ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
    ]


async def wait_for_workflow(hub: Hub, wid: str) -> Workflow:
    """The workflow, waiting up to `stream.unknown_workflow_wait` for its first event."""
    wf = hub.state.get(wid)
    if wf is None:
        with trio.move_on_after(hub.config.stream.unknown_workflow_wait):
            while (wf := hub.state.get(wid)) is None and not hub.draining:
                await hub.wait(NEW_WORKFLOW, 3600)
    if wf is None:
        if hub.draining:
            raise Unavailable("the broker is shutting down")
        raise NotFound(f"workflow '{wid}' not found")
    return wf


class _Request(ScopeInfo):
    __slots__ = ()

    def cursor_args(self) -> tuple[str | None, str | None]:
        last_event_id = self.headers.get("Last-Event-ID")
        if last_event_id is None:
            last_event_id = self.args.get("last_event_id")
        return last_event_id, self.args.get("since")


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _encode_headers(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]


async def handle(hub: Hub, scope: dict[str, Any], receive: Receive, send: Send, target: tuple[str | None, str]) -> None:
    """Serve one request to a stream path; `target` is its `stream_target`."""
    req = _Request(scope)
    cors = _encode_headers(cors_headers(req.headers.get("Origin"), hub.config.http.cors_origins))
    if req.method == "OPTIONS":
        await _respond(send, 200, b"", [(b"allow", b"GET, OPTIONS"), (b"content-length", b"0"), *cors])
        return
    try:
        if req.method != "GET":
            raise _MethodNotAllowed
        # The request message (a GET has an empty body) comes first; after
        # it, `receive()` returns only when the client disconnects. A body
        # is read and ignored, within bounds: a client must not hold a
        # handler by sending one slowly or endlessly.
        if await _skip_body(receive, float(hub.config.stream.slow_consumer_timeout)):
            return  # gone before its request body ended
        reader, key = await _plan(hub, req, *target)
        principal = principal_of(hub.config, req.headers, req.args)
        hub.check_capacity(principal)
    except _MethodNotAllowed:
        body = orjson.dumps({"error": {"code": "invalid_argument", "message": "The method is not allowed"}})
        headers = [(b"content-type", b"application/json"), (b"allow", b"GET, OPTIONS"), *cors]
        await _respond(send, 405, body, headers)
        return
    except BrokerError as err:
        await _respond(send, err.status, orjson.dumps(err.to_json()), [(b"content-type", b"application/json"), *cors])
        return
    if reader is None:
        # Resumed at the end, or everything in scope ended already: 204
        # stops EventSource from reconnecting forever.
        await _respond(send, 204, b"", cors)
        return
    remote, path = req.remote, req.path
    del req  # headers and arguments are not needed while streaming
    await _stream(hub, reader, key, remote, path, principal, receive, send, cors)


class _MethodNotAllowed(Exception):
    pass


MAX_IGNORED_BODY = 65536  # bytes of request body a stream request may carry


async def _skip_body(receive: Receive, timeout: float) -> bool:
    """Read the request body to its end and drop it; True if the client
    disconnected. A body larger than MAX_IGNORED_BODY is an
    InvalidArgument; one that makes no progress for `timeout` seconds (the
    slow-consumer timeout) a DeadlineExceeded."""
    size = 0
    while True:
        message: dict[str, Any] | None = None
        with trio.move_on_after(timeout):
            message = await receive()
        if message is None:
            raise DeadlineExceeded(f"the request body made no progress for {timeout:g} s")
        if message["type"] == "http.disconnect":
            return True
        size += len(message.get("body", b""))
        if size > MAX_IGNORED_BODY:
            raise InvalidArgument(f"a stream request's body is ignored; at most {MAX_IGNORED_BODY} bytes are accepted")
        if not message.get("more_body"):
            return False


async def _plan(hub: Hub, req: _Request, wid: str | None, view: str) -> tuple[WorkflowReader | MultiReader | None, str]:
    """The reader for this request and its wait key (reader None: 204)."""
    args = req.args
    if wid is not None:
        flt = Filter.parse(args, view=view)
        last_event_id, since = req.cursor_args()
        if since is not None and last_event_id is None:
            # A malformed since= is a 400 even before the workflow exists.
            if not since.strip().isdigit():
                raise InvalidArgument("'since' must be a non-negative integer sequence number")
        wf = await wait_for_workflow(hub, wid)
        start = plan_workflow_start(wf, last_event_id=last_event_id, since=since)
        if start.mode == NO_CONTENT:
            return None, wid
        return WorkflowReader(
            wf, flt, start, coalesce_after=hub.config.stream.coalesce_after, counters=hub.counters
        ), wid
    flt = Filter.parse(args)
    scopes = [k for k in ("workflows", "tenant", "parent") if k in args]
    if len(scopes) != 1:
        raise InvalidArgument("give exactly one of workflows=, tenant=, parent=")
    workflows = None
    if "workflows" in args:
        names = [w.strip() for w in args["workflows"].split(",") if w.strip()]
        if not names:
            raise InvalidArgument("'workflows' must list at least one workflow id")
        workflows = frozenset(names)
    tenant = args.get("tenant")
    parent = args.get("parent")
    if (tenant is not None and not tenant) or (parent is not None and not parent):
        raise InvalidArgument("tenant= and parent= must not be empty")
    last_event_id, since = req.cursor_args()
    start = plan_multi_start(hub.state, last_event_id=last_event_id, since=since)
    reader = MultiReader(
        hub.state,
        flt,
        start,
        workflows=workflows,
        tenant=tenant,
        parent=parent,
        coalesce_after=hub.config.stream.coalesce_after,
        counters=hub.counters,
    )
    return (None if reader.done else reader), JOURNAL


# Sent to a stream whose blocked write went through after it was marked slow.
_SLOW_CONSUMER = sse_error(ResourceExhausted("slow consumer: writes made no progress"))


async def _body(send: Send, data: bytes) -> None:
    """One chunk of the streaming response, the ordinary way."""
    await send({"type": "http.response.body", "body": data, "more_body": True})


class _Stream:
    """One SSE stream's state, as the hub's direct delivery needs it: one
    slotted object rather than closures and their cells (memory that every
    idle stream holds)."""

    __slots__ = ("hub", "reader", "conn", "multi", "node_epoch", "direct")

    def __init__(self, hub: Hub, reader: WorkflowReader | MultiReader, conn: Connection) -> None:
        self.hub = hub
        self.reader = reader
        self.conn = conn
        self.multi = isinstance(reader, MultiReader)
        self.node_epoch = hub.state.node_epoch
        self.direct: DirectSocket | None = None  # once the response has started

    def take(self) -> tuple[bytes, int] | None:
        """Everything pending for this subscriber as one write (and how
        many messages it holds), or None."""
        items = self.reader.pull()
        if not items:
            return None
        if self.multi:
            node_epoch = self.node_epoch
            data = b"".join([it.sse_multi(node_epoch) for it in items])
        else:
            data = b"".join([it.sse() for it in items])
        self.conn.delivered += len(items)
        self.hub.delivered["sse"] += len(items)
        return data, len(items)

    def deliver(self) -> bool:
        """Called by the hub while this stream is parked: write what is
        new straight to the socket. False hands the stream back to its
        task (no direct socket, bytes left over, the stream ended,
        closing, the socket is gone)."""
        direct, conn = self.direct, self.conn
        if direct is None or conn.rate or self.hub.draining or conn.closing or not direct.ready():
            return False  # paced streams (limits.events_per_second) write themselves
        taken = self.take()
        if taken is None:
            return not self.reader.done
        conn.last_write = trio.current_time()
        self.hub.counters["direct_writes"] += 1
        return direct.write(taken[0]) and not self.reader.done


async def _stream(
    hub: Hub,
    reader: WorkflowReader | MultiReader,
    key: str,
    remote: str,
    path: str,
    principal: Any,
    receive: Receive,
    send: Send,
    cors: list[tuple[bytes, bytes]],
) -> None:
    cfg = hub.config.stream
    counters = hub.counters
    await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *cors]})

    try:
        conn = hub.open_connection("sse", remote, path, principal)
    except BrokerError as err:  # the limit filled up since check_capacity()
        await _body(send, sse_error(err))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    conn.wait_key = key
    hub.watch(key)
    st = _Stream(hub, reader, conn)

    conn.deliver = st.deliver
    try:
        try:
            # The stream's loop, inline (not a nested coroutine: every frame
            # is memory held by each idle stream).
            prefix = b"retry: %d\n\n" % int(cfg.retry_ms)
            conn.last_write = trio.current_time()
            while True:
                if st.direct is not None and (st.direct.pending or st.direct.broken):
                    if st.direct.broken:
                        st.direct = None  # the ordinary path meets the closed socket
                        continue
                    # What a direct write left over, sent the blocking way.
                    counters["direct_partial"] += 1
                    conn.write_started = trio.current_time()
                    await st.direct.flush()
                    conn.write_started = None
                    conn.last_write = trio.current_time()
                    if conn.slow:
                        await _body(send, _SLOW_CONSUMER)
                        break
                taken = st.take()
                if taken is not None or prefix:
                    conn.write_started = trio.current_time()
                    await _body(send, prefix + taken[0] if taken is not None else prefix)
                    conn.write_started = None
                    conn.last_write = trio.current_time()
                    if prefix and cfg.direct_writes:
                        # The response has started: its socket can be found.
                        st.direct = DirectSocket.attach(send)
                    prefix = b""
                    if conn.slow:
                        # The write went through after all: say why we close.
                        await _body(send, _SLOW_CONSUMER)
                        break
                    if taken is None:
                        continue
                    if conn.closing and not hub.draining:
                        # An admin closed it: even a busy stream stops.
                        # (Draining sets `closing` too, but flushes first.)
                        break
                    await conn.pace(taken[1])
                    continue
                if reader.done or hub.draining or conn.closing:
                    break
                # Silence is timed from the last write: wakeups for events
                # this stream filters out must not postpone the keepalive.
                silent_for = trio.current_time() - conn.last_write
                if silent_for >= cfg.keepalive:
                    conn.write_started = trio.current_time()
                    await _body(send, b": keepalive\n\n")
                    conn.write_started = None
                    conn.last_write = trio.current_time()
                elif await hub.park(conn, key, cfg.keepalive - silent_for, receive) is None:
                    raise _ClientGone
        except _ClientGone:
            return
        finally:
            conn.deliver = None
            hub.unwatch(key)
        # A normal end closes the chunked body (after an error Hypercorn
        # closes the connection instead). The connection is counted until
        # then, so a drain waits for this last chunk too.
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        hub.close_connection(conn)


class _ClientGone(Exception):
    pass
