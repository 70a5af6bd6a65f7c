"""WebSocket endpoint `GET /v1/ws` (DESIGN.md §5): many subscriptions per
connection, live filter changes, app-level ping/pong, close codes.

This module only translates: a `subscribe` message becomes a
`Subscription` (core/subscribe.py: the same model, checks and errors as
SSE), errors become `error` messages (or, when they end the connection,
the close code their class carries), readers' messages become text frames.

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
from collections.abc import Sequence
from typing import Any

import orjson
import trio

from ..core import subscribe
from ..core.audit import AuditEntry, AuditFilter, AuditGap, AuditReader
from ..core.control import data_size, parse_request
from ..core.entry import Item, dumps_exact
from ..core.errors import (
    WS_GOING_AWAY,
    WS_INTERNAL,
    WS_NORMAL,
    BrokerError,
    InvalidArgument,
    ShuttingDown,
    SlowConsumer,
    Unauthenticated,
)
from ..core.limits import UNIDENTIFIED, Principal
from ..core.messages import error_body
from ..core.reader import MultiReader, WorkflowReader
from ..core.subscribe import AUDIT, NEW_WORKFLOW, Opened, Subscription
from ..logs import ids
from .asgi import ScopeInfo
from .connection import Connection
from .hub import Hub

log = logging.getLogger("broker.ws")

MAX_SUBSCRIPTIONS = 100
AuditItem = AuditEntry | AuditGap
AUTH_WAIT = 5.0  # seconds for the first `auth` message of a connection without a token (DESIGN §7)

# How long the session looks for a client message when subscriptions have
# more to write (events keep coming): long enough to take one that is
# already queued, short enough not to delay the next write.
POLL = 1e-4


class WsSubscription:
    """One subscription of a session: its reader (once placed), its key."""

    __slots__ = ("id", "id_json", "reader", "key", "multi", "live", "pending", "deadline")

    def __init__(self, sub_id: str) -> None:
        self.id = sub_id
        self.id_json = dumps_exact(sub_id)  # kept for the connection's life
        self.reader: WorkflowReader | MultiReader | AuditReader | None = None
        self.key = ""  # the hub wait key it listens on
        self.multi = False
        self.live = False  # listening on `key` (Hub.listen), counted in its watchers
        # Waiting for its workflow to appear (listening on NEW_WORKFLOW) until `deadline`.
        self.pending: Subscription | None = None
        self.deadline = 0.0


def _error(err: BrokerError, sub: str | None = None) -> bytes:
    return orjson.dumps(error_body(err, sub))


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

    async def send(self, data: bytes) -> None:
        if not self.closed:
            await self._send({"type": "websocket.send", "text": data.decode()})

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
        self.subs: dict[str, WsSubscription] = {}
        conn.subs = self.subs  # the admins see them (Connection.to_json)
        self.last_seen = trio.current_time()
        self.node_epoch = hub.node_epoch
        self.due: set[str] = set()  # wait keys with news not yet pulled
        self.pending = 0  # subscriptions waiting for their workflow
        # limits.events_per_second: no writes before this (trio clock); the
        # session keeps reading client messages meanwhile.
        self.paced_until = 0.0

    async def send(self, data: bytes, events: int = 0) -> None:
        """One write; one that made no progress for
        stream.slow_consumer_timeout but completed after all closes with 4008."""
        try:
            await self.conn.write(self.ws.send, data, events)
        except SlowConsumer as err:
            await self.close(err.ws_close, "slow consumer")

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
        cfg = self.hub.stream
        conn = self.conn
        next_ping = trio.current_time() + cfg.ws_ping_interval
        ping_sent: float | None = None
        while True:
            if self.hub.draining:
                await self._drain()
            if conn.closing:
                await self.close(WS_NORMAL, CLOSE_REASONS.get(conn.close_reason, "closed by the broker"))
            if conn.expired:  # its token (DESIGN §7): never left open past it
                await self.close(Unauthenticated.ws_close, "token expired")
            if self.due and trio.current_time() >= self.paced_until:
                await self._flush_due()
            now = trio.current_time()
            if self.pending:
                await self._open_pending(now)
            if ping_sent is not None and now >= ping_sent + cfg.ws_pong_timeout:
                await self._check_pong(ping_sent)
                ping_sent = None
            if ping_sent is None and now >= next_ping:
                ping_sent = now
                next_ping = now + cfg.ws_ping_interval
                await self.send(b'{"kind":"ping"}')
            due = min(next_ping if ping_sent is None else ping_sent + cfg.ws_pong_timeout, conn.expires_at)
            if self.pending:
                due = min(due, *(s.deadline for s in self.subs.values() if s.pending is not None))
            if self.due:
                # More to write: after the pacing pause, or (news came during
                # the writes) at once after a quick look for client messages.
                due = min(due, max(trio.current_time() + POLL, self.paced_until))
            if conn.closing:
                continue  # set during the writes above: `hand_back` found no wait to cut
            raw = await conn.park(due, self.ws.receive)
            if raw is not None:
                self.last_seen = trio.current_time()
                await self._handle(raw)

    async def _check_pong(self, ping_sent: float) -> None:
        """The pong timeout ran out: close unless the client said anything
        since the ping (its pong may be waiting unread behind our writes)."""
        if self.last_seen < ping_sent:
            await self._read_queued()
        if self.last_seen < ping_sent:
            log.info(
                "ws %d: no pong within %ss, closing",
                self.conn.id,
                self.hub.stream.ws_pong_timeout,
                extra=ids(self.conn.id),
            )
            await self.close(WS_GOING_AWAY, "pong timeout")

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
        """Shutdown: flush every reader, close with 1001 (clients resume)."""
        for sub in list(self.subs.values()):
            if sub.reader is not None and sub.live:
                items = sub.reader.pull()
                if items:
                    await self.ws.send(self._encode(sub, items))
        await self.close(ShuttingDown.ws_close, "server shutting down")

    # -------------------------------------------------------------- messages

    async def _handle(self, raw: str | bytes) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.send(_error(InvalidArgument("message is not JSON")))
            return
        if not isinstance(msg, dict):
            await self.send(_error(InvalidArgument("message must be a JSON object")))
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
                if isinstance(sub.reader, AuditReader):
                    raise InvalidArgument("an audit subscription takes its filter when it subscribes")
                sub.reader.set_filter(subscribe.ws_filter(msg.get("filter")))
            elif op == "unsubscribe":
                sub = self._existing(msg)
                self._stop(sub)
                await self.send(_unsubscribed(sub))
            elif op == "auth":
                self._refresh(msg)
                await self.send(AUTHENTICATED)
            elif op == "ping":
                await self.send(b'{"kind":"pong"}')
            elif op == "pong":
                pass  # last_seen is already updated
            elif op in ("cancel", "signal"):
                await self._control(op, msg)
            elif op is None:
                raise InvalidArgument("message needs an 'op'")
            else:
                raise InvalidArgument(f"unknown op {str(op)[:64]!r}")
        except BrokerError as err:
            self.hub.refused(err, "ws", self.conn.remote, self.conn.principal)
            await self.send(_error(err, sub_id))

    async def _control(self, op: str, msg: dict[str, Any]) -> None:
        """A `cancel` / `signal` op (DESIGN §8): `ack` once published."""
        fields = {k: v for k, v in msg.items() if k not in ("op", "workflow")}
        req = parse_request(op, msg.get("workflow"), fields, data_size(fields))  # the id is checked there
        request_id = await self.hub.request_control(self.conn.principal, req, self.conn.remote)
        await self.send(orjson.dumps({"kind": "ack", "op": op, "request_id": request_id}))

    def _refresh(self, msg: dict[str, Any]) -> None:
        """An `auth` op on an open connection: a new token (one about to
        expire replaced) for the same user and tenant; the subscriptions
        keep what they were opened with. A bad token changes nothing."""
        new = self.hub.identity.principal_of_token(_auth_token(msg))
        old = self.conn.principal
        if (new.user, new.tenant) != (old.user, old.tenant):
            raise Unauthenticated("a new token must name the same user and tenant")
        self.conn.set_principal(new)

    def _existing(self, msg: dict[str, Any]) -> WsSubscription:
        sub_id = msg.get("sub")
        if not isinstance(sub_id, str) or sub_id not in self.subs:
            raise InvalidArgument(f"no subscription {str(sub_id)[:128]!r}")
        return self.subs[sub_id]

    async def _subscribe(self, msg: dict[str, Any]) -> None:
        if "audit" in msg:
            self._subscribe_audit(msg)
            return
        sub_id, model = subscribe.from_ws(msg)
        if sub_id in self.subs:
            raise InvalidArgument(f"subscription '{sub_id}' already exists")
        if len(self.subs) >= MAX_SUBSCRIPTIONS:
            raise InvalidArgument(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        sub = WsSubscription(sub_id)
        opened = self.hub.open(model, self.conn.principal)
        if opened is not None:
            await self._start(sub, model, opened)
            return
        # The subscription exists while it waits (up to
        # stream.unknown_workflow_wait) for its workflow's first event.
        sub.pending = model
        sub.deadline = trio.current_time() + self.hub.stream.unknown_workflow_wait
        self.pending += 1
        self._add(sub)
        self.hub.listen(NEW_WORKFLOW, sub, self._notify)

    def _subscribe_audit(self, msg: dict[str, Any]) -> None:
        """`{"op":"subscribe","sub":…,"audit":{filter},"cursor":…}`: the audit
        stream (admins only, DESIGN §7), like SSE's /v1/audit/stream."""
        unknown = set(msg) - {"op", "sub", "audit", "cursor"}
        if unknown:
            raise InvalidArgument(f"unknown key '{sorted(unknown)[0][:64]}' in an audit subscribe")
        sub_id = subscribe.sub_id_of(msg)
        subscribe.require(self.conn.principal, "admin")
        if sub_id in self.subs:
            raise InvalidArgument(f"subscription '{sub_id}' already exists")
        if len(self.subs) >= MAX_SUBSCRIPTIONS:
            raise InvalidArgument(f"at most {MAX_SUBSCRIPTIONS} subscriptions per connection")
        cursor = msg.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise InvalidArgument("'cursor' must be a string")
        sub = WsSubscription(sub_id)
        sub.reader = AuditReader(self.hub.audit_log, AuditFilter.from_ws(msg["audit"]), cursor)
        sub.key = AUDIT
        self._add(sub)
        self.hub.listen(AUDIT, sub, self._notify, subscriber=True)
        sub.live = True
        self.due.add(AUDIT)

    async def _start(self, sub: WsSubscription, model: Subscription, opened: Opened) -> None:
        """Start the placed subscription, or reply `end` if the client has
        everything already."""
        if opened.reader is None:
            if opened.end is not None:
                await self.send(self._frame(sub, opened.end.cursor, [opened.end]))
            else:  # a multi-workflow scope that had ended (SSE: 204)
                await self.send(_unsubscribed(sub, ENDED))
            return
        sub.reader = opened.reader
        sub.key = opened.key
        sub.multi = model.scope.multi
        self._add(sub)
        self.hub.listen(sub.key, sub, self._notify, subscriber=True)
        sub.live = True
        self.due.add(sub.key)  # its first write (snapshot or backlog) goes out next round

    async def _open_pending(self, now: float) -> None:
        """Open the waiting subscriptions whose workflow appeared; reply
        not_found to those whose `stream.unknown_workflow_wait` ran out."""
        for sub in list(self.subs.values()):
            model = sub.pending
            if model is None:
                continue
            try:
                opened = self.hub.open(model, self.conn.principal, waited=True)
                if opened is None and now < sub.deadline:
                    continue
                self._stop(sub)  # stops listening for new workflows
                if opened is None:
                    raise subscribe.workflow_not_found(model)
                await self._start(sub, model, opened)
            except BrokerError as err:
                self._stop(sub)
                await self.send(_error(err, sub.id))

    def _add(self, sub: WsSubscription) -> None:
        self.subs[sub.id] = sub

    def _stop(self, sub: WsSubscription) -> None:
        """The subscription ends: no more listening, gone from the session."""
        if sub.live:
            sub.live = False
            self.hub.unlisten(sub.key, sub)
        if sub.pending is not None:
            sub.pending = None
            self.pending -= 1
            self.hub.unlisten(NEW_WORKFLOW, sub)
        if self.subs.get(sub.id) is sub:
            del self.subs[sub.id]

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
        for sub in list(self.subs.values()):
            reader = sub.reader
            if reader is None or not sub.live or sub.key not in due:
                continue
            if self.paced_until > trio.current_time():
                self.due.add(sub.key)  # the pacing pause: its turn comes after
                continue
            if reader.wants_history:
                await self.hub.fill_history(reader)
            items = reader.pull()
            if reader.wants_history:
                self.due.add(sub.key)  # the next page of its history: next round
            if items:
                # Served: to the back of the line, so paced rounds take turns.
                self.subs[sub.id] = self.subs.pop(sub.id)
                await self.send(self._encode(sub, items), len(items))
                reader.written()  # caught up, unless more came during the send
            if reader.done:
                self._stop(sub)
                if sub.multi:  # its scope ended: each workflow's `end` went out, and now this
                    await self.send(_unsubscribed(sub, ENDED))
            elif items and conn.rate:
                pause = conn.pace_delay(len(items))
                if pause:
                    self.paced_until = trio.current_time() + pause

    def _encode(self, sub: WsSubscription, items: Sequence[Item | AuditItem]) -> bytes:
        reader = sub.reader
        assert reader is not None
        cursor = f"{self.node_epoch}.{reader.index}" if sub.multi else items[-1].cursor
        return self._frame(sub, cursor, items)

    @staticmethod
    def _frame(sub: WsSubscription, cursor: str, items: Sequence[Item | AuditItem]) -> bytes:
        """One message, or a batch: `sub` and the resume `cursor` once, on
        the outside; each event inside keeps its own encoding (`epoch` and
        `seq`), shared by every subscriber (encoded once)."""
        head = b'{"sub":' + sub.id_json + b',"cursor":"' + cursor.encode() + b'"'
        if len(items) == 1:
            item = items[0]
            body = item.ws_body if isinstance(item, (AuditEntry, AuditGap)) else item.body
            return head + b"," + body[1:]
        return head + b',"kind":"batch","events":[' + b",".join([it.body for it in items]) + b"]}"


