"""Server-Sent Events endpoints (DESIGN.md §5), served as plain ASGI.

Why not a Quart route: a streaming Quart response keeps a request object,
a response object and a nursery of two tasks for the stream's whole life,
and every write goes through its generator. Measured on the bench machine
with 4,000 idle streams: ≈ 31 KB of RSS per stream through Quart, ≈ 20 KB
as a plain ASGI handler on the same Hypercorn. So `http.py` hands the
stream paths to `handle()` here; everything else stays in Quart.

This module only translates: the request's path and query become a
`Subscription` (core/subscribe.py: the same model, checks and errors as
WebSocket), its errors become JSON answers with their status, its reader's
messages become SSE frames. Every decision that can fail (bad filter, bad
cursor, unknown workflow, 204 at the end, connection limit) is made before
the response starts. Then the stream is one task:

    retry + first pull → one write
    loop: what a direct write left over → sent the blocking way
          pull everything pending → one write
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
import math
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio

from ..core import subscribe
from ..core.audit import AuditFilter, AuditReader
from ..core.errors import (
    BrokerError,
    DeadlineExceeded,
    InvalidArgument,
    MethodNotAllowed,
    SlowConsumer,
    Unauthenticated,
)
from ..core.limits import Principal
from ..core.messages import error_body
from ..core.reader import MultiReader, WorkflowReader
from ..core.subscribe import AUDIT
from .asgi import ScopeInfo, path_segments
from .connection import Connection
from .cors import cors_headers, encode_headers
from .direct import DirectSocket
from .hub import Hub

log = logging.getLogger("broker.sse")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
# A stream's connection closes when the stream ends (server/direct.py,
# `end()`); HTTP/1.x clients are told so up front, so none reuses it.
CLOSE = (b"connection", b"close")
JSON = (b"content-type", b"application/json")
ALLOW = (b"allow", b"GET, OPTIONS")
CHALLENGE = (b"www-authenticate", b'Bearer realm="broker"')

_VIEWS = {("stream",): "all", ("tasks", "stream"): "tasks", ("logs", "stream"): "logs"}

MAX_IGNORED_BODY = 65536  # bytes of request body a stream request may carry
KEEPALIVE = b": keepalive\n\n"
# stream.compression: gzip for a client that accepts it (a per-connection
# deflate stream, flushed per write so every message arrives at once).
# Level 6, zlib's default: on event JSON it gives almost all of level 9's
# ratio for a fraction of the CPU.
GZIP_HEADERS = [(b"content-encoding", b"gzip"), (b"vary", b"accept-encoding")]
GZIP_LEVEL = 6


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header takes gzip (not with q=0)."""
    if not accept_encoding:
        return False
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "x-gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


class Gzip:
    """One stream's gzip body: `encode()` each write (flushed: a whole
    message decodes at once), `finish()` the trailer at the end."""

    __slots__ = ("_z",)

    def __init__(self) -> None:
        self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: the gzip container

    def encode(self, data: bytes) -> bytes:
        z = self._z
        return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


AUDIT_VIEW = "audit"  # the view of `/v1/audit/stream` in a stream_target
Reader = WorkflowReader | MultiReader | AuditReader


def stream_target(scope: dict[str, Any]) -> tuple[str | None, str] | None:
    """(workflow id, view) for `/v1/workflows/{id}/stream` (and the tasks
    and logs views), (None, "") for `/v1/stream`, None for any other path.
    The id is its own percent-decoded segment (it may hold a '/')."""
    path = scope["path"]
    if path == "/v1/stream":
        return None, "all"
    if path == "/v1/audit/stream":
        return None, AUDIT_VIEW
    if not path.startswith("/v1/workflows/") or not path.endswith("/stream"):
        return None
    segments = path_segments(scope)
    if len(segments) < 5 or segments[:3] != ["", "v1", "workflows"] or not segments[3]:
        return None
    view = _VIEWS.get(tuple(segments[4:]))
    return None if view is None else (segments[3], view)


def sse_error(err: BrokerError) -> bytes:
    """An `error` message; the stream closes after it (DESIGN.md §5)."""
    return b"event: error\ndata: %s\n\n" % orjson.dumps(error_body(err))


