"""The event envelope of DESIGN.md §2: parse and validate one ingest frame.

`decode_frame(bytes)` turns one ZeroMQ frame (or one HTTP body) into a list
of per-event results, so that one bad event in a batch never affects the
others. `validate(obj)` checks one JSON object and returns the normalised
event dict (only the envelope's fields, with `state` and `kind` derived).

Decisions where DESIGN.md is silent (also in docs/protocol.md):
- Unknown top-level fields are rejected (`unknown_field`): a typo such as
  `workflowid` must not silently create a stream. Opaque payload goes in `data`.
- `workflow.<x>` / `task.<x>` accept any lower-case state word `x`; the
  terminal sets are fixed (completed, failed, cancelled).
- Strings that name things (ids, tenant, task) may not hold control chars.

Pure functions; no I/O, no clock.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from .errors import Reject

WORKFLOW_STATES = ("created", "running", "suspended", "resumed", "completed", "failed", "cancelled")
TASK_STATES = (
    "created",
    "scheduled",
    "pending",
    "running",
    "retrying",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

KNOWN_FIELDS = frozenset(
    {
        "workflow_id",
        "type",
        "id",
        "seq",
        "tenant",
        "ts",
        "task_id",
        "state",
        "progress",
        "level",
        "message",
        "parent_id",
        "result",
        "error",
        "data",
    }
)

# Matched whole (fullmatch: `$` would let a final newline through).
_TYPE_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_STATE_RE = re.compile(r"[a-z][a-z0-9_]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_SEQ = 2**63 - 1
# orjson decodes 1024 levels but encodes only ~254, and snapshots nest
# payloads three levels deeper: keep opaque payloads well inside that.
MAX_DEPTH = 64
MAX_BATCH = 10000  # events in one frame: bounds the work one frame can cause


# orjson reads an integer beyond 64 bits as a float (1e29 for
# 123456789012345678901234567890): streamed, it would have changed. Such a
# float is integral and this large; only then is the frame read again
# exactly (`exact_items`) to tell a float literal from an integer.
BIG = float(2**63)
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what orjson reads (and writes) as an integer


class MaybeBigInt(Exception):
    """A payload holds a float that may have been an integer beyond 64 bits."""


def _suspect(value: Any) -> bool:
    return type(value) is float and abs(value) >= BIG and value.is_integer()


def _depth_within(value: Any, limit: int, exact: bool = False) -> bool:
    """True if the JSON value nests at most `limit` containers deep. Raises
    MaybeBigInt on a float that may have been a large integer; with
    `exact` (the value comes from `exact_items`), Reject on an integer
    beyond 64 bits."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif exact:
                _check_int(child)
            elif _suspect(child):
                raise MaybeBigInt()
    return True


def _check_int(value: Any) -> None:
    if type(value) is int and not INT_MIN <= value <= INT_MAX:
        raise Reject(
            "invalid_field",
            f"an integer beyond 64 bits ({str(value)[:40]}) would not stream exactly: send it as a string",
        )


def exact_items(frame: bytes) -> list[Any]:
    """The frame's items read with Python's own JSON parser, which keeps
    every integer exact (slow; only for a frame `MaybeBigInt` flagged)."""
    import json

    obj = json.loads(frame)
    return obj if isinstance(obj, list) else [obj]


def has_control(value: str) -> bool:
    """Whether `value` holds a control character, which no name (workflow
    id, tenant, task id) may: such a name names nothing."""
    return not (value.isascii() and value.isprintable()) and _CONTROL_RE.search(value) is not None


