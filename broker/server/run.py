"""The daemon's lifecycle: bind, serve, drain, exit (DESIGN.md §11, §13).

Startup binds the ZMQ PULL socket and the HTTP listening socket
synchronously, before any task starts: a bad endpoint or a port in use is a
`StartupError` (one line, exit 2) with nothing half-started.

Then, in one nursery: the ingest task, the ticker, Hypercorn on the
pre-bound socket. SIGTERM/SIGINT: stop ingest, `hub.begin_drain()` (every
stream flushes and ends: SSE without `end`, WebSocket with 1001), tell
Hypercorn to stop, and give it `shutdown_timeout` seconds before cancelling
what is left. The process then exits 0.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
import zmq
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import wrap_app

from ..config import Config, ConfigError, LimitsConfig, parse_http_bind
from ..config import load as load_config
from ..core.limits import SocketBudget, budget_for
from . import gc_policy
from .control import ControlChannel, bind_control
from .curve import CurveServer
from .http import create_app
from .hub import Hub
from .identity import Identity
from .listen import serve_http
from .notify import Notifier
from .probe import Probe
from .zmq_ingest import bind_pull, serve_zmq_ingest

if TYPE_CHECKING:  # imported when a store is configured (psycopg is heavy)
    from ..store.writer import Store

log = logging.getLogger("broker")


class StartupError(Exception):
    """Startup failed; str() is the one line the CLI prints."""


def bind_http(bind: str, backlog: int, slow_consumer_timeout: float = 0) -> socket.socket:
    host, port = parse_http_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if slow_consumer_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
            # Inherited by accepted sockets (Linux): the kernel aborts a
            # connection whose sent data stays unacknowledged, or whose
            # receive window stays zero (a client that stopped reading), this
            # long. Hypercorn's writes are shielded from cancellation, so this
            # is what frees a stream stuck on a dead reader. The grace beyond
            # the timeout lets a write that does complete late send `error`
            # (SSE) or close 4008 (WS) first (see Hub.serve_watchdog).
            grace = max(1.0, slow_consumer_timeout / 5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int((slow_consumer_timeout + grace) * 1000))
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise StartupError(f"cannot listen on http.bind {bind}: {reason}") from None
    return sock


def _hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    hc.accesslog = None
    hc.errorlog = None
    # Idle keep-alive connections, and the head of a request, get this long
    # (server/listen.py); bodies have their own deadlines (http.py, sse.py).
    hc.keep_alive_timeout = config.http.idle_timeout
    hc.read_timeout = None
    hc.graceful_timeout = config.shutdown_timeout
    hc.websocket_max_message_size = 64 * 1024
    hc.backlog = config.http.backlog
    # WebSocket permessage-deflate only with stream.compression (listen.py).
    hc.broker_ws_deflate = config.stream.compression  # type: ignore[attr-defined]
    return hc


def raise_nofile_limit() -> int:
    """Use the hard limit of open files (systemd's LimitNOFILE sets it): every
    connection is a file descriptor, and the soft default is often 1024.
    Returns the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def socket_budget(config: Config, nofile: int) -> tuple[Config, SocketBudget]:
    """The accepted-socket budget below the open-file limit, and the config
    with `limits.global` lowered (with a warning) if that limit cannot
    honour it: every stream is a file descriptor."""
    budget = budget_for(nofile, config.limits.global_)
    if budget.lowered:
        # A warning when the operator asked for it; the default is only
        # "as many as the machine allows" (at INFO, so it is seen).
        default = config.limits.global_ == LimitsConfig().global_
        (log.info if default else log.warning)(
            "limits.global = %d%s needs more open files than the limit of %d allows: using %d "
            "(raise LimitNOFILE / ulimit -n to allow more)",
            config.limits.global_,
            " (the default)" if default else "",
            nofile,
            budget.global_limit,
        )
        config = dataclasses.replace(config, limits=dataclasses.replace(config.limits, global_=budget.global_limit))
    return config, SocketBudget(budget.sockets)


def reload(hub: Hub, config: Config, nofile: int) -> None:
    """SIGHUP: read the config file again and take from it, without
    dropping a connection, the JWT keys ([auth]), the limits and the log
    level, and read the CURVE clients directories again. A file that does
    not load changes nothing from it; a part that fails keeps what is in
    force; each says why in the log. Everything else (binds, the store,
    auth.mode, stream settings) changes only with a restart."""
    fresh: Config | None
    try:
        fresh = load_config(config.source) if config.source != "<defaults>" else config
    except ConfigError as exc:
        log.error("reload: %s; nothing from the file changes", exc)
        fresh = None
    auth_ok = fresh is not None
    changed: list[str] = []
    if fresh is not None:
        try:
            if fresh.auth.mode != hub.identity.mode:
                raise ConfigError(f"auth.mode changed to {fresh.auth.mode!r}: that needs a restart")
            hub.identity = Identity(fresh.auth)
        except ConfigError as exc:
            log.error("reload: %s; the JWT keys in force stay", exc)
            auth_ok = False
        changed = reload_limits(hub, fresh.limits, nofile)
        old_level = logging.getLevelName(logging.getLogger().level).lower()
        if old_level != fresh.log.level:
            changed.append(f"log.level {old_level} -> {fresh.log.level}")
    curve_ok = hub.ingest_curve.reload() if hub.ingest_curve is not None else True
    if hub.control_curve is not None:
        curve_ok = hub.control_curve.reload() and curve_ok
    hub.reloads += 1
    ok = auth_ok and curve_ok
    what = "keys read again" + "".join(f"; {c}" for c in changed)
    hub.audit(
        "config.reloaded", detail=what if ok else f"failed: the keys in force stay{''.join(f'; {c}' for c in changed)}"
    )
    if ok:
        log.info(
            "reload: %s (auth %s, CURVE clients %s)",
            what,
            hub.identity.mode,
            len(hub.ingest_curve.clients) if hub.ingest_curve is not None else "off",
        )
    else:
        hub.reload_failures += 1
    if fresh is not None:  # last, so that the line above is still logged at the old level
        logging.getLogger().setLevel(fresh.log.level.upper())


def reload_limits(hub: Hub, limits: LimitsConfig, nofile: int) -> list[str]:
    """New connection limits, in force for the connections that open from
    now on (open ones stay, also past a lowered limit; `per_user` evicts
    at its user's next connection, `events_per_second` paces connections
    opened after it). `global` is held to the socket budget as at start."""
    budget = budget_for(nofile, limits.global_)
    if budget.lowered:
        log.warning(
            "reload: limits.global = %d does not fit the open-file limit %d: using %d",
            limits.global_,
            nofile,
            budget.global_limit,
        )
        limits = dataclasses.replace(limits, global_=budget.global_limit)
    old = hub.config.limits
    if limits == old:
        return []
    table = hub.table
    table.global_limit, table.per_user, table.per_tenant = limits.global_, limits.per_user, limits.per_tenant
    hub.config = dataclasses.replace(hub.config, limits=limits)
    return [
        f"limits.{f.name.rstrip('_')} {getattr(old, f.name):g} -> {getattr(limits, f.name):g}"
        for f in dataclasses.fields(limits)
        if getattr(old, f.name) != getattr(limits, f.name)
    ]


async def _watchdog_from_the_loop(notifier: Notifier) -> None:
    """WATCHDOG=1 from the event loop when the probe is off: a stuck loop
    still gets the unit restarted."""
    assert notifier.watchdog is not None
    while True:
        notifier.send(WATCHDOG=1)
        await trio.sleep(notifier.watchdog / 2)


async def _flush_store(store: Store, node_id: str, deadline: float) -> None:
    """What ingest accepted goes to disk before the exit (by `deadline`)."""
    if await store.wait_committed(store.queue.pushed, timeout=max(0.0, deadline - trio.current_time())):
        with trio.move_on_at(deadline):
            await store.end_run(node_id)
    else:
        log.error("store: %d events not written at exit", len(store.queue))


async def serve(config: Config, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the broker until SIGTERM/SIGINT (or cancellation)."""
    nofile = raise_nofile_limit()
    config, budget = socket_budget(config, nofile)
    try:
        hub = Hub(config)  # reads the auth keys
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    hub.sockets = budget
    try:
        curve = CurveServer.from_config("ingest", config.ingest.curve_secret_file, config.ingest.curve_clients_dir)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    hub.ingest_curve = curve
    cc = config.control
    try:
        control_curve = CurveServer.from_config("control", cc.curve_secret_file, cc.curve_clients_dir)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    if control_curve is not None and not cc.bind:
        raise StartupError("config key 'control.curve_secret_file': CURVE is set but control.bind is not")
    ctx = zmq.Context()
    control_sock = None
    notifier = Notifier()
    notifier.send(STATUS="starting")
    probe: Probe | None = None
    try:
        if config.store.backend == "postgres":
            notifier.send(STATUS="restoring from the store")
            # Before anything binds: no event may arrive for a workflow not
            # restored yet (store/writer.py).
            from ..store.pg import SchemaTooNew
            from ..store.writer import StoreRefused, StoreUnavailable, open_store

            try:
                hub.store = await open_store(config.store, hub.state)
                hub.metrics.attach_store(hub.store)
            except (StoreUnavailable, StoreRefused, SchemaTooNew) as exc:
                raise StartupError(f"store: {exc}") from None
        token = trio.lowlevel.current_trio_token()

        def zmq_refused(socket_group: str) -> Callable[[str], None]:
            def refused(reason: str) -> None:  # in the authenticator's thread
                detail = f"{socket_group}: {reason}"
                try:
                    token.run_sync_soon(lambda: hub.audit("zmq.auth_failed", transport="zmq", detail=detail))
                except trio.RunFinishedError:
                    pass

            return refused

        if curve is not None:
            curve.start(ctx, zmq_refused("ingest"))  # before the socket binds: without it any key would do
        if control_curve is not None:
            control_curve.start(ctx, zmq_refused("control"))
            hub.control_curve = control_curve
        if cc.bind:
            try:
                control_sock, control_endpoint = bind_control(ctx, cc.bind, control_curve)
            except zmq.ZMQError as exc:
                raise StartupError(f"cannot bind control.bind {cc.bind}: {exc}") from None
            hub.control = ControlChannel(control_sock, control_endpoint)
        try:
            pull, endpoint = bind_pull(
                ctx, config.ingest.zmq_bind, config.ingest.rcvhwm, config.ingest.max_frame_bytes, curve
            )
        except zmq.ZMQError as exc:
            raise StartupError(f"cannot bind ingest.zmq_bind {config.ingest.zmq_bind}: {exc}") from None
        try:
            http_sock = bind_http(config.http.bind, config.http.backlog, config.stream.slow_consumer_timeout)
        except StartupError:
            pull.close(0)
            raise
        hub.ingest_endpoint = endpoint
        host, port = http_sock.getsockname()[:2]
        http_addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        app = create_app(hub)
        stop_http = trio.Event()

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                ingest_scope = trio.CancelScope()

                ingest_stopped = trio.Event()

                async def ingest() -> None:
                    try:
                        with ingest_scope:
                            await serve_zmq_ingest(pull, hub, max_parts=config.ingest.max_parts, curve=curve)
                    finally:
                        ingest_stopped.set()

                if hub.store is not None:
                    nursery.start_soon(hub.store.serve, hub.state)
                    nursery.start_soon(hub.store.serve_retention)
                nursery.start_soon(ingest)
                if hub.control is not None:
                    nursery.start_soon(hub.control.serve)
                nursery.start_soon(hub.serve_ticker)
                nursery.start_soon(hub.serve_watchdog)
                nursery.start_soon(hub.serve_flusher)
                hc = _hypercorn_config(config)
                http_done = trio.Event()

                async def http(task_status: trio.TaskStatus[Any]) -> None:
                    try:
                        await serve_http(
                            # The dispatcher itself (http.py): streams skip Quart.__call__.
                            wrap_app(app.asgi_app, hc.wsgi_max_body_size, None),
                            hc,
                            http_sock,
                            budget,
                            stop_http.wait,
                            task_status=task_status,
                        )
                    finally:
                        http_done.set()

                await nursery.start(http)
                # The data-path probe (server/probe.py): an event through
                # our own ingest and back, behind the watchdog and /readyz.
                interval = config.service.probe_interval
                if notifier.watchdog is not None and interval:
                    interval = min(interval, notifier.watchdog / 3)
                if interval:
                    probe = hub.probe = Probe(hub, ctx, endpoint, interval, curve)
                    probe.ok = await probe.once()
                    if not probe.ok:
                        log.warning("data path: the first probe did not come back (%s)", probe.error)
                    alive = (lambda: notifier.send(WATCHDOG=1)) if notifier.watchdog is not None else None
                    nursery.start_soon(probe.serve, alive)
                elif notifier.watchdog is not None:
                    nursery.start_soon(_watchdog_from_the_loop, notifier)
                hub.gc_stats = gc_policy.install()
                hub.gc_stats.on_pause = hub.metrics.observe_gc
                hub.full_collections = gc_policy.FullCollections(trio.current_time())
                nursery.start_soon(
                    gc_policy.serve_full_collections,
                    hub.full_collections,
                    lambda: len(hub.connections),
                    # Quiet = nothing ingested *or delivered*: a collection
                    # must not land on the tail of a burst's deliveries.
                    lambda: hub.state.counters["ingested"] + hub.counters["writes"],
                )
                info = {"http": http_addr, "zmq": endpoint, "node": config.node.id, "node_epoch": hub.state.node_epoch}
                control_at = hub.control.endpoint if hub.control is not None else ""
                info["control"] = control_at
                log.info(
                    "ready http=%s zmq=%s node=%s%s",
                    http_addr,
                    endpoint,
                    config.node.id,
                    f" control={control_at}" if control_at else "",
                )
                task_status.started(info)
                notifier.send(READY=1, STATUS=f"ready: http {http_addr}, zmq {endpoint}")

                async for signum in signals:
                    if signum == signal.SIGHUP:
                        reload(hub, config, nofile)
                        continue
                    log.info("received %s: draining", signal.Signals(signum).name)
                    notifier.send(STOPPING=1, STATUS="draining")
                    break
                ingest_scope.cancel()
                hub.refuse_new()
                # Its last frames applied first (zmq_ingest: at most 1 s), so
                # the drain below delivers them too.
                await ingest_stopped.wait()
                hub.tick()  # release what the reorder buffers hold past their window
                hub.begin_drain()
                stop_http.set()
                # Streams end themselves once draining. Hypercorn (0.18, trio)
                # does not close idle keep-alive connections on shutdown and
                # would wait its whole graceful_timeout for them, so once our
                # streams are gone we give plain requests a moment and stop.
                # One deadline for the whole drain (the streams' ends and the
                # store's last writes go on together), so the exit comes within
                # shutdown_timeout (and what is still open then is cut:
                # serve_http shuts its sockets at the same deadline).
                deadline = trio.current_time() + config.shutdown_timeout
                async with trio.open_nursery() as draining:
                    if hub.store is not None:
                        draining.start_soon(_flush_store, hub.store, config.node.id, deadline)
                    with trio.move_on_at(deadline):
                        await hub.wait_streams_closed()
                    with trio.move_on_at(min(deadline, trio.current_time() + 0.25)):
                        await http_done.wait()
                nursery.cancel_scope.cancel()
        log.info("stopped")
    finally:
        if probe is not None:
            probe.close()
        notifier.close()
        if hub.gc_stats is not None:
            gc_policy.uninstall(hub.gc_stats)
        if curve is not None:
            curve.stop()
        if control_curve is not None:
            control_curve.stop()
        # destroy(), not term(): whatever failed, no socket left open may make
        # the exit hang (term() waits for every socket to close).
        ctx.destroy(linger=0)
        if hub.store is not None:
            hub.store.close()