# Sent to a stream whose blocked write went through after it was marked slow.
_SLOW_CONSUMER = sse_error(SlowConsumer("slow consumer: writes made no progress"))


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _body(send: Send, data: bytes) -> None:
    """One chunk of the streaming response, the ordinary way."""
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def handle(hub: Hub, scope: dict[str, Any], receive: Receive, send: Send, target: tuple[str | None, str]) -> None:
    """Serve one request to a stream path; `target` is its `stream_target`."""
    req = ScopeInfo(scope)
    cors = encode_headers(cors_headers(req.headers.get("Origin"), hub.cors_origins))
    if req.method == "OPTIONS":
        await _respond(send, 200, b"", [ALLOW, (b"content-length", b"0"), *cors])
        return
    # Known once its token is verified: a refusal after that (a scope, a
    # limit) is audited with its user and tenant.
    principal: Principal | None = None
    try:
        # Who asks comes first: without a valid token nothing else is looked at.
        principal = hub.principal_of(req.headers, req.args)
        if req.method != "GET":
            raise MethodNotAllowed("The method is not allowed")
        # The request message (a GET has an empty body) comes first; after
        # it, `receive()` returns only when the client disconnects. A body
        # is read and ignored, within bounds: a client must not hold a
        # handler by sending one slowly or endlessly.
        http = hub.config.http
        if await _skip_body(receive, http.body_timeout, http.body_idle_timeout):
            return  # gone before its request body ended
        wid, view = target
        last_event_id = req.headers.get("Last-Event-ID")
        if view == AUDIT_VIEW:
            await _audit_stream(hub, req, principal, last_event_id, receive, send, scope, cors)
            return
        sub = subscribe.from_query(req.args, workflow=wid, view=view, last_event_id=last_event_id)
        # Checked and admitted with no checkpoint in between, so streams
        # opened at the same instant never exceed the limit (and none is
        # admitted once draining); a wait for a workflow not known yet holds
        # its place too.
        hub.check_capacity(principal)
        conn = hub.open_connection("sse", req.remote, req.path, principal)
    except BrokerError as err:
        hub.refused(err, "sse", req.remote, principal)
        headers = [JSON, ALLOW, *cors] if isinstance(err, MethodNotAllowed) else [JSON, *cors]
        if err.status == 401:
            headers.append(CHALLENGE)
        await _respond(send, err.status, orjson.dumps(err.to_json()), headers)
        return
    try:
        try:
            opened = await hub.open_when_known(sub, conn, receive)
        except BrokerError as err:
            hub.refused(err, "sse", conn.remote, conn.principal)
            await _respond(send, err.status, orjson.dumps(err.to_json()), [JSON, *cors])
            return
        if opened.reader is None:
            # Resumed at the end, or everything in scope ended already: 204
            # stops EventSource from reconnecting forever.
            await _respond(send, 204, b"", cors)
            return
        close = [CLOSE] if scope.get("http_version") in ("1.0", "1.1") else []
        gzip = hub.stream.compression and accepts_gzip(req.headers.get("Accept-Encoding"))
        del req  # headers and arguments are not needed while streaming
        await _stream(hub, opened.reader, opened.key, conn, receive, send, [*SSE_HEADERS, *close, *cors], gzip)
    finally:
        hub.close_connection(conn)


async def _audit_stream(
    hub: Hub,
    req: ScopeInfo,
    principal: Principal,
    last_event_id: str | None,
    receive: Receive,
    send: Send,
    scope: dict[str, Any],
    cors: list[tuple[bytes, bytes]],
) -> None:
    """`GET /v1/audit/stream` (admins only, DESIGN §7): the audit log's
    facts as `audit` events, filtered by `actions=`, `tenant=`, `user=`,
    resumed from Last-Event-ID (or `last_event_id=`). Errors raise to the
    caller before anything is sent."""
    subscribe.require(principal, "admin")
    flt = AuditFilter.from_query(req.args)
    cursor = last_event_id if last_event_id is not None else req.args.get("last_event_id")
    hub.check_capacity(principal)
    reader = AuditReader(hub.audit_log, flt, cursor)  # first, so its own opening is its first fact
    conn = hub.open_connection("sse", req.remote, req.path, principal)
    conn.watch(reader)
    try:
        close = [CLOSE] if scope.get("http_version") in ("1.0", "1.1") else []
        gzip = hub.stream.compression and accepts_gzip(req.headers.get("Accept-Encoding"))
        await _stream(hub, reader, AUDIT, conn, receive, send, [*SSE_HEADERS, *close, *cors], gzip)
    finally:
        hub.close_connection(conn)


