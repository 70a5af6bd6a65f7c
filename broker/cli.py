"""Command line: `broker run`, `check-config`, `migrate`, `push`, `keygen`, `simulate`, `tail`, `bench`.

Exit codes: 0 success, 2 bad config / cannot start (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import orjson

from . import __version__
from .config import ConfigError, load

if TYPE_CHECKING:
    from .client import Publisher


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="TOML config file (default: built-in defaults)")


def _fail(message: str) -> int:
    print(f"broker: {message}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    # The server is imported only for a valid config: a bad one exits 2 at
    # once, without the half second (more on a loaded machine) its imports take.
    import trio

    from . import logs
    from .server.run import StartupError, serve

    logs.setup(config.log.level, config.log.format)
    import logging

    logging.getLogger("broker").info(
        "config: %s", args.config or "the built-in defaults (no -c FILE given; see broker check-config)"
    )
    try:
        trio.run(serve, config)
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
        from .server.curve import CurveServer
        from .server.tokens import load_verifier

        load_verifier(config.auth)  # the key files are read and checked too
        for section in ("ingest", "control"):  # and the CURVE key pairs and clients directories
            sec = getattr(config, section)
            CurveServer.from_config(section, sec.curve_secret_file, sec.curve_clients_dir)
        if config.control.curve_secret_file and not config.control.bind:
            raise ConfigError("config key 'control.curve_secret_file': CURVE is set but control.bind is not")
    except ConfigError as exc:
        return _fail(str(exc))
    import tomli_w

    source = args.config or "the built-in defaults (no -c FILE given)"
    if args.json:  # JSON has no comments: the source goes to stderr, stdout parses as it stands
        print(f"broker check-config: the effective configuration, from {source}", file=sys.stderr)
        print(orjson.dumps(config.as_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(f"# broker check-config: the effective configuration, from {source}")
        print(tomli_w.dumps(config.as_dict()), end="")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the store's schema (store.backend = "postgres")."""
    try:
        config = load(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    if config.store.backend != "postgres":
        return _fail('migrate: the config has no store (store.backend = "postgres" with store.dsn)')
    import psycopg
    from psycopg_pool import PoolTimeout

    from .store import pg

    try:
        pool = pg.open_pool(config.store.dsn, 1, config.store.statement_timeout, args.timeout)
    except (psycopg.Error, PoolTimeout) as exc:
        return _fail(f"migrate: cannot connect to the store: {str(exc).strip().splitlines()[0]}")
    try:
        with pool.connection() as conn:
            applied = pg.migrate(conn)
            version = pg.schema_version(conn)
    except pg.SchemaTooNew as exc:
        return _fail(f"migrate: {exc}")
    except psycopg.Error as exc:
        return _fail(f"migrate: {str(exc).strip().splitlines()[0]}")
    finally:
        pool.close()
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}: schema at version {version}")
    else:
        print(f"schema already at version {version}: nothing to do")
    return 0


def no_broker(endpoint: str, timeout: float) -> str:
    """What `push` and `simulate` say when nothing takes their events."""
    return (
        f"no broker at {endpoint} (nothing took an event within {timeout:g} s: is it running there? "
        "With CURVE: does it accept this engine's key?)"
    )


def open_publisher(args: argparse.Namespace, what: str) -> Publisher | str:
    """A Publisher for `args.endpoint` (`--timeout`, CURVE keys), or the
    one line to print when the endpoint or a key file is wrong."""
    import zmq

    from .client import Publisher

    try:
        return Publisher(
            args.endpoint,
            curve_secret_file=getattr(args, "curve_secret", None),
            curve_server_key_file=getattr(args, "curve_server_key", None),
            send_timeout_ms=int(args.timeout * 1000),
        )
    except zmq.ZMQError as exc:
        return f"{what}: bad --endpoint {args.endpoint!r} ({exc}); expected e.g. tcp://127.0.0.1:5557"
    except (OSError, ValueError) as exc:
        return f"{what}: {exc}"


