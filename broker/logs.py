"""Logging: one line per record on stdout (journald-friendly), text or JSON."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
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
        return super().format(record).replace("\n", "\\n")


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Hypercorn's own access/error logs are configured off in run.py.
    logging.getLogger("hypercorn").setLevel("WARNING")