async def _skip_body(receive: Receive, timeout: float, idle_timeout: float) -> bool:
    """Read the request body to its end and drop it; True if the client
    disconnected. A body larger than MAX_IGNORED_BODY is an
    InvalidArgument; one not complete within `timeout` seconds, or that
    makes no progress for `idle_timeout`, a DeadlineExceeded
    (`http.body_timeout`, `http.body_idle_timeout`)."""
    size = 0
    deadline = trio.current_time() + timeout
    while True:
        message: dict[str, Any] | None = None
        with trio.move_on_at(min(deadline, trio.current_time() + idle_timeout)):
            message = await receive()
        if message is None:
            if trio.current_time() >= deadline:
                raise DeadlineExceeded(f"the request body took longer than {timeout:g} s")
            raise DeadlineExceeded(f"the request body made no progress for {idle_timeout:g} s")
        if message["type"] == "http.disconnect":
            return True
        size += len(message.get("body", b""))
        if size > MAX_IGNORED_BODY:
            raise InvalidArgument(f"a stream request's body is ignored; at most {MAX_IGNORED_BODY} bytes are accepted")
        if not message.get("more_body"):
            return False


class _ClientGone(Exception):
    pass


class _Stream:
    """One SSE stream's state and steps: one slotted object rather than
    closures and their cells (memory that every idle stream holds)."""

    __slots__ = ("hub", "reader", "conn", "send", "multi", "node_epoch", "direct", "final", "end_state", "gzip")

    def __init__(self, hub: Hub, reader: Reader, conn: Connection, send: Send, gzip: Gzip | None = None) -> None:
        self.hub = hub
        self.reader = reader
        self.conn = conn
        self.send = send
        self.multi = isinstance(reader, MultiReader)
        self.node_epoch = hub.node_epoch
        self.direct: DirectSocket | None = None  # once the response has started
        # The `end` message, held back once the reader is done: the client
        # closes on it, so it goes out when the stream may tear down (see
        # `turn_to_end`), after the events before it.
        self.final = b""
        # None: not ended; False: waiting for its turn to end (`Hub.end_later`);
        # True: its turn has come (`release_end`).
        self.end_state: bool | None = None
        self.gzip = gzip  # stream.compression, for a client that accepts gzip

    def encode(self, data: bytes) -> bytes:
        """What goes on the wire for `data` (gzip: the next piece of its body)."""
        return data if self.gzip is None else self.gzip.encode(data)

    def trailer(self) -> bytes:
        """The body's last bytes (gzip: its trailer)."""
        return b"" if self.gzip is None else self.gzip.finish()

    def take(self) -> tuple[bytes, int] | None:
        """Everything pending for this subscriber as one write (and how
        many messages it holds), or None. The `end` that closes the
        stream is kept back in `final`."""
        # Entries and messages of a workflow reader, or an audit reader's facts
        # (those are never in a multi-workflow stream, the only user of sse_multi).
        items: list[Any] = self.reader.pull()
        if not items:
            return None
        if self.reader.done:
            self.final = self._frame(items.pop())
            if not items:
                return None
        if self.multi:
            node_epoch = self.node_epoch
            return b"".join([it.sse_multi(node_epoch) for it in items]), len(items)
        return b"".join([it.sse() for it in items]), len(items)

    def _frame(self, item: Any) -> bytes:
        return item.sse_multi(self.node_epoch) if self.multi else item.sse()

    async def write(self, data: bytes, events: int = 0) -> None:
        """One chunk of the body, with the connection's write bookkeeping."""
        body = self.encode(data)
        await self.conn.write(self.send, {"type": "http.response.body", "body": body, "more_body": True}, events)

    async def open(self, retry_ms: int, direct_writes: bool) -> None:
        """The first write: `retry:` and the snapshot (or the backlog)."""
        taken = self.take()
        prefix = b"retry: %d\n\n" % retry_ms
        await self.write(prefix + taken[0] if taken else prefix, taken[1] if taken else 0)
        if direct_writes:
            # The response has started: its socket can be found.
            self.direct = DirectSocket.attach(self.send)

    async def send_leftover(self) -> None:
        """What a direct write could not send whole, the blocking way."""
        direct = self.direct
        if direct is None:
            return
        if direct.broken:
            self.direct = None  # the ordinary path meets the closed socket
        elif direct.pending:
            await self.conn.write_leftover(direct.flush)

    def on_wake(self, key: str) -> None:
        """The hub's wakeup for this stream's key. While the task runs it
        pulls again before it parks (nothing to do here); while parked,
        write what is new straight to the socket, or hand the stream back
        (no direct socket, bytes left over, the stream ended, closing,
        draining, paced, the socket gone)."""
        conn = self.conn
        if not conn.parked:
            return
        direct = self.direct
        now = trio.current_time()
        if (
            direct is None
            or conn.rate
            or conn.closing
            or self.hub.draining
            or now >= conn.expires_at
            or not direct.ready()
        ):
            conn.hand_back()
            return
        taken = self.take()
        if taken is not None:
            conn.last_write = now
            conn.wrote(taken[1], direct=True)
            if not direct.write(self.encode(taken[0])):
                conn.hand_back()
                return
            self.reader.written()  # all of it is out: caught up
        if self.reader.done and self.end_state is None:
            # Its last events are out; its end waits for its turn, parked.
            self.end_state = False
            self.hub.end_later(self.release_end)

    def release_end(self) -> None:
        """The hub lets this stream end now (`Hub.end_later`)."""
        self.end_state = True
        self.conn.hand_back()

    async def turn_to_end(self, receive: Receive) -> bool:
        """Wait, parked, for the hub to let this ended stream write its
        `end` and tear down (≈ 0.3 ms of broker CPU: the streams still
        open get their events first). False if the client left meanwhile
        (nothing more to write); an admin close or the drain ends the wait."""
        if self.end_state is None:
            self.end_state = False
            self.hub.end_later(self.release_end)
        while self.end_state is not True and not self.conn.closing:
            message = await self.conn.park(math.inf, receive)
            if message is not None and message["type"] == "http.disconnect":
                return False
        return True

    def end_directly(self, final: bytes) -> bool:
        """Write `final` (if any) and end the body on the direct socket
        (server/direct.py `end()`): True if it ended there (or had), what
        it left over pending; then the connection closes instead of being
        kept alive."""
        direct = self.direct
        if direct is None:
            return False
        if direct.ended:
            return True
        if not direct.ready():
            return False
        return direct.end(self.encode(final) + self.trailer() if self.gzip is not None else final)


