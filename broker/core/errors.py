"""The broker's one error vocabulary.

Every error a client can see is one of these classes. Each carries its wire
code (DESIGN.md §5), its HTTP status, and the WebSocket close code used when
the error ends a connection (`ws_close`; errors that only refuse one
request or subscription leave the connection open and use none). Adapters
translate an error into their wire format from these three attributes and
nothing else. Ingest rejects are a separate, smaller vocabulary: they are
counted by reason and never reach subscribers.

    BrokerError                      base: code + message, never raised bare
    ├── InvalidArgument   400        a request the client can fix
    │   ├── MethodNotAllowed 405
    │   ├── PayloadTooLarge  413
    │   └── HeadersTooLarge  431  request headers over the parser's limit
    ├── Unauthenticated   401  4001
    ├── PermissionDenied  403  4003
    ├── NotFound          404
    ├── DeadlineExceeded  408        a request body that made no progress
    ├── ResourceExhausted 429  4029  per-tenant connection limit
    │   └── SlowConsumer  429  4008  writes made no progress (DESIGN §6)
    └── Unavailable       503  1001
        ├── ShuttingDown  503  1001  draining: reconnect elsewhere or later
        └── LimitReached  503  4029  limits.global

This module must not import trio, zmq, quart or psycopg.
"""

from __future__ import annotations

# WebSocket close codes (RFC 6455 §7.4 and DESIGN.md §5).
WS_NORMAL = 1000  # also: closed by an administrator (the client resumes)
WS_GOING_AWAY = 1001
WS_INTERNAL = 1011


class BrokerError(Exception):
    code = "internal"
    status = 500
    ws_close = WS_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidArgument(BrokerError):
    code = "invalid_argument"
    status = 400


class MethodNotAllowed(InvalidArgument):
    status = 405


class PayloadTooLarge(InvalidArgument):
    status = 413


class HeadersTooLarge(InvalidArgument):
    status = 431


class Unauthenticated(BrokerError):
    code = "unauthenticated"
    status = 401
    ws_close = 4001


class PermissionDenied(BrokerError):
    code = "permission_denied"
    status = 403
    ws_close = 4003


class NotFound(BrokerError):
    code = "not_found"
    status = 404


class DeadlineExceeded(BrokerError):
    code = "deadline_exceeded"
    status = 408


class FailedPrecondition(BrokerError):
    """The request is well formed but the workflow's state refuses it
    (a control request for a workflow that has ended)."""

    code = "failed_precondition"
    status = 409


class ResourceExhausted(BrokerError):
    code = "resource_exhausted"
    status = 429
    ws_close = 4029


class SlowConsumer(ResourceExhausted):
    ws_close = 4008


class Unavailable(BrokerError):
    code = "unavailable"
    status = 503
    ws_close = WS_GOING_AWAY


class ShuttingDown(Unavailable):
    pass


class LimitReached(Unavailable):
    ws_close = 4029


# The class a bare HTTP status stands for (errors raised by the HTTP
# framework itself: an unknown route, a wrong method, a body too large).
_BY_STATUS: dict[int, type[BrokerError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        MethodNotAllowed,
        PayloadTooLarge,
        HeadersTooLarge,
        NotFound,
        DeadlineExceeded,
        Unavailable,
    )
}


def error_for_status(status: int, message: str) -> BrokerError:
    """The vocabulary's error for an HTTP status the framework produced."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message)
    err = BrokerError(message)
    err.status = status
    return err


class Reject(Exception):
    """An ingest reject: `reason` is the metric label, `detail` the human text.

    Reasons are a closed set (REJECT_REASONS) so that the
    `broker_ingest_rejected_total{reason}` metric has bounded cardinality;
    the offending field name goes into `detail`, never into the label.
    """

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


REJECT_REASONS = frozenset(
    {
        "invalid_json",  # frame is not UTF-8 JSON
        "too_large",  # frame over ingest.max_frame_bytes
        "not_object",  # JSON value is not an object (or array of objects)
        "missing_field",  # a required field is absent
        "invalid_field",  # a field has the wrong type or value
        "unknown_field",  # a field the envelope does not define
        "missing_seq",  # engine-sequenced workflow got an event without seq
        "unexpected_seq",  # broker-sequenced workflow got an event with seq
        "tenant_mismatch",  # event names another tenant than the workflow's
        "stale_seq",  # seq older than the workflow's first
        "late_seq",  # seq inside a range already released as a gap
        "too_many_workflows",  # buffer.max_workflows reached, none evictable
        "too_many_tasks",  # buffer.max_tasks reached for the workflow
    }
)
