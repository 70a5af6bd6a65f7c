"""A minimal SSE client over httpx for tests: parses frames as EventSource does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import httpx
import orjson


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: str
    retry: int | None = None

    @property
    def json(self) -> Any:
        return orjson.loads(self.data)


async def iter_sse(response: httpx.Response) -> AsyncIterator[SseEvent | str]:
    """Yield SseEvent per dispatched event, and comment lines as str."""
    ev_id: str | None = None
    event = ""
    data: list[str] = []
    retry: int | None = None
    # Closed with this generator: a consumer that stops early (an SSE stream
    # never ends by itself) must not leave the line iterator to the GC.
    async with aclosing(response.aiter_lines()) as lines:
        async for line in lines:
            if line == "":
                if data:
                    yield SseEvent(ev_id, event or "message", "\n".join(data), retry)
                event, data = "", []  # retry persists, as in EventSource
                continue
            if line.startswith(":"):
                yield line
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                ev_id = value
            elif field == "event":
                event = value
            elif field == "data":
                data.append(value)
            elif field == "retry":
                retry = int(value)
