"""CORS headers (`http.cors_origins`), for the Quart routes and the plain-ASGI streams alike."""

from __future__ import annotations

from collections.abc import Sequence

ALLOW_HEADERS = "Content-Type, Authorization, Last-Event-ID"
ALLOW_METHODS = "GET, POST, OPTIONS"


def cors_headers(origin: str | None, allowed: Sequence[str]) -> list[tuple[str, str]]:
    """CORS response headers for a request from `origin`; none when the
    origin is not allowed (the browser then refuses the response)."""
    if not origin or not allowed or not ("*" in allowed or origin in allowed):
        return []
    return [
        ("Access-Control-Allow-Origin", "*" if "*" in allowed else origin),
        ("Vary", "Origin"),
        ("Access-Control-Allow-Headers", ALLOW_HEADERS),
        ("Access-Control-Allow-Methods", ALLOW_METHODS),
    ]


def encode_headers(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header pairs as ASGI wants them."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
