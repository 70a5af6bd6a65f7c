"""Control requests (DESIGN.md §8): a watcher asks the engines to cancel
or signal a workflow. This module decides, for HTTP and WebSocket alike,
whether a request may go and what exactly is published:

- `check_request()` validates the request's fields (the same checks and
  errors for `POST /v1/workflows/{id}/cancel|signal` bodies and WS
  `cancel` / `signal` ops) and the principal's right: scope `control`,
  the workflow visible to it (404 like an unknown one), not ended (409
  `failed_precondition`).
- `control_body()` is the one JSON body engines receive on the control
  PUB socket (topic = workflow id): every key of §8, null when not given.
- `RequestRate` rate-limits requests per principal (a token bucket each).

Pure: no I/O; `now` is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .envelope import MAX_DEPTH, MaybeBigInt, _depth_within, _suspect
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from .limits import Principal
from .state import BrokerState
from .subscribe import require

KINDS = ("cancel", "signal")
FIELDS = frozenset({"task_id", "name", "data", "reason", "request_id"})
MAX_NAME = 128  # characters of a signal name, a request id
MAX_REASON = 1024
MAX_TASK_ID = 256
MAX_DATA_BYTES = 65536  # a signal's `data`, encoded


@dataclass(frozen=True, slots=True)
class ControlRequest:
    kind: str  # "cancel" or "signal"
    workflow_id: str
    task_id: str | None = None
    name: str | None = None
    data: Any = None
    reason: str | None = None
    request_id: str | None = None  # the client's, if it gave one


def _text(fields: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not value.isprintable():
        raise InvalidArgument(f"'{key}' must be a string of 1-{limit} printable characters")
    return value


def data_size(fields: Mapping[str, Any]) -> int:
    """The bytes of a request's `data` encoded (0 without one), for
    `parse_request`'s `encoded_size`. A value nested deeper than orjson
    encodes (≈ 254 levels: the decoder takes 1,024) is InvalidArgument,
    not the encoder's TypeError."""
    if "data" not in fields:
        return 0
    try:
        return len(orjson.dumps(fields["data"]))
    except TypeError:  # orjson.JSONEncodeError: "Recursion limit reached"
        raise InvalidArgument(f"'data' nests deeper than {MAX_DEPTH} levels") from None


def parse_request(kind: str, workflow_id: object, fields: Mapping[str, Any], encoded_size: int = 0) -> ControlRequest:
    """A request from its fields (a JSON object); InvalidArgument if one is
    wrong. `encoded_size`: the bytes of the `data` value as received."""
    if kind not in KINDS:
        raise InvalidArgument(f"unknown control request {kind[:32]!r}: cancel or signal")
    if not isinstance(workflow_id, str) or not 1 <= len(workflow_id) <= 256:
        raise InvalidArgument("'workflow' must be a workflow id")
    unknown = set(fields) - FIELDS
    if unknown:
        raise InvalidArgument(f"unknown field '{sorted(unknown)[0][:64]}' in a {kind} request")
    name = _text(fields, "name", MAX_NAME)
    if kind == "signal" and name is None:
        raise InvalidArgument("a signal needs a 'name'")
    if kind == "cancel" and (name is not None or "data" in fields):
        raise InvalidArgument("a cancel takes no 'name' or 'data' (a signal does)")
    data = fields.get("data")
    if encoded_size > MAX_DATA_BYTES:
        raise InvalidArgument(f"'data' exceeds {MAX_DATA_BYTES} bytes")
    try:
        if isinstance(data, (dict, list)):
            deep = not _depth_within(data, MAX_DEPTH)
        elif _suspect(data):
            raise MaybeBigInt()
        else:
            deep = False
    except MaybeBigInt:  # what ingest refuses too: it would not reach the engine exactly
        raise InvalidArgument("'data' holds an integer beyond 64 bits: send it as a string") from None
    if deep:
        raise InvalidArgument(f"'data' nests deeper than {MAX_DEPTH} levels")
    return ControlRequest(
        kind,
        workflow_id,
        task_id=_text(fields, "task_id", MAX_TASK_ID),
        name=name,
        data=data,
        reason=_text(fields, "reason", MAX_REASON),
        request_id=_text(fields, "request_id", MAX_NAME),
    )


def check_request(state: BrokerState, principal: Principal, req: ControlRequest) -> None:
    """PermissionDenied without scope `control`; NotFound for a workflow
    unknown or invisible to the principal; FailedPrecondition once it ended."""
    require(principal, "control")
    wf = state.get(req.workflow_id)
    if wf is None or not principal.may_see(wf.tenant, wf.id):
        raise NotFound(f"workflow '{req.workflow_id}' not found")
    if wf.terminal:
        raise FailedPrecondition(f"workflow '{req.workflow_id}' has ended ({wf.snapshot.state})")


def control_body(req: ControlRequest, request_id: str, requested_by: str | None, ts_ms: int) -> dict[str, Any]:
    """What engines receive (DESIGN §8), every key present."""
    return {
        "type": req.kind,
        "workflow_id": req.workflow_id,
        "task_id": req.task_id,
        "name": req.name,
        "data": req.data,
        "reason": req.reason,
        "requested_by": requested_by,
        "request_id": request_id,
        "ts": ts_ms,
    }


class RequestRate:
    """At most `rate` requests a second per principal, in bursts of `burst`;
    principals are remembered LRU, at most `keep`."""

    def __init__(self, rate: float = 10.0, burst: int = 20, keep: int = 10000) -> None:
        self.rate = rate
        self.burst = burst
        self.keep = keep
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, at)

    def take(self, key: str, now: float) -> None:
        """Count one request of `key`; ResourceExhausted (429) over the rate."""
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise ResourceExhausted(f"too many control requests: at most {self.rate:g} a second")
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.keep:
            self._buckets.popitem(last=False)
