"""Cursor syntax (DESIGN.md §3, §5).

- workflow cursor: `<epoch>:<seq>` (the SSE id of single-workflow streams)
- journal cursor: `<node-epoch>.<offset>` (the SSE id of multi-workflow streams)
- `since`: a bare seq, 0 meaning "from the first event".

Parsers return None for anything malformed; callers decide whether that is a
400 (since=) or a `resync` (Last-Event-ID). Pure.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

# ASCII digits only: `\d` would take any Unicode digit (an Arabic-Indic
# "٣" is not a sequence number); fullmatch, as `$` allows a final newline.
_WF_RE = re.compile(r"([A-Za-z0-9_-]{1,32}):([0-9]{1,19})")
_JOURNAL_RE = re.compile(r"([A-Za-z0-9_-]{1,32})\.([0-9]{1,19})")
_SINCE_RE = re.compile(r"[0-9]{1,19}")


def parse_workflow_cursor(text: str) -> tuple[str, int] | None:
    m = _WF_RE.fullmatch(text.strip())
    return (m.group(1), int(m.group(2))) if m else None


def parse_journal_cursor(text: str) -> tuple[str, int] | None:
    m = _JOURNAL_RE.fullmatch(text.strip())
    return (m.group(1), int(m.group(2))) if m else None


def parse_since(text: str) -> int | None:
    return int(text) if _SINCE_RE.fullmatch(text.strip()) else None


SINCE_MESSAGE = "'since' must be a non-negative integer sequence number"


def since_seq(value: object, *, from_query: bool) -> int:
    """A single-workflow `since`: one rule for both transports. The value
    is an integer — a WebSocket JSON number (a string is the wrong type),
    or a query argument's decimal digits, nothing else (no sign, no
    spaces). Raises InvalidArgument otherwise."""
    if from_query:
        if isinstance(value, str) and _SINCE_RE.fullmatch(value):
            return int(value)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**19:
        return value
    raise InvalidArgument(SINCE_MESSAGE)
