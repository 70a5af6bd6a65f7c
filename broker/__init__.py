"""Workflow event broker: ZeroMQ ingest, ordered resumable streams over SSE and WebSocket."""

__version__ = "0.1.0"
