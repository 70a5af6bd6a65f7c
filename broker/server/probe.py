"""The data-path probe: proof that an event still goes all the way through.

Every `service.probe_interval` seconds the probe pushes one event through
the broker's own ZMQ ingest — a PUSH socket of its own connected to the
bound endpoint, with a CURVE key of its own (made at start, allowed
beside the clients directory's) when ingest requires CURVE — and reads it
back with a workflow reader once the core has sequenced it. Only a probe
that came back within the interval counts as alive: then systemd gets
`WATCHDOG=1` (server/notify.py) and `/readyz` says `data_path: ok`. A
health check that only answers HTTP would stay green while delivery has
stopped; this one does not.

The probe's workflow is `_broker.probe` in the broker's own tenant
`_broker` (core/state.py SYSTEM_TENANT): not listed by
`GET /v1/workflows` unless asked for by that tenant, not in any other
tenant's streams. Its events are counted apart (`probe_events` in
/v1/admin/stats, not `ingested`) and stored like any when there is a store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import trio
import zmq

from ..core.errors import InvalidArgument
from ..core.filters import Filter
from ..core.reader import WorkflowReader, plan_workflow_start
from ..core.state import SYSTEM_TENANT

if TYPE_CHECKING:
    from .curve import CurveServer
    from .hub import Hub

log = logging.getLogger("broker")

PROBE_WORKFLOW = "_broker.probe"
PROBE_TYPE = "broker.probe"
POLL = 0.005  # seconds between looks for the probe's event


class Probe:
    def __init__(
        self, hub: Hub, ctx: zmq.Context[Any], endpoint: str, interval: float, curve: CurveServer | None = None
    ) -> None:
        """`ctx`: the ingest socket's context (an inproc:// ingest is
        reachable from it only)."""
        self.hub = hub
        self.interval = interval
        self.ok: bool | None = None  # None: no probe has finished yet
        self.last_ok = 0.0  # trio time of the last probe that came back
        self.round_trip = 0.0  # seconds, of the last one that came back
        self.error = ""
        self.sent = 0
        self._sock = ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 10)
        if curve is not None:
            public, secret = zmq.curve_keypair()
            curve.allow(public)
            self._sock.curve_publickey, self._sock.curve_secretkey = public, secret
            self._sock.curve_serverkey = curve.public
        self._sock.connect(endpoint)
        self._seq = 0  # the probe workflow's seq read back last

    def close(self) -> None:
        self._sock.close(0)

    def status(self) -> dict[str, Any]:
        """For /readyz."""
        out: dict[str, Any] = {"ok": self.ok, "interval": self.interval}
        if self.ok is not None:
            out["round_trip_ms"] = round(self.round_trip * 1000, 2)
            out["last_ok_s_ago"] = round(trio.current_time() - self.last_ok, 2) if self.last_ok else None
        if self.error:
            out["error"] = self.error
        return out

    async def once(self) -> bool:
        """Push one probe event and read it back within the interval."""
        self.sent += 1
        n = self.sent
        frame = orjson.dumps(
            {"workflow_id": PROBE_WORKFLOW, "tenant": SYSTEM_TENANT, "type": PROBE_TYPE, "data": {"n": n}}
        )
        began = trio.current_time()
        marker = b'"n":%d}' % n
        with trio.move_on_after(self.interval):
            try:
                self._sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                self.error = "the probe could not hand its event to ZeroMQ (not connected to the ingest)"
                return False
            while True:
                if self._read_back(marker):
                    self.round_trip = trio.current_time() - began
                    self.last_ok = trio.current_time()
                    self.error = ""
                    return True
                await trio.sleep(POLL)
        self.error = f"the probe event did not come back within {self.interval:g} s"
        return False

    def _read_back(self, marker: bytes) -> bool:
        """Whether a reader of the probe workflow, from the last seq read,
        gets the event holding `marker`."""
        wf = self.hub.state.get(PROBE_WORKFLOW)
        if wf is None or wf.snapshot.seq <= self._seq:
            return False
        try:
            start = plan_workflow_start(wf, since=self._seq)
        except InvalidArgument:  # made again after an eviction (seqs from 1), or the ring moved on
            last = wf.ring.last()
            self._seq = wf.snapshot.seq
            return last is not None and marker in last.body
        reader = WorkflowReader(wf, Filter(), start)
        found = False
        for item in reader.pull():
            body = getattr(item, "body", b"")
            if marker in body:
                found = True
        self._seq = wf.snapshot.seq
        return found

    async def serve(
        self,
        on_alive: Callable[[], object] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Probe every interval (the first one: an interval after start,
        which probed once already); `on_alive()` after each that came back."""
        task_status.started()
        due = trio.current_time() + self.interval
        if self.ok and on_alive is not None:
            on_alive()
        while True:
            await trio.sleep_until(due)
            due = trio.current_time() + self.interval
            ok = await self.once()
            if ok != self.ok:
                if ok:
                    log.info("data path: alive again (probe round trip %.1f ms)", self.round_trip * 1000)
                else:
                    log.error("data path: %s", self.error)
            self.ok = ok
            if ok and on_alive is not None:
                on_alive()
