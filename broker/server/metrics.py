"""`GET /metrics`: the Prometheus text format, through prometheus-client.

One registry per hub (never the process-wide default: tests run several
brokers in one process). Counters and gauges are read from what the
broker counts anyway, at scrape time (`HubCollector`): the hot path pays
nothing for them. Histograms are observed where their events happen,
each once per occurrence and never per subscriber or per event: a store
batch's commit (`store_write`), a durable publish's wait
(`durable_commit`), a garbage collection's pause (`gc_pause`), and a key's
wake (`publish_to_write`: the hub's flusher, server/hub.py `_run_slice`).

Label sets are bounded: a reject reason (a closed set), a transport, an
audit action (a closed set), a GC generation, a kind of credential —
never a workflow id, a user or a tenant. docs/metrics.md lists every name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..core.audit import ACTIONS
from ..core.errors import REJECT_REASONS

if TYPE_CHECKING:
    from ..store.writer import Store
    from .hub import Hub

# No `_created` series beside each histogram: a broker's start time is
# process_start_time_seconds' business, and they double the output.
disable_created_metrics()

# Seconds. A commit takes a few ms on an idle database and up to seconds
# on a loaded one; a GC pause is sub-millisecond (young) to seconds (full);
# an event reaches its subscribers' sockets within a millisecond when the
# broker keeps up, tens of ms when wakes are batched (many subscribers per
# key, or write passes under load), seconds when it is overloaded.
_STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

TRANSPORTS = ("sse", "ws")

# Counters exported as broker_<name>_total: (key, help), from the core's
# BrokerState.counters and from the hub's stream-side counters.
_STATE_COUNTERS = {
    "ingested": ("ingested", "Events accepted at ingest (ZMQ and HTTP)."),
    "duplicates": ("duplicates", "Events dropped as duplicates of an id seen within the dedup window."),
    "gaps": ("gaps", "Sequence gaps: engine seqs that had not come when the reorder window closed."),
    "workflows_created": ("workflows_created", "Workflows created."),
    "workflows_evicted": ("workflows_evicted", "Workflows evicted from memory (past their TTL, or max_workflows)."),
    "workflows_restored": ("workflows_restored", "Workflows restored from the store at start."),
    "trimmed_events": ("trimmed_events", "Ring entries trimmed to keep buffer.total_bytes."),
}
_STREAM_COUNTERS = {
    "coalesced": ("coalesced", "Progress updates superseded within one write (not delivered, by design)."),
    "resyncs": ("resyncs", "Streams told to resync (their cursor was out of reach)."),
    "stream_gaps": ("gaps", "Gap messages sent to log streams (entries they had not read left the ring)."),
    "slow_consumer_closed": ("slow_consumer_closed", "Connections closed as slow consumers."),
    "writes": ("writes", "Writes of events to subscribers (each may carry many)."),
    "history_pages": ("history_pages", "Pages of history read from the store for resuming streams."),
    "control_requests": ("control_requests", "Control requests (cancel, signal) published to engines."),
    "internal_errors": ("internal_errors", "Sessions ended by an unexpected error (logged)."),
}


class Metrics:
    """The histograms, and the registry that also holds the hub's collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)  # the hub collector is read at scrape time only
        self.publish_to_write = Histogram(
            "broker_publish_to_write_seconds",
            "From an event's ingest to the wake that writes it to its subscribers "
            "(once per wake of a workflow or of the journal, for the oldest event it carries).",
            buckets=_WRITE_BUCKETS,
            registry=self.registry,
        )
        self.gc_pause = Histogram(
            "broker_gc_pause_seconds",
            "Pauses of the garbage collector, per generation.",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=self.registry,
        )
        self._gc = [self.gc_pause.labels(str(g)) for g in range(3)]

    def attach(self, hub: Hub) -> None:
        self.registry.register(HubCollector(hub))

    def attach_store(self, store: Store) -> None:
        """With a store: the histograms of its commits and durable waits."""
        store_write = Histogram(
            "broker_store_write_seconds",
            "Time to write and commit one batch to PostgreSQL.",
            buckets=_STORE_BUCKETS,
            registry=self.registry,
        )
        durable_commit = Histogram(
            "broker_durable_commit_seconds",
            "Time a durable publish (POST /v1/events?durable=true) waited for its commit.",
            buckets=_STORE_BUCKETS,
            registry=self.registry,
        )
        store.on_commit = store_write.observe
        store.on_durable = durable_commit.observe

    def observe_gc(self, generation: int, seconds: float) -> None:
        self._gc[generation].observe(seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type, in the format the scraper's
        Accept header asks for (prometheus-client's own choice: the text
        format 0.0.4 by default, OpenMetrics when asked)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def _subscriptions(hub: Hub) -> tuple[int, int]:
    """(subscriptions open, the most events one of them is behind)."""
    count = most = 0
    for conn in hub.connections.values():
        for watched in conn.subs.values():
            count += 1
            reader = watched.reader
            if reader is not None:
                behind = reader.behind
                if behind > most:
                    most = behind
    return count, most


class HubCollector(Collector):
    """Counters and gauges read from the hub at scrape time."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        stats = hub.stats()
        counters: dict[str, int] = stats["counters"]
        streams: dict[str, int] = stats["streams"]
        for name, (key, help_text) in _STATE_COUNTERS.items():
            yield CounterMetricFamily(f"broker_{name}", help_text, value=counters.get(key, 0))
        for name, (key, help_text) in _STREAM_COUNTERS.items():
            yield CounterMetricFamily(f"broker_{name}", help_text, value=streams.get(key, 0))

        rejected = CounterMetricFamily("broker_rejected", "Events rejected at ingest, by reason.", labels=["reason"])
        by_reason: dict[str, int] = stats["rejected_by_reason"]
        for reason in sorted(REJECT_REASONS):
            rejected.add_metric([reason], by_reason.get(reason, 0))
        yield rejected

        delivered = CounterMetricFamily(
            "broker_delivered", "Messages written to subscribers, by transport.", labels=["transport"]
        )
        conns = GaugeMetricFamily("broker_connections", "Open client connections, by transport.", labels=["transport"])
        by_transport: dict[str, int] = stats["delivered"]
        conn_counts: dict[str, Any] = stats["connections"]
        for transport in TRANSPORTS:
            delivered.add_metric([transport], by_transport.get(transport, 0))
            conns.add_metric([transport], conn_counts.get(transport, 0))
        yield delivered
        yield conns
        subscriptions, most_behind = _subscriptions(hub)
        yield GaugeMetricFamily(
            "broker_subscribers",
            "Subscriptions open: an SSE stream is one, a WebSocket holds any number.",
            value=subscriptions,
        )
        yield GaugeMetricFamily(
            "broker_lag_events",
            "The most events one subscription has not read yet "
            "(of its workflow; journal entries for multi-workflow ones).",
            value=most_behind,
        )
        yield GaugeMetricFamily(
            "broker_lag_seconds",
            "How long the most blocked write in progress has waited (0: none); stream.slow_consumer_timeout closes it.",
            value=hub.oldest_write_age(),
        )
        yield GaugeMetricFamily("broker_workflows", "Workflows held in memory.", value=stats["workflows"])
        yield GaugeMetricFamily(
            "broker_terminal_workflows",
            "Ended workflows held in memory (until their TTL).",
            value=stats["terminal_workflows"],
        )
        yield GaugeMetricFamily(
            "broker_ring_bytes", "Bytes held by the workflows' rings.", value=stats["buffer"]["ring_bytes"]
        )
        yield GaugeMetricFamily(
            "broker_ingest_behind",
            "1 while the ingest runs behind (wakes go out in write passes), else 0.",
            value=1 if stats["wakes"]["behind"] else 0,
        )

        audit = CounterMetricFamily(
            "broker_audit_events", "Security-relevant facts recorded, by action.", labels=["action"]
        )
        for action in ACTIONS:
            audit.add_metric([action], hub.audit_counts.get(action, 0))
        yield audit
        failures = CounterMetricFamily(
            "broker_auth_failures",
            "Refused credentials: HTTP/SSE/WebSocket tokens, ZMQ CURVE keys (ingest, control).",
            labels=["kind"],
        )
        failures.add_metric(["token"], hub.audit_counts.get("auth.failed", 0))
        failures.add_metric(["zmq_curve"], stats["security"]["zmq_auth_failures"])
        control_curve = hub.control_curve
        failures.add_metric(["control_curve"], 0 if control_curve is None else control_curve.failures)
        yield failures

        store = stats.get("store")
        if store is not None:
            yield GaugeMetricFamily(
                "broker_store_up", "1 while PostgreSQL answers, else 0.", value=1 if store["status"] == "up" else 0
            )
            yield GaugeMetricFamily(
                "broker_store_queue_events", "Events waiting to be written (the spill queue).", value=store["queued"]
            )
            yield GaugeMetricFamily(
                "broker_store_queue_bytes", "Bytes waiting to be written.", value=store["queued_bytes"]
            )
            yield CounterMetricFamily(
                "broker_store_written_events", "Events committed to PostgreSQL.", value=store["written"]
            )
            yield CounterMetricFamily(
                "broker_store_batches", "Batches committed to PostgreSQL.", value=store["batches"]
            )
            yield CounterMetricFamily(
                "broker_store_failures",
                "Store calls that failed (the database down or too slow).",
                value=store["failures"],
            )
            yield CounterMetricFamily(
                "broker_store_dropped",
                "Events never stored: the spill queue was full.",
                value=counters.get("store_dropped", 0),
            )
            yield CounterMetricFamily(
                "broker_store_refused_events",
                "Events the database refused (never stored, never retried).",
                value=store["refused"],
            )
