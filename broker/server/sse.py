"""Server-Sent Events endpoints (DESIGN.md §5).

Every decision that can fail (bad filter, bad cursor, unknown workflow, 204
at the end, connection limit) is made before the response starts, so it is
a JSON error with a status code. The stream itself is an async generator:

    retry + first pull → one write
    loop: pull everything pending → one write; nothing → wait for a wakeup
          (or `stream.keepalive` of silence → `: keepalive`)

Each event's SSE frame is cached on the entry, so a write costs one join of
pre-encoded bytes. The response has no timeout (Quart's default would cut
the stream at 60 s) and `X-Accel-Buffering: no` for proxies. A client that
disconnects cancels the generator; `finally` unregisters it at once.
On shutdown the stream flushes what is pending and closes without `end`:
the workflow did not end, the client reconnects with its cursor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import trio
from quart import Response, request
from quart_trio import QuartTrio

from ..core.errors import BrokerError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ..core.filters import Filter
from ..core.reader import NO_CONTENT, MultiReader, WorkflowReader, plan_multi_start, plan_workflow_start
from ..core.state import Workflow
from .direct import SEND_KEY, DirectSocket
from .hub import JOURNAL, NEW_WORKFLOW, Hub
from .identity import principal_of

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def sse_error(err: BrokerError) -> bytes:
    """An `error` message; the stream closes after it (DESIGN.md §5)."""
    body = orjson.dumps({"kind": "error", "code": err.code, "message": err.message})
    return b"event: error\ndata: %s\n\n" % body


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


def _cursor_args() -> tuple[str | None, str | None]:
    last_event_id = request.headers.get("Last-Event-ID")
    if last_event_id is None:
        last_event_id = request.args.get("last_event_id")
    return last_event_id, request.args.get("since")


def _remote() -> str:
    addr = request.remote_addr
    return str(addr) if addr else ""


def _stream(hub: Hub, reader: WorkflowReader | MultiReader, key: str) -> Response:
    # Registered inside the generator: if the client is gone before the body
    # starts, `finally` would never run for a connection opened out here.
    principal = principal_of(hub.config, request.headers, request.args)
    hub.check_capacity(principal)
    remote, path = _remote(), request.path
    asgi_send = request.scope.get(SEND_KEY) if hub.config.stream.direct_writes else None
    cfg = hub.config.stream
    multi = isinstance(reader, MultiReader)
    node_epoch = hub.state.node_epoch
    delivered = hub.delivered
    counters = hub.counters

    async def body() -> AsyncIterator[bytes]:
        try:
            conn = hub.open_connection("sse", remote, path, principal)
        except BrokerError as err:  # the limit filled up since check_capacity()
            yield sse_error(err)
            return
        conn.wait_key = key
        hub.watch(key)
        direct: DirectSocket | None = None

        def take() -> tuple[bytes, int] | None:
            """Everything pending for this subscriber as one write (and how
            many messages it holds), or None."""
            items = reader.pull()
            if not items:
                return None
            if multi:
                data = b"".join([it.sse_multi(node_epoch) for it in items])
            else:
                data = b"".join([it.sse() for it in items])
            conn.delivered += len(items)
            delivered["sse"] += len(items)
            return data, len(items)

        def deliver() -> bool:
            """Called by the hub while this stream is parked: write what is
            new straight to the socket. False hands the stream back to this
            task (bytes left over, the stream ended, closing, socket gone)."""
            assert direct is not None
            if hub.draining or conn.closing.is_set() or not direct.ready():
                return False
            taken = take()
            if taken is None:
                return not reader.done
            conn.last_write = trio.current_time()
            counters["direct_writes"] += 1
            return direct.write(taken[0]) and not reader.done

        conn.deliver = deliver
        try:
            prefix = b"retry: %d\n\n" % int(cfg.retry_ms)
            conn.last_write = trio.current_time()
            while True:
                if direct is not None and (direct.pending or direct.broken):
                    if direct.broken:
                        direct = None  # the ordinary path meets the closed socket
                        continue
                    # What a direct write left over, sent the blocking way.
                    counters["direct_partial"] += 1
                    conn.write_started = trio.current_time()
                    await direct.flush()
                    conn.write_started = None
                    conn.last_write = trio.current_time()
                    if conn.slow:
                        yield sse_error(ResourceExhausted("slow consumer: writes made no progress"))
                        return
                taken = take()
                if taken is not None:
                    conn.write_started = trio.current_time()
                    yield prefix + taken[0]
                    conn.write_started = None
                    conn.last_write = trio.current_time()
                    if prefix and asgi_send is not None:
                        # The response has started: its socket can be found.
                        direct = DirectSocket.attach(asgi_send)
                    prefix = b""
                    if conn.slow:
                        # The write went through after all: say why we close.
                        yield sse_error(ResourceExhausted("slow consumer: writes made no progress"))
                        return
                    if conn.closing.is_set() and not hub.draining:
                        # An admin closed it: even a busy stream stops.
                        # (Draining sets `closing` too, but flushes first.)
                        return
                    await conn.pace(taken[1])
                    continue
                if prefix:
                    yield prefix
                    conn.last_write = trio.current_time()
                    if asgi_send is not None:
                        direct = DirectSocket.attach(asgi_send)
                    prefix = b""
                    continue
                if reader.done or hub.draining or conn.closing.is_set():
                    return
                # Silence is timed from the last write: wakeups for events
                # this stream filters out must not postpone the keepalive.
                silent_for = trio.current_time() - conn.last_write
                if silent_for >= cfg.keepalive:
                    conn.write_started = trio.current_time()
                    yield b": keepalive\n\n"
                    conn.write_started = None
                    conn.last_write = trio.current_time()
                elif direct is not None and not conn.rate and direct.ready():
                    await hub.park(conn, key, cfg.keepalive - silent_for)
                else:
                    await hub.wait(key, cfg.keepalive - silent_for)
        finally:
            conn.deliver = None
            hub.unwatch(key)
            hub.close_connection(conn)

    response = Response(body(), status=200, headers=SSE_HEADERS)
    response.timeout = None  # type: ignore[assignment]
    return response


def register(app: QuartTrio, hub: Hub) -> None:
    async def workflow_stream(wid: str, view: str) -> Response:
        flt = Filter.parse(request.args, view=view)
        last_event_id, since = _cursor_args()
        if since is not None and last_event_id is None:
            # A malformed since= is a 400 even before the workflow exists.
            if not since.strip().isdigit():
                raise InvalidArgument("'since' must be a non-negative integer sequence number")
        wf = await wait_for_workflow(hub, wid)
        start = plan_workflow_start(wf, last_event_id=last_event_id, since=since)
        if start.mode == NO_CONTENT:
            return Response(b"", status=204)
        reader = WorkflowReader(wf, flt, start, coalesce_after=hub.config.stream.coalesce_after, counters=hub.counters)
        return _stream(hub, reader, wid)

    @app.route("/v1/workflows/<wid>/stream")
    async def stream_all(wid: str) -> Response:
        return await workflow_stream(wid, "all")

    @app.route("/v1/workflows/<wid>/tasks/stream")
    async def stream_tasks(wid: str) -> Response:
        return await workflow_stream(wid, "tasks")

    @app.route("/v1/workflows/<wid>/logs/stream")
    async def stream_logs(wid: str) -> Response:
        return await workflow_stream(wid, "logs")

    @app.route("/v1/stream")
    async def stream_multi() -> Response:
        flt = Filter.parse(request.args)
        args = request.args
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
        last_event_id, since = _cursor_args()
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
        if reader.done:
            # Everything in scope ended already (or behind the cursor): 204
            # stops EventSource from reconnecting forever.
            return Response(b"", status=204)
        return _stream(hub, reader, JOURNAL)
