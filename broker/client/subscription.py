"""`subscribe()`: the messages of one workflow, or of several, over SSE or
WebSocket, resumed from their cursor after every drop until the stream
is over.

    with subscribe("http://127.0.0.1:8080", workflow="wf-1") as sub:
        for msg in sub:                       # a sync iterator …
            print(msg.kind, msg.data)

    async with subscribe(url, tenant="acme", transport="ws") as sub:
        async for msg in sub:                 # … or a trio async one
            snap = sub.view.workflows[msg.workflow_id]

A dropped connection, an admin close, a broker restart, a slow-consumer
close, a 5xx or 429: the subscription reconnects (backing off from
`retry_min` to `retry_max` seconds) and resumes after the last message it
received (SSE `Last-Event-ID`, WebSocket `cursor`): nothing repeated,
nothing missed that the broker still holds; what it no longer holds
comes as a `resync` (a fresh snapshot), which `sub.view` applies. It
stops after the workflow's `end` (every listed workflow's, for
`workflows=`; a `parent=` SSE stream when its tree has ended); a tenant
stream goes on until closed. A refusal no retry would mend (a bad
argument, an unknown workflow, a token the broker does not accept)
raises `SubscriptionError`; so does `give_up_after` seconds without a
connection.

One implementation: the async one, on trio (httpx for SSE,
trio-websocket for WebSocket). The sync iterator runs it in a thread of
its own and hands the messages over a bounded queue.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, aclosing
from typing import Any, Literal, cast
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson
import trio
import trio_websocket

from .view import (
    RETRYABLE_CODES,
    Message,
    SseDecoder,
    StreamState,
    SubscriptionError,
    WorkflowView,
    error_of,
    ws_messages,
)

log = logging.getLogger("broker.client")

BUFFER = 256  # messages received and not yet taken by the consumer
WS_SUB = "s"  # the one subscription id of the client's WebSocket
FATAL_WS_CLOSES = {4001: "unauthenticated", 4003: "permission_denied"}
_DONE = object()
Emit = Callable[[Message], Awaitable[bool]]


class _Reconnect(Exception):
    """The stream ended or failed in a way a resume mends."""


class _Over(Exception):
    """Nothing more will come (SSE 204, WS `unsubscribed` "ended": the
    cursor is at or after the end)."""


def subscribe(
    url: str,
    *,
    workflow: str | None = None,
    workflows: list[str] | None = None,
    tenant: str | None = None,
    parent: str | None = None,
    view: Literal["all", "tasks", "logs"] = "all",
    types: list[str] | None = None,
    tasks: list[str] | None = None,
    states: list[str] | None = None,
    level: str | None = None,
    coalesce: bool = False,
    cursor: str | None = None,
    since: int | str | None = None,
    token: str | None = None,
    transport: Literal["sse", "ws"] = "sse",
    retry_min: float = 0.1,
    retry_max: float = 5.0,
    give_up_after: float | None = None,
    read_timeout: float = 90.0,
) -> Subscription:
    """A subscription (nothing connects before it is iterated or entered).
    `url`: the broker's HTTP base (`http://host:port`). Exactly one of
    `workflow`, `workflows`, `tenant`, `parent`. `view` ("tasks", "logs"):
    the single-workflow SSE views; the filters (`types`, `tasks`, `states`,
    `level`, `coalesce`) work everywhere. `cursor`: resume from a cursor
    kept from an earlier subscription (`sub.cursor`); `since`: a seq (a
    journal cursor for multi-workflow streams), as the broker's `since`.
    `read_timeout`: seconds without a byte (the broker sends keepalives
    and pings well within it) after which the connection counts as lost."""
    scopes = {"workflow": workflow, "workflows": workflows, "tenant": tenant, "parent": parent}
    given = {k: v for k, v in scopes.items() if v is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of workflow, workflows, tenant, parent")
    if transport not in ("sse", "ws"):
        raise ValueError("transport must be 'sse' or 'ws'")
    if view != "all" and (transport != "sse" or workflow is None):
        raise ValueError("view applies to single-workflow SSE streams; elsewhere use types=")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Else every connect fails the same way, retried for ever, in silence.
        raise ValueError(f"url must be http://host:port or https://host:port, not {url!r}")
    flt: dict[str, Any] = {}
    for key, value in (("types", types), ("tasks", tasks), ("states", states)):
        if value is not None:
            flt[key] = list(value)
    if level is not None:
        flt["level"] = level
    if coalesce:
        flt["coalesce"] = True
    return Subscription(
        url.rstrip("/"),
        given,
        view,
        flt,
        cursor=cursor,
        since=since,
        token=token,
        transport=transport,
        retry=(retry_min, retry_max),
        give_up_after=give_up_after,
        read_timeout=read_timeout,
    )


class Subscription:
    """See the module docstring. `cursor`: where it would resume after
    the last message taken from it (keep it to resume later); `view`: the
    state of the workflows it watches (WorkflowView); `reconnects`: how
    often it resumed; `connected`: messages come (False before the first
    and while it reconnects)."""

    def __init__(
        self,
        base: str,
        scope: dict[str, Any],
        view: str,
        flt: dict[str, Any],
        *,
        cursor: str | None,
        since: int | str | None,
        token: str | None,
        transport: str,
        retry: tuple[float, float],
        give_up_after: float | None,
        read_timeout: float,
    ) -> None:
        self.base = base
        self.scope = scope
        self.path_view = view
        self.filter = flt
        self.since = since
        self.token = token
        self.transport = transport
        self.retry_min, self.retry_max = retry
        self.give_up_after = give_up_after
        self.read_timeout = read_timeout
        single, listed = "workflow" in scope, scope.get("workflows")
        listed_ids = frozenset(listed) if listed is not None else None
        # What the consumer has taken (its cursor), and what the wire has
        # delivered (where a reconnect resumes: the buffer's messages are
        # received already).
        self.state = StreamState(cursor, single, listed_ids)
        self._wire = StreamState(cursor, single, listed_ids)
        self.view = WorkflowView()
        self.reconnects = 0
        # Messages come (False before the first and while it reconnects).
        self.connected = False
        self._stack: AsyncExitStack | None = None
        self._recv: trio.MemoryReceiveChannel[Any] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._closing = False  # close() was called (sync use)

    @property
    def cursor(self) -> str | None:
        return self.state.cursor

    def _take(self, item: Any) -> Message:
        if isinstance(item, BaseException):
            raise item
        msg: Message = item
        self.state.update(msg)
        self.view.apply(msg)
        return msg

    # ------------------------------------------------------------ async

    async def __aenter__(self) -> Subscription:
        if self._stack is not None:
            raise RuntimeError("a subscription is entered once")
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        send, recv = trio.open_memory_channel[Any](BUFFER)
        stack.callback(nursery.cancel_scope.cancel)  # runs first on exit: the pump stops
        nursery.start_soon(self._pump, send)
        self._stack, self._recv = stack, recv
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def __aiter__(self) -> Subscription:
        if self._recv is None:
            raise RuntimeError("use `async with subscribe(...) as sub: async for msg in sub`")
        return self

    async def __anext__(self) -> Message:
        assert self._recv is not None
        try:
            item = await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        return self._take(item)

    # ------------------------------------------------------------- sync

    def __enter__(self) -> Subscription:
        self._start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Message]:
        self._start_thread()
        assert self._queue is not None
        try:
            while (item := self._queue.get()) is not _DONE:
                yield self._take(item)
        finally:
            self.close()

    def _start_thread(self) -> None:
        if self._thread is not None:
            return
        self._queue = queue.Queue(BUFFER)
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(started,), name="broker-subscription", daemon=True
        )
        self._thread.start()
        started.wait()

    def _thread_main(self, started: threading.Event) -> None:
        async def main() -> None:
            assert self._queue is not None
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._cancel:
                started.set()
                send, recv = trio.open_memory_channel[Any](0)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, send)
                    async for item in recv:
                        await self._hand_over(item)
            started.set()

        try:
            trio.run(main)
        finally:
            started.set()
            assert self._queue is not None
            self._put_done()

    async def _hand_over(self, item: Any) -> None:
        assert self._queue is not None
        try:
            self._queue.put_nowait(item)
        except queue.Full:  # the consumer is behind: wait for it, off the loop
            await trio.to_thread.run_sync(self._put, item, abandon_on_cancel=True)

    def _put(self, item: Any) -> bool:
        """Put `item` once there is room; False if the consumer closed first."""
        assert self._queue is not None
        while not self._closing:
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _put_done(self) -> None:
        """The end mark, after every message (a slow consumer still gets
        them all); once it closed, room is made for the mark instead."""
        assert self._queue is not None
        while not self._put(_DONE):
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            try:
                self._queue.put_nowait(_DONE)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stop (sync use): disconnect and end the iteration."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        self._closing = True
        token, cancel = self._token, self._cancel
        if token is not None and cancel is not None and thread.is_alive():
            try:
                trio.from_thread.run_sync(cancel.cancel, trio_token=token)
            except trio.RunFinishedError:
                pass
        thread.join(10)

    # ------------------------------------------------------------- pump

    async def _pump(self, send: trio.MemorySendChannel[Any]) -> None:
        """Connect, forward, resume, until the stream is over (or refused)."""
        async with send:
            delay = self.retry_min
            failing_since: float | None = None
            while not self._wire.done:

                async def emit(msg: Message) -> bool:
                    """Forward one message; True once the stream is over."""
                    nonlocal failing_since, delay
                    failing_since, delay = None, self.retry_min
                    self.connected = True
                    self._wire.update(msg)
                    await send.send(msg)
                    return self._wire.done

                try:
                    await (self._sse_once(emit) if self.transport == "sse" else self._ws_once(emit))
                    if self._wire.done:
                        return
                    raise _Reconnect("the stream closed before its end")
                except _Over:
                    return
                except SubscriptionError as exc:
                    await send.send(exc)
                    return
                except (_Reconnect, httpx.TransportError, trio_websocket.HandshakeError, OSError) as exc:
                    reason = str(exc) or type(exc).__name__
                    log.info("subscription to %s: %s; resuming from %s", self.base, reason, self._wire.cursor)
                except trio_websocket.ConnectionClosed as exc:
                    code = exc.reason.code if exc.reason is not None else None
                    if code in FATAL_WS_CLOSES:
                        detail = exc.reason.reason if exc.reason is not None else ""
                        await send.send(SubscriptionError(FATAL_WS_CLOSES[code], detail or "", code))
                        return
                    log.info("subscription to %s: closed (%s); resuming from %s", self.base, code, self._wire.cursor)
                self.connected = False
                now = trio.current_time()
                if failing_since is None:
                    failing_since = now
                elif self.give_up_after is not None and now - failing_since > self.give_up_after:
                    await send.send(
                        SubscriptionError("unavailable", f"no stream from {self.base} for {self.give_up_after:g} s")
                    )
                    return
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.retry_max)
                self.reconnects += 1

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    # -------------------------------------------------------------- SSE

    def _sse_url(self) -> tuple[str, dict[str, str]]:
        scope, params = self.scope, {}
        if "workflow" in scope:
            suffix = "" if self.path_view == "all" else f"/{self.path_view}"
            path = f"/v1/workflows/{quote(scope['workflow'], safe='')}{suffix}/stream"
        else:
            path = "/v1/stream"
            kind, value = next(iter(scope.items()))
            params[kind] = ",".join(value) if kind == "workflows" else value
        for key, value in self.filter.items():
            params[key] = ",".join(value) if isinstance(value, list) else ("true" if value is True else str(value))
        if self._wire.cursor is None and self.since is not None:
            params["since"] = str(self.since)
        return self.base + path, params

    async def _sse_once(self, emit: Emit) -> None:
        url, params = self._sse_url()
        headers = {"Accept": "text/event-stream", **self._headers()}
        if self._wire.cursor is not None:
            headers["Last-Event-ID"] = self._wire.cursor
        timeout = httpx.Timeout(10.0, read=self.read_timeout)
        async with (
            httpx.AsyncClient(timeout=timeout) as http,
            http.stream("GET", url, params=params, headers=headers) as resp,
        ):
            if resp.status_code == 204:
                raise _Over
            if resp.status_code != 200:
                await resp.aread()
                code, message = _error_of_response(resp)
                if resp.status_code >= 500 or resp.status_code in (408, 429):
                    raise _Reconnect(f"{resp.status_code} {code}: {message}")
                raise SubscriptionError(code, message, resp.status_code)
            self.connected = True
            decoder = SseDecoder()
            # Closed here, not left to the GC when the stream stops early
            # (trio warns of an async generator it has to finalize).
            async with aclosing(cast(AsyncGenerator[str, None], resp.aiter_lines())) as lines:
                async for line in lines:
                    msg = decoder.feed(line)
                    if msg is None:
                        continue
                    if msg.kind == "error":
                        err = error_of(msg)
                        if err.code in RETRYABLE_CODES:
                            raise _Reconnect(str(err))
                        raise err
                    if await emit(msg):
                        return

    # -------------------------------------------------------- WebSocket

    def _ws_url(self) -> str:
        parts = urlsplit(self.base)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path + "/v1/ws", "", ""))

    def _ws_subscribe(self) -> bytes:
        msg: dict[str, Any] = {"op": "subscribe", "sub": WS_SUB, **self.scope}
        if self.filter:
            msg["filter"] = self.filter
        if self._wire.cursor is not None:
            msg["cursor"] = self._wire.cursor
        elif self.since is not None:
            msg["since"] = self.since
        return orjson.dumps(msg)

    async def _ws_once(self, emit: Emit) -> None:
        headers = [(k.encode(), v.encode()) for k, v in self._headers().items()]
        stream = None
        try:
            async with trio_websocket.open_websocket_url(
                self._ws_url(), extra_headers=headers, connect_timeout=10, disconnect_timeout=2
            ) as ws:
                stream = getattr(ws, "_stream", None)
                await self._ws_session(ws, emit)
        finally:
            # trio-websocket 0.12 leaves the TCP socket open when the server
            # closes first (an admin close, a restart): its aclose() returns
            # at once when a close reason is set. Closing it again is
            # harmless when the library did.
            sock = getattr(stream, "socket", None)
            if sock is not None:
                sock.close()

    async def _ws_session(self, ws: trio_websocket.WebSocketConnection, emit: Emit) -> None:
        await ws.send_message(self._ws_subscribe().decode())
        self.connected = True
        while True:
            with trio.move_on_after(self.read_timeout) as waited:
                frame = await ws.get_message()
            if waited.cancelled_caught:
                raise _Reconnect(f"nothing from the broker for {self.read_timeout:g} s")
            head = orjson.loads(frame)
            kind = head.get("kind")
            if kind == "ping":
                await ws.send_message('{"op":"pong"}')
                continue
            if kind == "unsubscribed" and head.get("reason") == "ended":
                raise _Over  # its multi-workflow scope ended (the broker's word for SSE's 204)
            if kind in ("authenticated", "ack", "pong", "unsubscribed", "subscribed"):
                continue
            if kind == "error":
                err = error_of(Message(kind, head))
                if err.code in RETRYABLE_CODES:
                    raise _Reconnect(str(err))
                raise err
            for msg in ws_messages(frame):
                if await emit(msg):
                    return


def _error_of_response(resp: httpx.Response) -> tuple[str, str]:
    """The broker's JSON error (`{"error": {"code", "message"}}`), or the status."""
    try:
        err = orjson.loads(resp.content)["error"]
        return str(err["code"]), str(err["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "http_" + str(resp.status_code), resp.reason_phrase
