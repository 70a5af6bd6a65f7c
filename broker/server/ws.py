"""WebSocket endpoint `GET /v1/ws` (DESIGN.md §5): many subscriptions per
connection, live filter changes, app-level ping/pong, close codes.

Served as plain ASGI (`handle()`, dispatched from http.py): a Quart
WebSocket adds a request context and a nursery of two tasks per
connection, and idle connections are the common case. Per connection, one
task does everything: it reads client messages (it must keep reading even
when the client only listens: Hypercorn's queue to the app holds 10
messages, then it stops reading the connection), writes what the
subscriptions' readers have, keeps the heartbeat and watches for an admin
close or shutdown. Subscriptions are not tasks: each *listens* on its
wait key (`Hub.listen`); a wakeup marks the key due and cuts the wait for
the next client message short (`Connection.hand_back`), and the session
pulls the due subscriptions' readers and writes. Under a steady stream of
events the session still looks for client messages between writes (a
short poll), so pongs are never starved. A subscription to a workflow that
does not exist yet listens for new workflows until it appears or
`stream.unknown_workflow_wait` runs out.

With one task per connection there is no lock: every pull is followed by
its write with no other write in between, so a subscription's messages
reach the socket in the order its reader produced them. On shutdown the
session flushes every reader and closes with 1001.

Heartbeat: every `stream.ws_ping_interval` the server sends
`{"kind":"ping"}`; any client message within `stream.ws_pong_timeout`
(normally `{"op":"pong"}`) keeps the connection. Protocol-level pings are
not used: ASGI does not expose pongs, and browser code cannot see them.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import trio

from ..core.entry import Message, dumps_exact
from ..core.errors import BrokerError, InvalidArgument, NotFound, Unavailable
from ..core.filters import Filter
from ..core.reader import NO_CONTENT, MultiReader, WorkflowReader, plan_multi_start, plan_workflow_start
from ..core.state import Workflow
from .asgi import ScopeInfo
from .hub import JOURNAL, NEW_WORKFLOW, Connection, Hub
from .identity import principal_of

log = logging.getLogger("broker.ws")

MAX_SUBSCRIPTIONS = 100
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_MANY = 4029
CLOSE_SLOW_CONSUMER = 4008
SUBSCRIBE_KEYS = frozenset({"op", "sub", "workflow", "workflows", "tenant", "parent", "since", "cursor", "filter"})


# How long the session looks for a client message when subscriptions have
# more to write (events keep coming): long enough to take one that is
# already queued, short enough not to delay the next write.
POLL = 1e-4


class Subscription:
    __slots__ = ("id", "id_json", "reader", "key", "multi", "live", "pending")

    def __init__(self, sub_id: str) -> None:
        self.id = sub_id
        self.id_json = dumps_exact(sub_id)  # kept for the connection's life
        self.reader: WorkflowReader | MultiReader | None = None
        self.key = ""  # the hub wait key it listens on
        self.multi = False
        self.live = False  # listening on `key` (Hub.listen), counted in its watchers
        # Waiting for its workflow to appear (listening on NEW_WORKFLOW).
        self.pending: _Pending | None = None


class _Pending:
    """A workflow subscription whose workflow does not exist yet."""

    __slots__ = ("workflow", "filter", "cursor", "since", "deadline")

    def __init__(self, workflow: str, flt: Filter, cursor: str | None, since: str | None, deadline: float) -> None:
        self.workflow = workflow
        self.filter = flt
        self.cursor = cursor
        self.since = since
        self.deadline = deadline


def _error(code: str, message: str, sub: str | None = None) -> bytes:
    body: dict[str, Any] = {"kind": "error", "code": code, "message": message}
    if sub is not None:
        body["sub"] = sub
    return orjson.dumps(body)


class ClientGone(Exception):
    """The client closed the WebSocket (or the connection dropped)."""


class _Closed(Exception):
    """The session closed the WebSocket itself: nothing more to do."""


class AsgiWebSocket:
    """The few WebSocket operations the broker uses, over ASGI directly."""

    __slots__ = ("_receive", "_send", "closed")

    def __init__(self, receive: Any, send: Any) -> None:
        self._receive = receive
        self._send = send
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
    """One WebSocket connection: a single task (see the module docstring)."""

    __slots__ = ("ws", "hub", "conn", "subs", "last_seen", "node_epoch", "due", "pending", "paced_until")

    def __init__(self, hub: Hub, conn: Connection, websocket: AsgiWebSocket) -> None:
        self.ws = websocket
        self.hub = hub
        self.conn = conn
        self.subs: dict[str, Subscription] = {}
        self.last_seen = trio.current_time()
        self.node_epoch = hub.state.node_epoch
        self.due: set[str] = set()  # wait keys with news not yet pulled
        self.pending = 0  # subscriptions waiting for their workflow
        # limits.events_per_second: no writes before this (trio clock); the
        # session keeps reading client messages meanwhile.
        self.paced_until = 0.0

    async def send(self, data: bytes) -> None:
        """One write; a write that made no progress for
        stream.slow_consumer_timeout but completed after all closes with 4008."""
        conn = self.conn
        conn.write_started = trio.current_time()
        try:
            await self.ws.send(data.decode())
        finally:
            conn.write_started = None
        if conn.slow:
            await self.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)
        raise _Closed

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            await self._loop()
        except _Closed:
            pass
        finally:
            for sub in list(self.subs.values()):
                self._stop(sub)

    async def _loop(self) -> None:
        """Client messages, subscription writes, heartbeat, admin close and
        shutdown in one task (idle connections are the common case: every
        task per connection costs memory). The wait for the next client
        message is cut short when a ping, pong or pending-subscription
        deadline falls due, when a subscription's key has news (`_notify`),
        and by the hub (`Connection.hand_back`) when an admin closes the
        connection or the broker starts draining (both set `conn.closing`)."""
        cfg = self.hub.config.stream
        conn = self.conn
        next_ping = trio.current_time() + cfg.ws_ping_interval
        ping_sent: float | None = None
        while True:
            if self.hub.draining:
                await self._drain()
            if conn.closing:
                await self.close(1000, "closed by an administrator")
            if self.due and trio.current_time() >= self.paced_until:
                await self._flush_due()
            now = trio.current_time()
            if self.pending:
                await self._open_pending(now)
            if ping_sent is not None and now >= ping_sent + cfg.ws_pong_timeout:
                if self.last_seen < ping_sent:
                    # The pong may be waiting unread behind our writes.
                    await self._read_queued()
                if self.last_seen < ping_sent:
                    log.info("ws %d: no pong within %ss, closing", conn.id, cfg.ws_pong_timeout)
                    await self.close(CLOSE_GOING_AWAY, "pong timeout")
                ping_sent = None
            if ping_sent is None and now >= next_ping:
                ping_sent = now
                next_ping = now + cfg.ws_ping_interval
                await self.send(b'{"kind":"ping"}')
            due = next_ping if ping_sent is None else ping_sent + cfg.ws_pong_timeout
            if self.pending:
                due = min(due, *(s.pending.deadline for s in self.subs.values() if s.pending is not None))
            if self.due:
                # More to write: after the pacing pause, or (news came during
                # the writes) at once after a quick look for client messages.
                due = min(due, max(trio.current_time() + POLL, self.paced_until))
            if conn.closing or self.hub.draining:
                continue  # set during the writes above: `hand_back` found no wait to cut
            raw: str | bytes | None = None
            conn.wake = trio.CancelScope(deadline=due)
            try:
                with conn.wake:
                    raw = await self.ws.receive()
            finally:
                conn.wake = None
            if raw is not None:
                self.last_seen = trio.current_time()
                await self._handle(raw)

    async def _read_queued(self) -> None:
        """Handle the client messages already queued, without waiting."""
        while True:
            raw: str | bytes | None = None
            with trio.move_on_after(POLL):
                raw = await self.ws.receive()
            if raw is None:
                return
            self.last_seen = trio.current_time()
            await self._handle(raw)

    async def _drain(self) -> None:
        for sub in list(self.subs.values()):
            if sub.reader is not None and sub.live:
                items = sub.reader.pull()
                if items:
                    await self.ws.send(self._encode(sub, items).decode())
        await self.close(CLOSE_GOING_AWAY, "server shutting down")

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
                await self._subscribe(msg)
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
                self._stop(sub)
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

    async def _subscribe(self, msg: dict[str, Any]) -> None:
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
            wf = self.hub.state.get(value)
            if wf is not None:
                await self._open_workflow_sub(sub, wf, flt, cursor, since_text)
            else:
                # The subscription exists while it waits (up to
                # stream.unknown_workflow_wait) for the workflow's first event.
                deadline = trio.current_time() + self.hub.config.stream.unknown_workflow_wait
                self._wait_for_workflow(sub, _Pending(value, flt, cursor, since_text, deadline))
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
        self._start(sub)

    async def _open_workflow_sub(
        self, sub: Subscription, wf: Workflow, flt: Filter, cursor: str | None, since: str | None
    ) -> None:
        """Place the reader and start the subscription, or reply `end` if
        the client has everything already (a BrokerError for a bad cursor)."""
        start = plan_workflow_start(wf, last_event_id=cursor, since=since)
        if start.mode == NO_CONTENT:
            end = {
                "kind": "end",
                "workflow_id": wf.id,
                "epoch": wf.epoch,
                "seq": wf.terminal_seq,
                "state": wf.snapshot.state,
            }
            cursor = f"{wf.epoch}:{wf.terminal_seq}"
            await self.send(self._frame(sub, cursor, [Message(end, cursor)]))
            return
        sub.reader = WorkflowReader(
            wf, flt, start, coalesce_after=self.hub.config.stream.coalesce_after, counters=self.hub.counters
        )
        sub.key = wf.id
        self._start(sub)

    async def _open_pending(self, now: float) -> None:
        """Open the waiting subscriptions whose workflow appeared; reply
        not_found to those whose `stream.unknown_workflow_wait` ran out."""
        for sub in list(self.subs.values()):
            pending = sub.pending
            if pending is None:
                continue
            wf = self.hub.state.get(pending.workflow)
            if wf is None and now < pending.deadline:
                continue
            self._stop(sub)  # stops listening for new workflows
            try:
                if wf is None:
                    raise NotFound(f"workflow '{pending.workflow}' not found")
                await self._open_workflow_sub(sub, wf, pending.filter, pending.cursor, pending.since)
            except BrokerError as err:
                await self.send(_error(err.code, err.message, sub.id))

    def _start(self, sub: Subscription) -> None:
        """Listen on the subscription's key; its first write (snapshot or
        backlog) goes out on the next round of the session."""
        self.subs[sub.id] = sub
        self.conn.subscriptions = len(self.subs)
        self.hub.watch(sub.key)
        self.hub.listen(sub.key, sub, self._notify)
        sub.live = True
        self.due.add(sub.key)

    def _wait_for_workflow(self, sub: Subscription, pending: _Pending) -> None:
        sub.pending = pending
        self.pending += 1
        self.subs[sub.id] = sub
        self.conn.subscriptions = len(self.subs)
        self.hub.listen(NEW_WORKFLOW, sub, self._notify)

    def _stop(self, sub: Subscription) -> None:
        """The subscription ends: no more listening, gone from the session."""
        if sub.live:
            sub.live = False
            self.hub.unlisten(sub.key, sub)
            self.hub.unwatch(sub.key)
        if sub.pending is not None:
            sub.pending = None
            self.pending -= 1
            self.hub.unlisten(NEW_WORKFLOW, sub)
        if self.subs.get(sub.id) is sub:
            del self.subs[sub.id]
        self.conn.subscriptions = len(self.subs)

    def _notify(self, key: str) -> None:
        """Called by the hub: `key` has new entries (or a workflow appeared)."""
        self.due.add(key)
        self.conn.hand_back()

    async def _flush_due(self) -> None:
        """Pull and write every subscription whose key had news. Each pull
        is followed by its write with no checkpoint in between, so messages
        reach the socket in the order the reader produced them."""
        due, self.due = self.due, set()
        conn = self.conn
        hub = self.hub
        for sub in list(self.subs.values()):
            reader = sub.reader
            if reader is None or not sub.live or sub.key not in due:
                continue
            if self.paced_until > trio.current_time():
                self.due.add(sub.key)  # the pacing pause: its turn comes after
                continue
            items = reader.pull()
            if items:
                # Served: to the back of the line, so paced rounds take turns.
                self.subs[sub.id] = self.subs.pop(sub.id)
                await self.send(self._encode(sub, items))
                conn.delivered += len(items)
                hub.delivered["ws"] += len(items)
            if reader.done:
                self._stop(sub)
            elif items and conn.rate:
                pause = conn.pace_delay(len(items))
                if pause:
                    self.paced_until = trio.current_time() + pause

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


async def handle(hub: Hub, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Serve one WebSocket request to /v1/ws."""
    websocket = AsgiWebSocket(receive, send)
    try:
        try:
            # The request's headers and arguments are needed only here.
            req = ScopeInfo(scope)
            principal = principal_of(hub.config, req.headers, req.args)
            hub.check_capacity(principal)
            # Admitted before accept(), with no checkpoint in between, so two
            # connections racing for the last place cannot both get it.
            conn = hub.open_connection("ws", req.remote, "/v1/ws", principal)
            del req
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
    except ClientGone:
        pass
