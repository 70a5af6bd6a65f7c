"""The broker's one error vocabulary.

Every error a client can see maps to one of the wire codes of DESIGN.md §5,
and each code has one HTTP status and (where it closes a WebSocket) one close
code. Ingest rejects are a separate, smaller vocabulary: they are counted by
reason and never reach subscribers.

    BrokerError                      base: code + message, never raised bare
    ├── InvalidArgument   400        a request the client can fix
    ├── Unauthenticated   401  4001  (auth arrives later; the code is reserved)
    ├── PermissionDenied  403  4003
    ├── NotFound          404
    ├── ResourceExhausted 429  4029 / 4008 (connection limits, slow consumer)
    └── Unavailable       503  1001  (shutting down, global limit)

This module must not import trio, zmq, quart or psycopg.
"""

from __future__ import annotations


class BrokerError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidArgument(BrokerError):
    code = "invalid_argument"
    status = 400


class Unauthenticated(BrokerError):
    code = "unauthenticated"
    status = 401


class PermissionDenied(BrokerError):
    code = "permission_denied"
    status = 403


class NotFound(BrokerError):
    code = "not_found"
    status = 404


class ResourceExhausted(BrokerError):
    code = "resource_exhausted"
    status = 429


class DeadlineExceeded(BrokerError):
    code = "deadline_exceeded"
    status = 408


class Unavailable(BrokerError):
    code = "unavailable"
    status = 503


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