AUTHENTICATED = b'{"kind":"authenticated"}'
# The close frame's reason for each way the hub closes a connection (its
# `close_reason`); the code is 1000 for all: the client may resume.
CLOSE_REASONS = {
    "admin": "closed by an administrator",
    "limits.per_user": "closed at limits.per_user: a newer connection of the same user took its place",
}
# `unsubscribed`'s reason when the broker ends a subscription: its
# multi-workflow scope ended (every listed workflow, or a parent's tree).
ENDED = "ended"


def _unsubscribed(sub: WsSubscription, reason: str | None = None) -> bytes:
    """The subscription is over: asked for (`unsubscribe`), or `reason`."""
    tail = b"}" if reason is None else b',"reason":"' + reason.encode() + b'"}'
    return b'{"kind":"unsubscribed","sub":' + sub.id_json + tail


async def _first_auth(hub: Hub, websocket: AsgiWebSocket) -> Principal:
    """A connection without a token in its request: the principal of its
    first message, `{"op":"auth","token":…}`, within AUTH_WAIT seconds;
    Unauthenticated (close 4001) otherwise."""
    raw: str | bytes | None = None
    with trio.move_on_after(AUTH_WAIT):
        raw = await websocket.receive()
    if raw is None:
        raise Unauthenticated(f"no token in the request and no auth message within {AUTH_WAIT:g} s")
    return hub.identity.principal_of_token(_auth_token(raw))


