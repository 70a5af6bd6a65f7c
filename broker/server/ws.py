"""WebSocket endpoint `GET /v1/ws` (DESIGN.md §5): many subscriptions per
connection, live filter changes, app-level ping/pong, close codes.

Served as plain ASGI (`handle()`, dispatched from http.py): a Quart
WebSocket adds a request context and a nursery of two tasks per
connection, and idle connections are the common case. Per connection: one
task reads client messages (it must keep reading even when the client only
listens: Hypercorn's queue to the app holds 10 messages, then it stops
reading the connection) and also keeps the heartbeat and watches for an
admin close or shutdown; one task per subscription pulls from its reader
and writes.

Writes go through one lock, and a subscription *pulls inside the lock*, so
its messages reach the socket in the order its reader produced them even
when several subscriptions and the control replies interleave. On shutdown
the session takes the lock, stops the subscription tasks (none can hold
pulled-but-unsent events, since pulls happen under the lock), flushes every
reader and closes with 1001.

Heartbeat: every `stream.ws_ping_interval` the server sends
`{"kind":"ping"}`; any client message within `stream.ws_pong_timeout`
(normally `{"op":"pong"}`) keeps the connection. Protocol-level pings are
not used: ASGI does not expose pongs, and browser code cannot see them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson
import trio

from ..core.entry import Message
from ..core.errors import BrokerError, InvalidArgument, Unavailable
from ..core.filters import Filter
from ..core.reader import NO_CONTENT, MultiReader, WorkflowReader, plan_multi_start, plan_workflow_start
from .asgi import ScopeInfo
from .hub import JOURNAL, Connection, Hub
from .identity import principal_of
from .sse import wait_for_workflow

log = logging.getLogger("broker.ws")

MAX_SUBSCRIPTIONS = 100
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_MANY = 4029
CLOSE_SLOW_CONSUMER = 4008
SUBSCRIBE_KEYS = frozenset({"op", "sub", "workflow", "workflows", "tenant", "parent", "since", "cursor", "filter"})


class Subscription:
    __slots__ = ("id", "id_json", "scope", "reader", "key", "multi")

    def __init__(self, sub_id: str) -> None:
        self.id = sub_id
        self.id_json = orjson.dumps(sub_id)
        self.scope = trio.CancelScope()
        self.reader: WorkflowReader | MultiReader | None = None
        self.key = ""
        self.multi = False


def _error(code: str, message: str, sub: str | None = None) -> bytes:
    body: dict[str, Any] = {"kind": "error", "code": code, "message": message}
    if sub is not None:
        body["sub"] = sub
    return orjson.dumps(body)


class ClientGone(Exception):
    """The client closed the WebSocket (or the connection dropped)."""


class AsgiWebSocket:
    """The few WebSocket operations the broker uses, over ASGI directly."""

    def __init__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self._receive = receive
        self._send = send
        self.request = ScopeInfo(scope)
        self.closed = False

    async def accept(self) -> None:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            raise ClientGone
        await self._send({"type": "websocket.accept"})

    async def receive(self) -> str | bytes:
        while True:
            message = await self._receive()
            if message["type"] == "websocket.receive":
                text = message.get("text")
                return text if text is not None else message.get("bytes") or b""
            if message["type"] == "websocket.disconnect":
                self.closed = True
                raise ClientGone

    async def send(self, text: str) -> None:
        if not self.closed:
            await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


class WsSession:
    def __init__(self, hub: Hub, conn: Connection, websocket: AsgiWebSocket) -> None:
        self.ws = websocket
        self.hub = hub
        self.conn = conn
        self.lock = trio.Lock()
        self.subs: dict[str, Subscription] = {}
        self.last_seen = trio.current_time()
        self.nursery: trio.Nursery | None = None
        self.node_epoch = hub.state.node_epoch

    async def send(self, data: bytes) -> None:
        async with self.lock:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        """One write (the lock held); a write that made no progress for
        stream.slow_consumer_timeout but completed after all closes with 4008."""
        conn = self.conn
        conn.write_started = trio.current_time()
        try:
            await self.ws.send(data.decode())
        finally:
            conn.write_started = None
        if conn.slow:
            await self.ws.close(CLOSE_SLOW_CONSUMER, "slow consumer")
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()

    async def close(self, code: int, reason: str) -> None:
        async with self.lock:
            await self.ws.close(code, reason)
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Client messages, heartbeat, admin close and shutdown in one task
        (idle connections are the common case: every task per connection
        costs memory). The wait for the next client message is cut short
        when a ping or pong deadline falls due, and by the hub
        (`Connection.hand_back`) when an admin closes the connection or the
        broker starts draining (both set `conn.closing`)."""
        cfg = self.hub.config.stream
        conn = self.conn
        next_ping = trio.current_time() + cfg.ws_ping_interval
        ping_sent: float | None = None
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            while True:
                raw: str | bytes | None = None
                if not conn.closing.is_set():
                    due = next_ping if ping_sent is None else ping_sent + cfg.ws_pong_timeout
                    conn.wake = trio.CancelScope(deadline=due)
                    try:
                        with conn.wake:
                            raw = await self.ws.receive()
                    finally:
                        conn.wake = None
                if raw is not None:
                    self.last_seen = trio.current_time()
                    await self._handle(raw)
                if self.hub.draining:
                    await self._drain()
                    return
                if conn.closing.is_set():
                    await self.close(1000, "closed by an administrator")
                    return
                now = trio.current_time()
                if ping_sent is not None and now >= ping_sent + cfg.ws_pong_timeout:
                    if self.last_seen < ping_sent:
                        log.info("ws %d: no pong within %ss, closing", conn.id, cfg.ws_pong_timeout)
                        await self.close(CLOSE_GOING_AWAY, "pong timeout")
                        return
                    ping_sent = None
                if ping_sent is None and now >= next_ping:
                    ping_sent = now
                    next_ping = now + cfg.ws_ping_interval
                    await self.send(b'{"kind":"ping"}')

    async def _drain(self) -> None:
        async with self.lock:
            for sub in self.subs.values():
                sub.scope.cancel()
            for sub in list(self.subs.values()):
                if sub.reader is not None:
                    items = sub.reader.pull()
                    if items:
                        await self.ws.send(self._encode(sub, items).decode())
            await self.ws.close(CLOSE_GOING_AWAY, "server shutting down")
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    # -------------------------------------------------------------- messages

    async def _handle(self, raw: str | bytes) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.send(_error("invalid_argument", "message is not JSON"))
            return
        if not isinstance(msg, dict):
            await self.send(_error("invalid_argument", "message must be a JSON object"))
            return
        op = msg.get("op")
        sub_id = msg.get("sub") if isinstance(msg.get("sub"), str) else None
        try:
            if op == "subscribe":
                self._subscribe(msg)
            elif op == "filter":
                sub = self._existing(msg)
                if sub.reader is None:
                    raise InvalidArgument(f"subscription '{sub.id}' has not started yet")
                flt = msg.get("filter")
                if not isinstance(flt, dict):
                    raise InvalidArgument("'filter' must be an object")
                sub.reader.set_filter(Filter.parse(flt, from_query=False))
            elif op == "unsubscribe":
                sub = self._existing(msg)
                sub.scope.cancel()
                self._forget(sub)
                await self.send(b'{"kind":"unsubscribed","sub":' + sub.id_json + b"}")
            elif op == "ping":
                await self.send(b'{"kind":"pong"}')
            elif op == "pong":
                pass  # last_seen is already updated
            elif op == "cancel":
                raise Unavailable("the control channel is not configured on this broker")
            elif op is None:
                raise InvalidArgument("message needs an 'op'")
            else:
                raise InvalidArgument(f"unknown op {str(op)[:64]!r}")
        except BrokerError as err:
            await self.send(_error(err.code, err.message, sub_id))

    def _existing(self, msg: dict[str, Any]) -> Subscription:
        sub_id = msg.get("sub")
        if not isinstance(sub_id, str) or sub_id not in self.subs:
            raise InvalidArgument(f"no subscription {str(sub_id)[:128]!r}")
        return self.subs[sub_id]

    def _subscribe(self, msg: dict[str, Any]) -> None:
        unknown = set(msg) - SUBSCRIBE_KEYS
        if unknown:
            raise InvalidArgument(f"unknown key '{sorted(unknown)[0]}' in subscribe")
        sub_id = msg.get("sub")
        if not isinstance(sub_id, str) or not 1 <= len(sub_id) <= 128:
            raise InvalidArgument("'sub' must be a string of 1-128 characters")
        if sub_id in self.subs:
            raise InvalidArgument(f"subscription '{sub_id}' already exists")
        if len(self.subs) >= MAX_SUBSCRIPTIONS:
            raise InvalidArgument(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        raw_filter = msg.get("filter", {})
        if not isinstance(raw_filter, dict):
            raise InvalidArgument("'filter' must be an object")
        flt = Filter.parse(raw_filter, from_query=False)
        scopes = [k for k in ("workflow", "workflows", "tenant", "parent") if k in msg]
        if len(scopes) != 1:
            raise InvalidArgument("give exactly one of workflow, workflows, tenant, parent")
        since = msg.get("since")
        if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
            raise InvalidArgument("'since' must be a non-negative integer")
        cursor = msg.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise InvalidArgument("'cursor' must be a string")
        since_text = None if since is None else str(since)
        sub = Subscription(sub_id)
        scope = scopes[0]
        value = msg[scope]
        if scope == "workflows":
            if not isinstance(value, list) or not value or not all(isinstance(w, str) and w for w in value):
                raise InvalidArgument("'workflows' must be a non-empty list of workflow ids")
            value = frozenset(value)
        elif not isinstance(value, str) or not value:
            raise InvalidArgument(f"'{scope}' must be a non-empty string")
        if scope == "workflow":
            self.subs[sub_id] = sub
            self.conn.subscriptions = len(self.subs)
            assert self.nursery is not None
            opener = partial(self._open_workflow_sub, sub, value, flt, cursor, since_text)
            self.nursery.start_soon(self._run_sub, sub, opener)
            return
        if since_text is not None:
            raise InvalidArgument("multi-workflow subscriptions resume with 'cursor' (a journal cursor)")
        # `cursor` resumes like Last-Event-ID: out of reach → resync, not an error.
        start = plan_multi_start(self.hub.state, last_event_id=cursor)
        sub.reader = MultiReader(
            self.hub.state,
            flt,
            start,
            coalesce_after=self.hub.config.stream.coalesce_after,
            counters=self.hub.counters,
            **{scope: value},
        )
        sub.key = JOURNAL
        sub.multi = True
        self.subs[sub_id] = sub
        self.conn.subscriptions = len(self.subs)
        assert self.nursery is not None
        self.nursery.start_soon(self._run_sub, sub, None)

    async def _open_workflow_sub(
        self, sub: Subscription, wid: str, flt: Filter, cursor: str | None, since: str | None
    ) -> bool:
        """Wait for the workflow and place the reader; False if the sub ended."""
        try:
            wf = await wait_for_workflow(self.hub, wid)
            start = plan_workflow_start(wf, last_event_id=cursor, since=since)
        except BrokerError as err:
            self._forget(sub)
            await self.send(_error(err.code, err.message, sub.id))
            return False
        if start.mode == NO_CONTENT:
            self._forget(sub)
            end = {
                "kind": "end",
                "workflow_id": wf.id,
                "epoch": wf.epoch,
                "seq": wf.terminal_seq,
                "state": wf.snapshot.state,
            }
            cursor = f"{wf.epoch}:{wf.terminal_seq}"
            await self.send(self._frame(sub, cursor, [Message(end, cursor)]))
            return False
        sub.reader = WorkflowReader(
            wf, flt, start, coalesce_after=self.hub.config.stream.coalesce_after, counters=self.hub.counters
        )
        sub.key = wid
        return True

    def _forget(self, sub: Subscription) -> None:
        if self.subs.get(sub.id) is sub:
            del self.subs[sub.id]
        self.conn.subscriptions = len(self.subs)

    def _encode(self, sub: Subscription, items: list[Any]) -> bytes:
        reader = sub.reader
        assert reader is not None
        cursor = f"{self.node_epoch}.{reader.index}" if sub.multi else items[-1].cursor
        return self._frame(sub, cursor, items)

    @staticmethod
    def _frame(sub: Subscription, cursor: str, items: list[Any]) -> bytes:
        head = b'{"sub":' + sub.id_json + b',"cursor":"' + cursor.encode() + b'"'
        if len(items) == 1:
            return head + b"," + items[0].body[1:]
        return head + b',"kind":"batch","events":[' + b",".join([it.body for it in items]) + b"]}"

    async def _run_sub(self, sub: Subscription, opener: Callable[[], Awaitable[bool]] | None) -> None:
        hub = self.hub
        with sub.scope:
            if opener is not None and not await opener():
                return
            reader = sub.reader
            assert reader is not None
            hub.watch(sub.key)
            try:
                while True:
                    async with self.lock:
                        items = reader.pull()
                        if items:
                            await self._write(self._encode(sub, items))
                    if items:
                        self.conn.delivered += len(items)
                        hub.delivered["ws"] += len(items)
                        if reader.done:
                            break
                        await self.conn.pace(len(items))
                        continue
                    if reader.done or hub.draining:
                        break
                    await hub.wait(sub.key, 3600)
            finally:
                hub.unwatch(sub.key)
                if reader.done:
                    self._forget(sub)


async def handle(hub: Hub, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Serve one WebSocket request to /v1/ws."""
    websocket = AsgiWebSocket(scope, receive, send)
    try:
        try:
            req = websocket.request
            principal = principal_of(hub.config, req.headers, req.args)
            hub.check_capacity(principal)
            # Admitted before accept(), with no checkpoint in between, so two
            # connections racing for the last place cannot both get it.
            conn = hub.open_connection("ws", req.remote, "/v1/ws", principal)
        except BrokerError as err:
            await websocket.accept()
            code = CLOSE_GOING_AWAY if hub.draining else CLOSE_TOO_MANY
            await websocket.send(_error(err.code, err.message).decode())
            await websocket.close(code, err.message[:120])
            return
        try:
            await websocket.accept()
            await WsSession(hub, conn, websocket).run()
        finally:
            hub.close_connection(conn)
    except* ClientGone:
        pass  # raised inside the session's nursery, hence except*
