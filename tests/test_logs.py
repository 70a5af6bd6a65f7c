"""Log records: one line each, text or JSON, with the connection and
workflow ids of the records about them; and from the daemon, a control
request's line names its workflow (the daemon as a subprocess)."""

from __future__ import annotations

import logging

import orjson

from broker.logs import _JsonFormatter, _TextFormatter, ids


def record(msg: str, *, exc: bool = False, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("broker", logging.WARNING, __file__, 1, msg, (), None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            rec.exc_info = sys.exc_info()
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_text_lines_carry_the_ids_before_any_traceback() -> None:
    fmt = _TextFormatter()
    line = fmt.format(record("slow consumer", **ids(12, 'wf "a" b')))
    assert line.endswith('WARNING broker: slow consumer conn=12 workflow="wf \\"a\\" b"'), line
    with_tb = fmt.format(record("failed", exc=True, **ids(7)))
    assert "\n" not in with_tb and "failed conn=7\\nTraceback" in with_tb, with_tb
    assert fmt.format(record("plain")).endswith("WARNING broker: plain")


def test_json_lines_carry_the_ids_as_fields() -> None:
    fmt = _JsonFormatter()
    body = orjson.loads(fmt.format(record("control", **ids(workflow="wf-1"))))
    assert body["workflow"] == "wf-1" and "conn" not in body and body["message"] == "control"
    body = orjson.loads(fmt.format(record("slow", **ids(3))))
    assert body["conn"] == 3 and "workflow" not in body
    assert ids() == {}
