"""Event builders for the end-to-end tests: dicts (or raw JSON bytes) as an
engine would send them, over ZMQ or in `POST /v1/events`.

Every builder takes the workflow id first and sets only the fields it is
given, so a test's event is what its call says. Nothing here talks to a
daemon or imports the broker: tests/core/helpers.py reuses the payload
builders (`nested`, `nested_json`) for the synchronous core tests.
"""

from __future__ import annotations

from typing import Any

import orjson


def ev(wid: str, etype: str, **fields: Any) -> dict[str, Any]:
    """An event of type `etype` for workflow `wid`."""
    return {"workflow_id": wid, "type": etype, **fields}


def log(wid: str, message: str, level: str = "info", **fields: Any) -> dict[str, Any]:
    """A log line (`level` defaults to info)."""
    return ev(wid, "log", level=level, message=message, **fields)


def task(wid: str, tid: str, state: str, **fields: Any) -> dict[str, Any]:
    """A `task.<state>` event of task `tid`."""
    return ev(wid, f"task.{state}", task_id=tid, **fields)


def tick(wid: str, i: int, payload: int = 0) -> dict[str, Any]:
    """A plain `tick` event numbered `i` in its data, padded by `payload` bytes."""
    data: dict[str, Any] = {"i": i}
    if payload:
        data["f"] = "x" * payload
    return ev(wid, "tick", data=data)


def nested(depth: int) -> Any:
    """A JSON value `depth` containers deep (lists and dicts alternating)."""
    value: Any = "leaf"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


def nested_json(depth: int) -> bytes:
    """JSON text of `nested(depth)`, built by hand: orjson encodes only ~254 levels."""
    text = b'"leaf"'
    for i in range(depth):
        text = b'{"k":' + text + b"}" if i % 2 else b"[" + text + b"]"
    return text


def with_deep_field(event: dict[str, Any], key: str, depth: int) -> bytes:
    """`event` as JSON with `key` set to a value `depth` containers deep."""
    return orjson.dumps(event)[:-1] + b',"' + key.encode() + b'":' + nested_json(depth) + b"}"


def deep_event(wid: str, depth: int) -> bytes:
    """A `tick` whose `data` is `depth` containers deep, as JSON bytes."""
    return with_deep_field(ev(wid, "tick"), "data", depth)
