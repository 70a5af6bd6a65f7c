"""ZeroMQ ingest: one PULL socket, owned by one trio task.

pyzmq has no trio integration, and ZMQ_FD is edge-triggered and shared with
every zmq call on the socket (FIELD-NOTES). The loop therefore follows the
algorithm of pyzmq's own `_future.py`:

1. read `EVENTS`; while it lacks POLLIN, sleep on `wait_readable(FD)` and
   read `EVENTS` again (never sleep first: the edge may already be gone);
2. drain with NOBLOCK until `zmq.Again` (or a time or batch limit, to
   stay fair to the other tasks), handing the frames to the hub a chunk at
   a time, checkpoint, repeat.

No other task may touch the socket (even `getsockopt(EVENTS)` steals the
edge). The socket is bound synchronously by `bind_pull()` before anything
starts, so a bad endpoint or a port in use fails startup cleanly.
"""

from __future__ import annotations

import logging
from collections import deque

import trio
import zmq

from ..core.state import FrameIngest
from .curve import CurveServer, bind_server
from .hub import Hub

log = logging.getLogger("broker.ingest")

# A turn of the drain: messages are received and ingested CHUNK at a time
# until the queue is empty, TURN_BATCH messages were taken, or TURN_SLICE
# seconds of work are done; then the other tasks run (the flusher's writes
# among them). A turn stopped by a limit leaves input queued: the broker
# runs behind (core/wake.py).
# A turn that follows one stopped by a limit takes as long as the other
# tasks took in between (at most MAX_TURN_SLICE): with input queued, the
# ingest has half the loop however many tasks share it (trio runs every
# ready task once a round).
CHUNK = 32
TURN_BATCH = 4096
TURN_SLICE = 0.004
MAX_TURN_SLICE = 0.025
# The option as a plain int: pyzmq turns its enum member into an option
# code in Python on every call (0.6 of the 1.7 µs a part cost, measured).
RCVMORE = int(zmq.RCVMORE)
# At a stop, the longest the ingest goes on applying what it read and what
# its socket holds; what is left after it is not applied (logged).
DRAIN_AT_STOP = 1.0


def bind_pull(
    ctx: zmq.Context, endpoint: str, rcvhwm: int, max_frame_bytes: int, curve: CurveServer | None = None
) -> tuple[zmq.Socket, str]:
    """Create and bind the PULL socket (a CURVE server with `curve`, whose
    authenticator must be running); return it and its actual endpoint."""
    # Frames a little over the limit are received, rejected and counted
    # (`too_large`); a message far over it is refused by libzmq itself (the
    # peer is disconnected) before it can take the broker's memory.
    max_size = min(4 * max_frame_bytes + 65536, 2**62)
    return bind_server(ctx, zmq.PULL, endpoint, curve, {zmq.RCVHWM: rcvhwm, zmq.MAXMSGSIZE: max_size})


class _Parts:
    """Reads messages part by part, at most `max_parts` kept per message.

    A message's parts all arrive together (ZeroMQ delivers a multipart
    message whole), so a part after the first never raises Again. The
    parts of a message past the limit are received and dropped, spread
    over as many turns as they take, and the message counts as one
    `too_large` reject: a message of a million empty parts costs the loop
    a few milliseconds a turn, not seconds."""

    __slots__ = ("sock", "max_parts", "curve", "in_message", "kept", "skipped", "dropped")

    def __init__(self, sock: zmq.Socket, max_parts: int, curve: CurveServer | None = None) -> None:
        self.sock = sock
        self.max_parts = max_parts
        self.curve = curve  # its certificates may bind engines to tenants
        self.in_message = False  # the last part read had more after it
        self.kept = 0  # parts of the current message kept so far
        self.skipped = 0  # parts of the current message dropped so far
        self.dropped: list[int] = []  # messages that ended over the limit: parts dropped of each

    def read(self, out: list[bytes], n: int, tenants: list[str | None]) -> bool:
        """Append up to `n` parts to `out` (dropping those past the limit),
        and to `tenants` the tenant each one's sender is bound to (its
        CURVE certificate's), if any sender is; False once the socket has
        nothing more (zmq.Again)."""
        sock = self.sock
        recv = sock.recv
        bound = self.curve.tenants if self.curve is not None else None
        for _ in range(n):
            try:
                if bound:
                    frame = recv(zmq.NOBLOCK, copy=False)
                    part = frame.bytes
                    tenant = bound.get(str(frame.get("User-Id")))
                else:
                    part = recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return False
            if self.kept < self.max_parts:
                out.append(part)
                if bound:
                    tenants.append(tenant)
                self.kept += 1
            else:
                self.skipped += 1
            if sock.getsockopt(RCVMORE):
                self.in_message = True
            else:
                self.in_message = False
                self.kept = 0
                if self.skipped:
                    self.dropped.append(self.skipped)
                    self.skipped = 0
        return True


