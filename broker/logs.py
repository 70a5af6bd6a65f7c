"""Logging: one line per record on stdout (journald-friendly), text or JSON.

A record about a connection or a workflow carries its id (`extra=ids(…)`):
`conn=12 workflow="wf-1"` at the end of a text line, `"conn"` and
`"workflow"` fields in JSON, so a line can be found by either.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson


def ids(conn: int | None = None, workflow: str | None = None) -> dict[str, int | str]:
    """The `extra=` of a record about connection `conn` / workflow `workflow`."""
    out: dict[str, int | str] = {}
    if conn is not None:
        out["conn"] = conn
    if workflow is not None:
        out["workflow"] = workflow
    return out


def _ids_text(record: logging.LogRecord) -> str:
    conn = getattr(record, "conn", None)
    workflow = getattr(record, "workflow", None)
    out = ""
    if conn is not None:
        out += f" conn={conn}"
    if workflow is not None:
        out += " workflow=" + orjson.dumps(workflow).decode()  # quoted: an id may hold spaces
    return out


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("conn", "workflow"):
            value = getattr(record, key, None)
            if value is not None:
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        # UTC, as the "Z" in the format says. Set on the instance: as a class
        # attribute mypy would take the function for a method.
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        # One record, one line, even for tracebacks.
        line = super().format(record)
        ids = _ids_text(record)
        if ids:
            # Before a traceback (which format() appends), not after it.
            head, sep, tail = line.partition("\n")
            line = head + ids + sep + tail
        return line.replace("\n", "\\n")


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Hypercorn's own access/error logs are configured off in run.py.
    logging.getLogger("hypercorn").setLevel("WARNING")
