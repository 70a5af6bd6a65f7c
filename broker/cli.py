"""Command line: `broker run`, `broker check-config`, `broker migrate`, `broker push`, `broker keygen`, …

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
        from .server.tokens import load_verifier

        load_verifier(config.auth)  # the key files are read and checked too
    except ConfigError as exc:
        return _fail(str(exc))
    print(orjson.dumps(config.as_dict(), option=orjson.OPT_INDENT_2).decode())
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


def cmd_push(args: argparse.Namespace) -> int:
    """Read JSON events, one per line, from stdin and push them over ZMQ."""
    import zmq

    from .client import Publisher

    try:
        pub = Publisher(
            args.endpoint,
            curve_secret_file=args.curve_secret,
            curve_server_key_file=args.curve_server_key,
            send_timeout_ms=int(args.timeout * 1000),
        )
    except (OSError, ValueError) as exc:
        return _fail(f"push: {exc}")
    try:
        count = _push_lines(pub)
    except zmq.Again:
        pub.close(linger_ms=0)
        return _fail(
            f"push: the broker at {args.endpoint} took nothing within {args.timeout:g} s "
            "(not running, or it refused this engine's CURVE key)"
        )
    pub.close()
    print(f"pushed {count} events to {args.endpoint}", file=sys.stderr)
    return 0


def _push_lines(pub: Publisher) -> int:
    """Send stdin's JSON lines (others skipped, with a warning); how many went."""
    count = 0
    for lineno, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            print(f"broker push: line {lineno}: not JSON ({exc}); skipped", file=sys.stderr)
            continue
        pub.send_raw(line.encode())
        count += 1
    return count


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write NAME.key (public) and NAME.key_secret in DIR (DESIGN §7)."""
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
    parser = argparse.ArgumentParser(prog="broker", description="Workflow event broker")
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the broker in the foreground")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config and print the effective values")
    _add_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("migrate", help="create or upgrade the PostgreSQL store's schema (also done at start)")
    _add_config(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the database (10)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("push", help="push JSON-lines events from stdin over ZMQ")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5557", help="broker's ingest endpoint")
    p.add_argument("--curve-secret", metavar="FILE", help="this engine's .key_secret (CURVE)")
    p.add_argument("--curve-server-key", metavar="FILE", help="the broker's public .key (CURVE)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a send may wait for the broker (10)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("keygen", help="write a CURVE certificate pair NAME.key / NAME.key_secret into DIR")
    p.add_argument("name")
    p.add_argument("dir")
    p.add_argument("--tenant", help="bind an engine's certificate to a tenant (its events go there)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("simulate", help="push realistic simulated workflows over ZMQ (an engine simulator)")
    from .tools import simulate

    simulate.add_arguments(p)
    p.set_defaults(func=simulate.run)

    p = sub.add_parser("bench", help="run the DESIGN §14 benchmark scenarios against a real broker process")
    from .bench import runner

    runner.add_arguments(p)
    p.set_defaults(func=runner.run)

    args = parser.parse_args(argv)
    return int(args.func(args))