async def _stream(
    hub: Hub,
    reader: Reader,
    key: str,
    conn: Connection,
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    gzip: bool = False,
) -> None:
    cfg = hub.stream
    if gzip:
        headers = [*headers, *GZIP_HEADERS]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    st = _Stream(hub, reader, conn, send, Gzip() if gzip else None)
    hub.listen(key, st, st.on_wake, subscriber=True)
    slow = expired = False
    try:
        try:
            await hub.fill_history(reader)  # a resume from before the ring: the store's first page
            await st.open(int(cfg.retry_ms), cfg.direct_writes)  # retry_ms is a float (config "nonneg")
            # The loop stays here, not in a method: every nested coroutine
            # frame is memory held by each idle stream.
            while True:
                if trio.current_time() >= conn.expires_at:
                    expired = True  # its token: never left open past it (DESIGN §7), busy or not
                    break
                await st.send_leftover()
                if reader.wants_history:
                    await hub.fill_history(reader)
                taken = st.take()
                if taken is not None:
                    await st.write(*taken)
                    if conn.closing and not hub.draining:
                        break  # an admin closed it: even a busy stream stops
                    await conn.pace(taken[1])
                    continue
                if reader.wants_history:
                    continue  # a page its filter left empty: the next one
                if reader.done or conn.closing:
                    break  # ended, or draining (it flushed first) or closed
                now = trio.current_time()
                # Silence is timed from the last write: wakeups for events
                # this stream filters out must not postpone the keepalive.
                deadline = conn.last_write + cfg.keepalive
                if now >= deadline:
                    await st.write(KEEPALIVE)
                    continue
                message = await conn.park(min(deadline, conn.expires_at), receive)
                if message is not None and message["type"] == "http.disconnect":
                    raise _ClientGone
        except SlowConsumer:
            # The write went through after all: say why we close.
            slow = True
            await _body(send, st.encode(_SLOW_CONSUMER))
        except _ClientGone:
            return
        finally:
            hub.unlisten(key, st)
        # A normal end closes the chunked body (after an error Hypercorn
        # closes the connection instead), written directly when it can be,
        # else the ordinary way. The connection is counted until then, so
        # a drain waits for this last chunk too.
        final = b""
        if expired:
            # With the id to resume from: a client that reconnects with a
            # fresh token and Last-Event-ID misses nothing.
            cursor = reader.resume_cursor
            body = error_body(Unauthenticated("token expired")) | {"cursor": cursor}
            final = b"id: %s\nevent: error\ndata: %s\n\n" % (cursor.encode(), orjson.dumps(body))
        elif reader.done and not slow:
            if not await st.turn_to_end(receive):
                return  # the client left: nothing to end
            final = st.final
        if st.end_directly(final):
            conn.wrote(1 if final else 0, direct=True)
            await st.send_leftover()
            return
        if final:
            await st.write(final, 1)
        await send({"type": "http.response.body", "body": st.trailer(), "more_body": False})
    finally:
        hub.close_connection(conn)
