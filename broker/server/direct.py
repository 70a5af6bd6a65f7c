"""Direct writes to a streaming HTTP/1.1 response's socket.

Why: one SSE write through Quart → Hypercorn's HTTP stream → h11 → the TCP
server's send lock → trio's `send_all` costs ≈ 95 µs of broker CPU on the
2-core bench machine (three task switches, a lock, framing, the syscall),
measured with 1,000 streams and one 200-byte write each. Writing the same
chunk with one non-blocking `send()` from the task that holds the new
events costs ≈ 8 µs. The hub therefore writes to *parked* SSE subscribers
itself (see `Hub.park`); the stream's own task only wakes when a write did
not go through whole, to finish it the ordinary, blocking way.

How: the ASGI `send` Hypercorn hands a request leads to its H11 protocol
(which framed the response headers) and to its TCP server (which owns the
socket and a send lock). Once the response has started with chunked
transfer encoding, a body chunk is `<hex length>\\r\\n<data>\\r\\n` on the
socket — exactly what h11 would write; h11 keeps no byte count for chunked
bodies, so its state stays right and it still writes the final `0\\r\\n\\r\\n`.
A direct write happens only while nothing else is being sent on that
socket (the TCP server's send lock is free and nothing of ours is pending),
so bytes never interleave.

These are Hypercorn's and h11's internals (pinned in pyproject.toml). If
any piece is not where it is expected, `DirectSocket.attach` returns None
and the stream uses the ordinary path; tests/test_direct_writes.py checks
that the direct path is the one in use with the pinned versions.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol

try:  # h11's writer for chunked bodies (private name; checked, not assumed)
    from h11._writers import ChunkedWriter
except ImportError:  # pragma: no cover - another h11 layout: no direct path
    ChunkedWriter = None  # type: ignore[assignment,misc]


log = logging.getLogger("broker.direct")
_fallback_logged = False


def _fallback(reason: str) -> None:
    """Direct writes are not possible with these library versions: say so once."""
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        log.warning("direct writes unavailable (%s): SSE streams use the ordinary write path", reason)
    return None


# send() errors that mean the peer is gone (the request's reader notices too).
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.EBADF, errno.ETIMEDOUT})


class DirectSocket:
    """The socket of one chunked HTTP/1.1 response, written without its stack."""

    __slots__ = ("_tcp", "_sock", "pending", "broken", "ended")

    def __init__(self, tcp: Any, sock: socket.socket) -> None:
        self._tcp = tcp
        self._sock = sock
        self.pending = b""  # framed bytes a direct write left unsent
        self.broken = False
        # The body's last chunk (`0\r\n\r\n`) is written or pending: the
        # response is complete on the wire, and the connection must close
        # rather than go back to Hypercorn (whose h11 still expects a body).
        self.ended = False

    @classmethod
    def attach(cls, send: Any) -> DirectSocket | None:
        """The direct socket behind Hypercorn's ASGI `send`, or None.

        Call it after the response has started (headers sent), so the h11
        connection knows its body framing. HTTP/2 and HTTP/1.0 responses
        have none (expected: debug); Hypercorn or h11 internals that are
        not where they were are logged once as a warning, and every stream
        then takes the ordinary, slower path."""
        if ChunkedWriter is None:
            _fallback("h11 has no ChunkedWriter")
            return None
        try:
            # Hypercorn's ASGI send is a bound method of its HTTP stream, whose
            # own `send` is bound to the H11 protocol; untyped internals.
            proto: Any = send.__self__.send.__self__
            if not isinstance(proto, H11Protocol):
                log.debug("direct writes: not an HTTP/1.1 response (%s)", type(proto).__name__)
                return None
            h11_conn: Any = proto.connection
            if not isinstance(h11_conn._writer, ChunkedWriter):
                log.debug("direct writes: not a chunked body (HTTP/1.0 client or HEAD)")
                return None
            proto_send: Any = proto.send
            tcp: Any = proto_send.__self__
            trio_sock = tcp.stream.socket
            raw = trio_sock._sock
            tcp.send_lock.locked  # noqa: B018 - must exist
        except AttributeError as exc:
            _fallback(f"unexpected Hypercorn/h11 internals ({exc})")
            return None
        if not isinstance(raw, socket.socket):
            _fallback(f"the transport is not a socket ({type(raw).__name__})")
            return None
        return cls(tcp, raw)

    def ready(self) -> bool:
        """Whether a direct write may happen now: nothing of ours pending,
        the socket healthy, the body not ended, and no send of Hypercorn's
        in progress."""
        return not (self.pending or self.broken or self.ended or self._tcp.send_lock.locked())

    def write(self, data: bytes, last: bool = False) -> bool:
        """Write one body chunk now, without blocking (call only when
        `ready()`); with `last`, the body's last chunk after it (see
        `end()`). True if it all went out; otherwise what is left waits in
        `pending` for `flush()`, or the socket failed (`broken`: the client
        is gone and Hypercorn's reader ends the request)."""
        frame = b"%x\r\n%b\r\n" % (len(data), data) if data else b""  # an empty chunk would end the body
        if last:
            frame += b"0\r\n\r\n"
            self.ended = True
        if not frame:
            return True
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            if err.errno in _GONE:
                self.broken = True  # the client is gone; its reader will notice
                return False
            sent = 0  # anything else: Hypercorn's own send meets it in flush()
        if sent == len(frame):
            return True
        self.pending = frame[sent:]
        return False

    def end(self, final: bytes = b"") -> bool:
        """Write `final` (if any) and end the body with its last chunk, in
        one write (call only when `ready()`). True if the response is then
        complete on the wire or
        pending: the caller must not send Hypercorn's end of body, and
        returning from the ASGI app makes Hypercorn close the connection.

        Why: ending a stream through Hypercorn (its send lock, h11, a
        blocking send, then the keep-alive recycle that starts an idle-timer
        task, then the client's close) cost ≈ 50 % of the broker CPU of
        ending 6,000 streams at once, measured with py-spy; this path is one
        `send()` and a close. A stream is over once it ends: a client opens
        a new connection to subscribe again."""
        if self.broken:
            return False
        self.write(final, last=True)
        return not self.broken

    async def flush(self) -> None:
        """Send what a direct write left over, the way Hypercorn sends
        (its send lock, a shielded `send_all`; a closed connection ends the
        request)."""
        data, self.pending = self.pending, b""
        if data:
            await self._tcp.protocol_send(RawData(data=data))
