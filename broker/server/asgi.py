"""What the plain-ASGI stream handlers (sse.py, ws.py) read from a scope."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote

from werkzeug.datastructures import Headers, MultiDict


def path_segments(scope: Mapping[str, Any]) -> list[str]:
    """The request path's segments, each percent-decoded on its own: a
    workflow id may hold a '/' (sent as %2F), which the decoded
    `scope["path"]` cannot tell from a separator."""
    raw = scope.get("raw_path")
    if not raw:
        return str(scope["path"]).split("/")
    return [unquote(s, errors="replace") for s in raw.decode("latin-1").split("?", 1)[0].split("/")]


class ScopeInfo:
    """Headers (case-insensitive), query args and client address of a request."""

    __slots__ = ("path", "method", "headers", "args", "remote")

    def __init__(self, scope: dict[str, Any]) -> None:
        self.path: str = scope["path"]
        self.method: str = scope.get("method", "GET")
        self.headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]])
        qs = scope.get("query_string", b"").decode("utf-8", "replace")
        self.args: MultiDict[str, str] = MultiDict(parse_qsl(qs, keep_blank_values=True))
        client = scope.get("client")
        self.remote = str(client[0]) if client else ""