def cmd_push(args: argparse.Namespace) -> int:
    """Read JSON events, one per line, from stdin and push them over ZMQ.
    Each line is checked with the broker's own envelope rules first: a
    line the broker would reject is reported (its line number, the
    reject reason and why) and not sent. Exit 0 when every line went, 1
    when some were refused here or no broker took them, 2 for a bad
    endpoint or key file."""
    import zmq

    pub = open_publisher(args, "push")
    if isinstance(pub, str):
        return _fail(pub)
    try:
        sent, refused = _push_lines(pub, args.max_frame_bytes)
    except zmq.Again:
        pub.close(linger_ms=0)
        print(f"broker: push: {no_broker(args.endpoint, args.timeout)}", file=sys.stderr)
        return 1
    pub.close()
    note = f"; {refused} line{'s' if refused != 1 else ''} refused (see above)" if refused else ""
    print(f"pushed {sent} events to {args.endpoint}{note}", file=sys.stderr)
    return 1 if refused else 0


def _push_lines(pub: Publisher, max_frame_bytes: int) -> tuple[int, int]:
    """Send stdin's lines that the broker would accept; (events sent, lines
    refused). A line may be one event or a JSON array (a batch)."""
    from .core.envelope import decode_frame
    from .core.errors import Reject

    sent = refused = 0
    # Bytes, not text: a line that is not UTF-8 is refused like any other
    # bad line (invalid_json), not a traceback.
    for lineno, line in enumerate(sys.stdin.buffer, 1):
        frame = line.strip()
        if not frame:
            continue
        results = decode_frame(frame, max_frame_bytes)
        bad = [(i, r) for i, r in enumerate(results) if isinstance(r, Reject)]
        if bad:
            for i, rej in bad:
                where = f"line {lineno}" + (f", item {i + 1}" if len(results) > 1 else "")
                print(f"broker: push: {where}: {rej.reason}: {rej.detail}; not sent", file=sys.stderr)
            refused += 1
            continue
        pub.send_raw(frame)
        sent += len(results)
    return sent, refused


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write NAME.key (public) and NAME.key_secret in DIR (CURVE certificates)."""
    from .server.curve import write_certificates

    tenant = args.tenant
    if tenant is not None and not (1 <= len(tenant) <= 128 and tenant.isprintable() and '"' not in tenant):
        return _fail("keygen: --tenant must be 1-128 printable characters without '\"'")
    try:
        public, secret = write_certificates(args.name, args.dir, tenant)
    except OSError as exc:
        return _fail(f"keygen: {exc}")
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret: keep it here)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        from . import core  # noqa: F401  # its import checks the compiled core against its sources
    except ImportError as exc:
        if type(exc).__name__ != "StaleBuild":  # the class is in the package that failed to import
            raise
        return _fail(str(exc))  # one line, not a traceback
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="broker", description="Workflow event broker")
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the broker in the foreground")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config and print the effective values (TOML)")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("migrate", help="create or upgrade the PostgreSQL store's schema (also done at start)")
    _add_config(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the database (10)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("push", help="push JSON-lines events from stdin over ZMQ")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5557", help="broker's ingest endpoint")
    p.add_argument("--curve-secret", metavar="FILE", help="this engine's .key_secret (CURVE)")
    p.add_argument("--curve-server-key", metavar="FILE", help="the broker's public .key (CURVE)")
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for a broker to take an event (3): then exit 1"
    )
    p.add_argument(
        "--max-frame-bytes",
        type=int,
        default=1048576,
        help="the broker's ingest.max_frame_bytes: a longer line is refused here (1048576)",
    )
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("keygen", help="write a CURVE certificate pair NAME.key / NAME.key_secret into DIR")
    p.add_argument("name")
    p.add_argument("dir")
    p.add_argument("--tenant", help="bind an engine's certificate to a tenant (its events go there)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "simulate",
        help="push realistic simulated workflows over ZMQ (an engine simulator)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from .tools import simulate

    simulate.add_arguments(p)
    p.set_defaults(func=simulate.run)

    p = sub.add_parser(
        "tail",
        help="follow a workflow (or a tenant's, a parent's) live in the terminal; exit 0 at its end",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from .tools import tail

    tail.add_arguments(p)
    p.set_defaults(func=tail.run)

    p = sub.add_parser("bench", help="run the benchmark scenarios against a real broker process (docs/benchmarks.md)")
    from .bench import runner

    runner.add_arguments(p)
    p.set_defaults(func=runner.run)

    args = parser.parse_args(argv)
    return int(args.func(args))
