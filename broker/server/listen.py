"""The HTTP listener: accept, a socket budget, and Hypercorn per connection.

Hypercorn's own `worker_serve` accepts through trio's `serve_listeners`,
which on EMFILE logs a traceback per attempt and retries every 100 ms, and
holds no count of open sockets. Here the broker runs the accept loop
itself and hands each socket to Hypercorn's `TCPServer`:

- Every accepted socket counts toward a budget (`SocketBudget`, sized from
  RLIMIT_NOFILE at start: run.py). At the budget, accepting pauses until a
  socket closes: new connections wait in the kernel's backlog instead of
  the process running out of file descriptors. If accept fails anyway
  (EMFILE/ENFILE, other processes), it pauses and logs once per interval.
- `BrokerTCPServer` fixes two ways Hypercorn 0.18 (pinned) keeps a socket
  it is done with: its close after a response that ends the connection
  (`Connection: close`, HTTP/1.0) runs in the request's task, which Quart
  cancels as the response completes, so the close never happens and the
  socket stays open until the client leaves; and a client's EOF on an idle
  connection waits for the keep-alive timer to expire (CLOSE-WAIT for
  `keep_alive_timeout`). Its close is shielded, and EOF stops the timer.
- Errors Hypercorn answers itself (a malformed request: 400; headers too
  large: 431) carry the JSON body of DESIGN.md §5 like every other error.
- HTTP/1.1 only: no cleartext HTTP/2 (`_http11_only`).
- A WebSocket message over the size limit closes the connection at once
  (`_ws_events_then_close`).

The keep-alive timer (`http.idle_timeout`) is also the header deadline: it
runs from accept until a request's head is complete, so a client that
sends its headers a byte at a time is closed when it expires.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Event, Updated
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from wsproto.connection import ConnectionState as WsState

from ..core.errors import error_for_status
from ..core.limits import SocketBudget

log = logging.getLogger("broker.http")

# accept() errors that mean "no file descriptor (or memory) right now".
_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors about one connection that went away or failed before it
# was taken (accept(2): pending network errors are passed on): skipped.
# The same set trio's own listener skips.
_GONE = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
ACCEPT_PAUSE = 0.1  # seconds accept waits after a capacity error
ACCEPT_LOG_EVERY = 10.0  # seconds between log lines about failing accepts


class BrokerTCPServer(TCPServer):
    """Hypercorn's connection server, closing what it is done with at once."""

    _reader_done = False

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            # The client closed (or the socket did): the keep-alive timer
            # must not hold the connection open until it expires.
            self._reader_done = True
            with trio.CancelScope(shield=True):
                await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        # A response that ends after the client closed: h11 may still see
        # both sides done (the close not read yet) and recycle the
        # connection for a next request, starting the keep-alive timer —
        # after the reader above has stopped it and ended. Nothing can come
        # on a connection whose reader is gone: no timer, and the server
        # closes it now (≈ 1 in 200 one-request connections of the stream
        # path waited http.idle_timeout for it, measured).
        if isinstance(event, Updated):
            if event.idle and self._reader_done:
                return
            # The keep-alive timer is (re)started from the request's task,
            # which may be cancelled right then (Quart ends its handler
            # tasks as the response completes): unshielded, the restart
            # was cancelled and a connection kept alive after a response
            # was never closed (nor one sending its next head a byte at a
            # time), however long http.idle_timeout.
            with trio.CancelScope(shield=True):
                await super().protocol_send(event)
            return
        await super().protocol_send(event)

    async def _close(self) -> None:
        # Called from the request's task too, which may be cancelled right
        # then (Quart ends its handler tasks as the response completes).
        with trio.CancelScope(shield=True):
            await super()._close()


async def _json_error_response(self: H11Protocol, status_code: int) -> None:
    """Hypercorn's answer to a request h11 could not parse, with our JSON."""
    err = error_for_status(status_code, h11_reason(status_code))
    body = orjson.dumps(err.to_json())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


def h11_reason(status_code: int) -> str:
    if status_code == 431:
        return "request headers too large"
    if status_code == 400:
        return "malformed HTTP request"
    return f"HTTP error {status_code}"


async def _http11_only(self: H11Protocol, event: h11.Request) -> None:
    """The broker speaks HTTP/1.1 (behind a proxy, h2 ends at the proxy):
    no switch to cleartext HTTP/2, by `Upgrade: h2c` or by the h2
    preface. Hypercorn's HTTP/2 connection would have no idle timer (a
    preface followed by silence stayed open for good) and no stream
    limits of ours; the request is answered in HTTP/1.1 instead (the
    preface as an unknown path, then a malformed request: 404, close)."""


_ws_handle_events = WSStream._handle_events


async def _ws_events_then_close(self: WSStream) -> None:
    """After a close Hypercorn sent itself (1009: a message over
    `websocket_max_message_size`), end the stream now: Hypercorn would
    wait for the client's close frame, and neither the socket nor the
    session would end until the session's ping timeout (40 s)."""
    await _ws_handle_events(self)
    if not self.closed and self.connection.state is WsState.LOCAL_CLOSING:
        await self.send(StreamClosed(stream_id=self.stream_id))