def _name(obj: dict[str, Any], key: str, max_len: int, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise Reject("missing_field", f"'{key}' is required")
        return None
    if not isinstance(value, str):
        raise Reject("invalid_field", f"'{key}' must be a string")
    if not 1 <= len(value) <= max_len:
        raise Reject("invalid_field", f"'{key}' must be 1-{max_len} characters")
    # isprintable() is exactly "no control character" for ASCII text (C
    # speed); other text gets the full check (C1 controls too).
    if not (value.isascii() and value.isprintable()) and _CONTROL_RE.search(value):
        raise Reject("invalid_field", f"'{key}' must not contain control characters")
    return value


def _int(obj: dict[str, Any], key: str, minimum: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int subclass in Python; `true` is not a sequence number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise Reject("invalid_field", f"'{key}' must be an integer")
    if not minimum <= value <= MAX_SEQ:
        raise Reject("invalid_field", f"'{key}' must be an integer >= {minimum}")
    return value


def is_state_word(value: str) -> bool:
    """A state as events name it: a lower-case word of at most 64 characters."""
    return len(value) <= 64 and _STATE_RE.fullmatch(value) is not None


def kind_of(event_type: str) -> str:
    """Stream message kind for an event type (DESIGN.md §5)."""
    if event_type == "task.progress":
        return "progress"
    if event_type == "log":
        return "log"
    if event_type.startswith(("workflow.", "task.")) and event_type.count(".") == 1:
        return "state"
    return "event"


_OPTIONAL_NAMES = (("id", 128), ("tenant", 128), ("task_id", 256), ("parent_id", 256))
_OPTIONAL_INTS = (("seq", 1), ("ts", 0))


# Event types already checked, with their kind and the state they name
# (None unless `workflow.<state>` / `task.<state>`): an engine sends a few
# dozen types, so the regular expressions run once per type, not per
# event. Bounded: cleared when full (a flood of made-up types costs what it
# cost before).
_TYPES: dict[str, tuple[str, str | None]] = {}
_TYPES_MAX = 4096


def _type_info(etype: Any) -> tuple[str, str | None]:
    info = _TYPES.get(etype) if type(etype) is str else None
    if info is not None:
        return info
    if not isinstance(etype, str) or len(etype) > 128 or not _TYPE_RE.fullmatch(etype):
        raise Reject("invalid_field", "'type' must be a dotted name of letters, digits, '_' or '-'")
    kind = kind_of(etype)
    named = None
    if kind == "state":
        named = etype.split(".", 1)[1]
        if not _STATE_RE.fullmatch(named):
            raise Reject("invalid_field", f"'{etype}' does not name a state")
    if len(_TYPES) >= _TYPES_MAX:
        _TYPES.clear()
    info = _TYPES[etype] = (kind, named)
    return info


def validate(obj: Any, exact: bool = False) -> dict[str, Any]:
    """Validate one event object; return its normalised dict or raise
    Reject (or MaybeBigInt: then validate the item of `exact_items` with
    `exact`)."""
    if not isinstance(obj, dict):
        raise Reject("not_object", "an event must be a JSON object")
    if not KNOWN_FIELDS.issuperset(obj):  # one C-level check on the hot path
        key = next(k for k in obj if k not in KNOWN_FIELDS)
        shown = key if len(key) <= 64 else key[:64] + "…"
        raise Reject("unknown_field", f"unknown field '{shown}'")

    ev: dict[str, Any] = {}
    ev["workflow_id"] = _name(obj, "workflow_id", 256, required=True)
    etype = obj.get("type")
    if etype is None:
        raise Reject("missing_field", "'type' is required")
    kind, named = _type_info(etype)
    ev["type"] = etype

    for key, limit in _OPTIONAL_NAMES:
        if key in obj:
            value = _name(obj, key, limit)
            if value is not None:
                ev[key] = value
    for key, minimum in _OPTIONAL_INTS:
        if key in obj:
            number = _int(obj, key, minimum)
            if number is not None:
                ev[key] = number

    state = obj.get("state")
    if state is not None:
        if not isinstance(state, str) or not _STATE_RE.fullmatch(state) or len(state) > 64:
            raise Reject("invalid_field", "'state' must be a lower-case word")
    else:
        state = named
    if state is not None:
        ev["state"] = state

    if etype.startswith("task.") and "task_id" not in ev:
        raise Reject("missing_field", f"'task_id' is required for {etype}")

    progress = obj.get("progress")
    if progress is not None:
        if not isinstance(progress, (int, float)) or isinstance(progress, bool):
            raise Reject("invalid_field", "'progress' must be a number")
        if not 0 <= progress <= 100:
            raise Reject("invalid_field", "'progress' must be between 0 and 100")
        ev["progress"] = progress
    elif etype == "task.progress":
        raise Reject("missing_field", "'progress' is required for task.progress")

    level = obj.get("level")
    if level is not None:
        if not isinstance(level, str) or level not in LOG_LEVELS:
            raise Reject("invalid_field", "'level' must be one of " + "/".join(LOG_LEVELS))
        ev["level"] = level
    elif etype == "log":
        raise Reject("missing_field", "'level' is required for log")

    message = obj.get("message")
    if message is not None:
        if not isinstance(message, str):
            raise Reject("invalid_field", "'message' must be a string")
        ev["message"] = message

    for key in ("result", "error", "data"):
        if key in obj:
            payload = obj[key]  # any JSON (its own name: `value` above is a str)
            if isinstance(payload, (dict, list)):
                if not _depth_within(payload, MAX_DEPTH, exact):
                    raise Reject("invalid_field", f"'{key}' nests deeper than {MAX_DEPTH} levels")
            elif exact:
                _check_int(payload)
            elif _suspect(payload):
                raise MaybeBigInt()
            ev[key] = payload
    ev["kind"] = kind
    return ev


def parse_frame(frame: bytes, max_bytes: int) -> list[Any] | Reject:
    """The events of one frame, not yet validated (a JSON array is a
    batch), or the Reject of a frame that fails as a whole (too large, not
    JSON, an empty or oversized batch). Validating each item is the
    caller's step, so a large batch can be applied a slice at a time."""
    if len(frame) > max_bytes:
        return Reject("too_large", f"frame of {len(frame)} bytes exceeds {max_bytes}")
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        return Reject("invalid_json", f"not UTF-8 JSON: {str(exc)[:120]}")
    if not isinstance(obj, list):
        return [obj]
    if not obj:
        return Reject("not_object", "empty batch")
    if len(obj) > MAX_BATCH:
        return Reject("too_large", f"batch of {len(obj)} events exceeds {MAX_BATCH}")
    return obj


def decode_frame(frame: bytes, max_bytes: int) -> list[dict[str, Any] | Reject]:
    """Decode one frame into events (a JSON array is a batch) or rejects.

    A frame that fails as a whole (too large, not JSON) yields one Reject.
    """
    items = parse_frame(frame, max_bytes)
    if isinstance(items, Reject):
        return [items]
    out: list[dict[str, Any] | Reject] = []
    exact: list[Any] | None = None
    for index, item in enumerate(items):
        try:
            try:
                out.append(validate(item))
            except MaybeBigInt:
                exact = exact_items(frame) if exact is None else exact
                out.append(validate(exact[index], exact=True))
        except Reject as rej:
            out.append(rej)
    return out