def _auth_token(raw: str | bytes | dict[str, Any]) -> str:
    """The token of an `auth` message; Unauthenticated if it is not one."""
    msg: Any = raw
    if not isinstance(msg, dict):
        try:
            msg = orjson.loads(msg)
        except orjson.JSONDecodeError:
            msg = None
    if not isinstance(msg, dict) or msg.get("op") != "auth":
        raise Unauthenticated('the first message must be {"op":"auth","token":…}')
    token = msg.get("token")
    if not isinstance(token, str) or not token:
        raise Unauthenticated("'token' must be a non-empty string")
    return token


async def handle(hub: Hub, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Serve one WebSocket request to /v1/ws."""
    websocket = AsgiWebSocket(receive, send)
    # Known once its token is verified: a refusal after that (a limit) is
    # audited with its user and tenant.
    principal: Principal | None = None
    try:
        try:
            # The request's headers and arguments are needed only here.
            req = ScopeInfo(scope)
            # No token in the request (auth on): the first message must
            # bring one; meanwhile it counts, and may do nothing.
            later = hub.identity.required and hub.identity.token_of(req.headers, req.args) is None
            principal = UNIDENTIFIED if later else hub.principal_of(req.headers, req.args)
            hub.check_capacity(principal)
            # Admitted before accept(), with no checkpoint in between, so two
            # connections racing for the last place cannot both get it.
            conn = hub.open_connection("ws", req.remote, "/v1/ws", principal)
            del req
        except BrokerError as err:
            hub.refused(err, "ws", str((scope.get("client") or ("",))[0]), principal)
            await websocket.accept()
            await websocket.send(_error(err))
            await websocket.close(err.ws_close, err.message[:120])
            return
        try:
            await websocket.accept()
            session = WsSession(hub, conn, websocket)
            if later:
                principal = None
                try:
                    principal = await _first_auth(hub, websocket)
                    hub.assign(conn, principal)
                except BrokerError as err:
                    hub.refused(err, "ws", conn.remote, principal)
                    await websocket.send(_error(err))
                    await websocket.close(err.ws_close, err.message[:120])
                    return
                await session.send(AUTHENTICATED)
            await session.run()
        except ClientGone:
            raise
        except Exception:
            # A bug in one session must never reach Hypercorn, whose error
            # path would take the whole broker down: log it, close 1011.
            log.exception(
                "connection %d (ws %s): internal error; closed 1011", conn.id, conn.remote, extra=ids(conn.id)
            )
            hub.counters["internal_errors"] += 1
            with trio.move_on_after(1):
                try:
                    await websocket.close(WS_INTERNAL, "internal error")
                except Exception:
                    pass
        finally:
            hub.close_connection(conn)
    except ClientGone:
        pass