async def serve_zmq_ingest(
    sock: zmq.Socket,
    hub: Hub,
    *,
    max_parts: int = 1000,
    curve: CurveServer | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    fd = sock.getsockopt(zmq.FD)
    assert isinstance(fd, int)
    parts = _Parts(sock, max_parts, curve)
    resume, turn = hub.resume, hub.ingest_turn
    task_status.started()
    turn_began: float | None = None  # None: the ingest waited for input since
    turn_ended: float | None = None  # when the last turn stopped at a limit
    carry: deque[FrameIngest] = deque()  # frames begun in an earlier turn, not yet applied
    try:
        while True:
            if not carry and not int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                if turn_began is not None:
                    hub.ingest_idle()  # drained: no longer behind
                await trio.lowlevel.wait_readable(fd)
                turn_began = None
                continue
            # How late this turn is: the time since the previous one began,
            # while input was waiting all along (the loop was busy).
            now = trio.current_time()
            lag = 0.0 if turn_began is None else now - turn_began
            turn_began = now
            away = 0.0 if turn_ended is None else now - turn_ended
            until = now + min(max(TURN_SLICE, away), MAX_TURN_SLICE)
            taken = 0
            backlog = True  # a limit ended the turn: more is queued
            if carry:
                carry = resume(carry, until)
            while not carry:
                carry, more = _take_chunk(parts, hub, max_parts, until)
                taken += CHUNK
                if not more:
                    backlog = bool(carry)
                    break
                if taken >= TURN_BATCH or trio.current_time() >= until:
                    break
            # Running behind moves subscriber wakes into write passes, so
            # the queue is drained first (core/wake.py).
            turn(backlog, lag)
            turn_ended = trio.current_time() if backlog else None
            # The socket may still be readable: let other tasks run, then
            # re-check EVENTS at the top (no busy loop: EVENTS gates the sleep).
            await trio.lowlevel.checkpoint()
    finally:
        # Stopped (SIGTERM): what was read is applied whole, and what the
        # socket still holds too, within DRAIN_AT_STOP seconds, so the
        # drain delivers it (DESIGN §11: stop ingest, deliver what is
        # buffered); nothing is left half-applied. No await: the
        # cancellation that brought us here would interrupt it.
        _drain_at_stop(parts, hub, carry, max_parts)
        trio.lowlevel.notify_closing(fd)
        sock.close(0)


def _take_chunk(parts: _Parts, hub: Hub, max_parts: int, until: float) -> tuple[deque[FrameIngest], bool]:
    """Read up to CHUNK parts and apply them (until `until`): what is left
    to apply, and whether the socket may hold more."""
    frames: list[bytes] = []
    tenants: list[str | None] = []  # empty unless a certificate binds its engine to a tenant
    more = parts.read(frames, CHUNK, tenants)
    for dropped in parts.dropped:
        hub.reject_message(f"message of {max_parts + dropped} parts exceeds ingest.max_parts ({max_parts})", "zmq")
    parts.dropped.clear()
    carry = hub.ingest_batch(frames, "zmq", until, tenants or None) if frames else deque()
    return carry, more


def _drain_at_stop(parts: _Parts, hub: Hub, carry: deque[FrameIngest], max_parts: int) -> None:
    until = trio.current_time() + DRAIN_AT_STOP
    try:
        while carry:
            carry = hub.resume(carry, until)
            if trio.current_time() >= until:
                break
        while not carry and trio.current_time() < until:
            carry, more = _take_chunk(parts, hub, max_parts, until)
            if not more:
                break
    except zmq.ZMQError:
        pass  # the socket is going anyway
    if carry:
        log.warning("ingest stopped with %d frames not applied (%.1f s drain at stop)", len(carry), DRAIN_AT_STOP)