_ws_accept = WSStream._accept


async def _ws_accept_deflate_if_allowed(self: WSStream, message: Any) -> None:
    """Hypercorn accepts permessage-deflate whenever the client offers it;
    the broker only with `stream.compression` (the Hypercorn config's
    `broker_ws_deflate`, set by run.py): otherwise the offer is declined,
    as RFC 7692 lets a server do (the handshake answers without it)."""
    if not getattr(self.config, "broker_ws_deflate", True):
        self.handshake.extensions = None
    await _ws_accept(self, message)


# Module state of Hypercorn's, replaced once on import (checked by
# tests/test_hardening.py against the pinned version).
H11Protocol._send_error_response = _json_error_response  # type: ignore[method-assign]
H11Protocol._check_protocol = _http11_only  # type: ignore[method-assign]
WSStream._handle_events = _ws_events_then_close  # type: ignore[method-assign]
WSStream._accept = _ws_accept_deflate_if_allowed  # type: ignore[method-assign]


class _AcceptLog:
    """At most one line per ACCEPT_LOG_EVERY about failing accepts."""

    def __init__(self) -> None:
        self.last = -ACCEPT_LOG_EVERY
        self.failed = 0

    def failure(self, exc: OSError, now: float) -> None:
        self.failed += 1
        if now - self.last >= ACCEPT_LOG_EVERY:
            log.warning(
                "accept failed %d time(s) in the last %.0fs (%s): pausing accept",
                self.failed,
                now - self.last if self.last > 0 else 0,
                errno.errorcode.get(exc.errno or 0, exc.strerror),
            )
            self.last, self.failed = now, 0


class Acceptor:
    """The accept loop over a listening socket (anything with an async
    `accept()` returning `(socket, address)`): within `budget`, pausing on
    capacity errors (logged by `_AcceptLog`), handing each socket to
    `start(socket)`; `closed()` when one of them ends."""

    def __init__(self, listener: Any, budget: SocketBudget, start: Callable[[Any], None]) -> None:
        self.listener = listener
        self.budget = budget
        self.start = start
        self.log = _AcceptLog()
        self._room = trio.Event()

    def closed(self) -> None:
        self.budget.closed()
        self._room.set()

    async def _wait_room(self) -> None:
        self._room = trio.Event()
        await self._room.wait()

    async def run(self) -> None:
        budget = self.budget
        while True:
            while not budget.has_room():
                await self._wait_room()
            try:
                conn, _ = await self.listener.accept()
            except OSError as exc:
                if exc.errno in _CAPACITY:
                    self.log.failure(exc, trio.current_time())
                    with trio.move_on_after(ACCEPT_PAUSE):
                        await self._wait_room()  # a socket closing ends the pause early
                    continue
                if exc.errno in _GONE:
                    continue  # the client went away before we took it
                raise
            budget.opened()
            self.start(conn)


async def serve_http(
    app: Any,
    hc: HypercornConfig,
    sock: socket.socket,
    budget: SocketBudget,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on the bound, listening `sock` until `shutdown_trigger`
    returns; then stop accepting and give open connections
    `hc.graceful_timeout` seconds."""
    context = WorkerContext(None)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(app, hc, lifespan_state)
    listener = trio.socket.from_stdlib_socket(sock)
    acceptor: Acceptor

    streams: set[trio.SocketStream] = set()  # every connection still open

    async def one(conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        streams.add(stream)
        try:
            # (Typed for TLS streams; a plain SocketStream is what it serves here.)
            server = BrokerTCPServer(app, hc, context, ConnectionState(lifespan_state.copy()), stream)  # type: ignore[arg-type]
            await server
        finally:
            streams.discard(stream)
            acceptor.closed()
            await trio.aclose_forcefully(stream)

    async def abort_at(deadline: float) -> None:
        """At the graceful deadline (or when cancelled), shut down every
        socket still open. Hypercorn's `send_all` is shielded from
        cancellation, so a response whose client stopped reading would
        otherwise hold the shutdown until the kernel gave up on it
        (TCP_USER_TIMEOUT: tens of seconds past shutdown_timeout)."""
        try:
            await trio.sleep_until(deadline)
        finally:
            for stream in list(streams):
                with contextlib.suppress(OSError):
                    stream.socket.shutdown(socket.SHUT_RDWR)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as handlers:
            acceptor = Acceptor(listener, budget, lambda conn: handlers.start_soon(one, conn))
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(acceptor.run)
                    task_status.started()
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
            finally:
                # New clients get "connection refused" at once (a load
                # balancer moves on) instead of waiting in the backlog.
                listener.close()
            # Idle keep-alive connections close when they see this; requests
            # in progress get the graceful timeout.
            await context.terminated.set()
            deadline = trio.current_time() + hc.graceful_timeout
            handlers.cancel_scope.deadline = deadline
            lifespan_nursery.start_soon(abort_at, deadline)
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
