"""Trio adapters around the sans-io core: ZMQ ingest, HTTP/SSE, WebSocket, lifecycle."""
