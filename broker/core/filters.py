"""Subscription filters (DESIGN.md §5), parsed from a query or a WS message.

A `Filter` decides, per entry, whether a subscriber sees it. Semantics where
the design is terse (also in docs/protocol.md):

- `types` picks among state, progress, log, event.
- `tasks` keeps events of those tasks plus the workflow's own state changes;
  workflow-level logs and events are left out.
- `states` restricts *state* messages only (`terminal` = completed, failed,
  cancelled); other kinds pass — combine with `types=state` for only those.
- `level` keeps logs at or above it; other kinds pass.
- Control messages (snapshot, resync, gap, end, error) always pass.
- `view` is set by the endpoint: "tasks" (task updates only) or "logs".

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .entry import Entry
from .envelope import LOG_LEVELS, TERMINAL_STATES
from .errors import InvalidArgument

KINDS = frozenset({"state", "progress", "log", "event"})
VIEWS = ("all", "tasks", "logs")


# A filter's fields, in order (compiled, a class has no `__slots__` to read).
_FIELDS = ("types", "tasks", "states", "min_level", "coalesce", "view")


class Filter:
    __slots__ = _FIELDS

    def __init__(
        self,
        *,
        types: frozenset[str] | None = None,
        tasks: frozenset[str] | None = None,
        states: frozenset[str] | None = None,
        min_level: int = 0,
        coalesce: bool = False,
        view: str = "all",
    ) -> None:
        self.types = types
        self.tasks = tasks
        self.states = states
        self.min_level = min_level
        self.coalesce = coalesce
        self.view = view

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filter) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        given = ", ".join(f"{n}={getattr(self, n)!r}" for n in _FIELDS if getattr(self, n) not in (None, 0, False))
        return f"Filter({given})"

    @property
    def is_log_stream(self) -> bool:
        """A stream of log lines: falls behind into `gap`, not `resync`."""
        return self.view == "logs" or self.types == frozenset({"log"})

    def matches(self, e: Entry) -> bool:
        kind = e.kind
        if kind == "gap":
            return True
        view = self.view
        if view == "tasks":
            if e.task_id is None or kind not in ("state", "progress"):
                return False
        elif view == "logs" and kind != "log":
            return False
        if self.types is not None and kind not in self.types:
            return False
        if self.tasks is not None:
            if e.task_id is None:
                if kind != "state":
                    return False
            elif e.task_id not in self.tasks:
                return False
        if self.states is not None and kind == "state" and e.state not in self.states:
            return False
        if self.min_level and kind == "log" and e.level < self.min_level:
            return False
        return True

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, view: str = "all", from_query: bool = True) -> Filter:
        """Build from query args (comma lists) or a WS filter object (JSON lists)."""
        known = {"types", "tasks", "states", "level", "coalesce"}
        if not from_query:
            unknown = set(raw) - known
            if unknown:
                raise InvalidArgument(f"unknown filter key '{sorted(unknown)[0]}'")

        def words(key: str) -> frozenset[str] | None:
            value = raw.get(key)
            if value is None:
                return None
            if from_query:
                if not isinstance(value, str):
                    raise InvalidArgument(f"'{key}' must be a comma-separated list")
                items = [v.strip() for v in value.split(",") if v.strip()]
            else:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise InvalidArgument(f"filter '{key}' must be a list of strings")
                items = value
            if not items:
                raise InvalidArgument(f"'{key}' must not be empty")
            return frozenset(items)

        types = words("types")
        if types is not None and not types <= KINDS:
            bad = sorted(types - KINDS)[0]
            raise InvalidArgument(f"unknown type '{bad}' in types (use state, progress, log, event)")
        tasks = words("tasks")
        states = words("states")
        if states is not None and "terminal" in states:
            states = (states - {"terminal"}) | TERMINAL_STATES
        level = raw.get("level")
        min_level = 0
        if level is not None:
            if not isinstance(level, str) or level not in LOG_LEVELS:
                raise InvalidArgument("'level' must be one of " + ", ".join(LOG_LEVELS))
            min_level = LOG_LEVELS[level]
        coalesce_raw = raw.get("coalesce")
        if coalesce_raw is None:
            coalesce = False
        elif from_query and coalesce_raw in ("true", "1", "false", "0"):
            coalesce = coalesce_raw in ("true", "1")
        elif not from_query and isinstance(coalesce_raw, bool):
            coalesce = coalesce_raw
        else:
            raise InvalidArgument("'coalesce' must be true or false")
        return cls(types=types, tasks=tasks, states=states, min_level=min_level, coalesce=coalesce, view=view)
