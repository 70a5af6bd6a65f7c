"""Every statement the store runs, on a psycopg connection (DESIGN.md §10).

Sync on purpose: psycopg's async API is asyncio-only, so the trio side
(store/writer.py) calls these from worker threads behind a CapacityLimiter
the size of the pool. Every connection carries `statement_timeout`, the
backstop for a call whose thread cannot be interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg_pool import ConnectionPool

from ..core.entry import Entry
from ..core.envelope import TERMINAL_STATES
from ..core.restore import StoredEntry, StoredWorkflow, WorkflowRow
from .schema import LATEST, MIGRATIONS

log = logging.getLogger("broker.store")

APPLICATION_NAME = "broker"
_LOCK_ID = 0x62726F6B  # pg_advisory_xact_lock key: one migrator at a time


class SchemaTooNew(Exception):
    """The database's schema is newer than this broker knows."""


def open_pool(dsn: str, size: int, statement_timeout: float, connect_timeout: float) -> ConnectionPool:
    """A pool of `size` connections (opened now: a bad dsn or an unreachable
    server fails here, within `connect_timeout`), each in autocommit with
    `statement_timeout`; transactions are explicit."""
    ms = max(1, int(statement_timeout * 1000))

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True
        conn.execute(f"SET statement_timeout = {ms}")
        conn.execute("SET synchronous_commit = on")  # an ack means on disk (durable publish)

    pool = ConnectionPool(
        dsn,
        min_size=1,
        max_size=size,
        open=False,
        configure=configure,
        timeout=connect_timeout,
        kwargs={"application_name": APPLICATION_NAME, "connect_timeout": max(1, int(connect_timeout))},
        name="broker-store",
    )
    # One plain attempt first: a refused connection, a bad password or no
    # such database fails at once and says why (the pool would retry for
    # `connect_timeout`, logging each try, and then only say it gave up).
    psycopg.connect(dsn, application_name=APPLICATION_NAME, connect_timeout=max(2, int(connect_timeout))).close()
    try:
        pool.open(wait=True, timeout=connect_timeout)
    except Exception:
        pool.close()
        raise
    return pool


# -------------------------------------------------------------- migrations


def schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('broker_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    got = conn.execute("SELECT coalesce(max(version), 0) FROM broker_migrations").fetchone()
    return int(got[0]) if got else 0


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the migrations not applied yet, each in a transaction; the
    versions applied. SchemaTooNew if the database is ahead of us."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS broker_migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    current = schema_version(conn)
    if current > LATEST:
        raise SchemaTooNew(f"the database's schema is version {current}; this broker knows up to {LATEST}")
    for version, sql in MIGRATIONS:
        if version <= current:
            continue
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            if schema_version(conn) >= version:  # another broker got there first
                continue
            conn.execute(sql.encode())
            conn.execute("INSERT INTO broker_migrations (version) VALUES (%s)", (version,))
        applied.append(version)
    return applied


# ------------------------------------------------------------------ writes


def _copy_text(value: str) -> bytes:
    """A text field of COPY's text format (no field holds a control
    character: the envelope refuses them in ids, orjson escapes them)."""
    return value.encode().replace(b"\\", b"\\\\")


_NULL = b"\\N"


def _opt_text(value: str | None) -> bytes:
    return _NULL if value is None else _copy_text(value)


def _opt_int(value: int | None) -> bytes:
    return _NULL if value is None else str(value).encode()


def copy_rows(entries: Sequence[Entry], stored_at: int) -> bytes:
    """COPY text data for `entries` (the `_EVENT_COLUMNS`). On the write
    path of every event, so each string is escaped once per batch (a
    workflow's ids, its tasks' names, the kinds) and the rest formatted in
    one step."""
    at = b"%d" % stored_at
    heads: dict[tuple[str, str], bytes] = {}
    texts: dict[str | None, bytes] = {None: _NULL}
    lines = []
    for e in entries:
        key = (e.workflow_id, e.epoch)
        head = heads.get(key)
        if head is None:
            head = heads[key] = b"\t".join((_copy_text(e.workflow_id), _copy_text(e.epoch), _copy_text(e.tenant)))
        kind, task, state, event_id = e.kind, e.task_id, e.state, e.event_id
        kind_b = texts.get(kind)
        if kind_b is None:
            kind_b = texts[kind] = _copy_text(kind)
        task_b = texts.get(task)
        if task_b is None:
            task_b = texts[task] = _copy_text(task)  # type: ignore[arg-type]  # None is in texts
        state_b = texts.get(state)
        if state_b is None:
            state_b = texts[state] = _copy_text(state)  # type: ignore[arg-type]
        lines.append(
            b"%s\t%d\t%d\t%s\t%s\t%s\t%d\t%s\t%s\t%s"
            % (
                head,
                e.seq,
                e.seq_from,
                kind_b,
                task_b,
                state_b,
                e.level,
                _NULL if event_id is None else _copy_text(event_id),
                at,
                e.body.replace(b"\\", b"\\\\"),
            )
        )
    lines.append(b"")
    return b"\n".join(lines)


def copy_workflow_rows(rows: Sequence[WorkflowRow]) -> bytes:
    """COPY text data for `rows` (the `_ROW_COLUMNS`). Built here, not as
    array parameters: psycopg's text-array dumper quotes every element in
    Python (a regex per string), which for the snapshots' JSON cost more
    than the rest of a batch together (measured with py-spy)."""
    lines = []
    for r in rows:
        snapshot = r.snapshot
        lines.append(
            b"\t".join(
                (
                    _copy_text(r.workflow_id),
                    _copy_text(r.tenant),
                    _opt_text(r.parent_id),
                    _copy_text(r.epoch),
                    b"t" if r.engine else b"f",
                    str(r.first_seq).encode(),
                    str(r.last_seq).encode(),
                    _copy_text(r.state),
                    _opt_int(r.created),
                    str(r.updated).encode(),
                    _opt_int(r.terminal_seq),
                    _opt_int(r.terminal_wall),
                    _copy_text(r.log_counts),
                    _NULL if snapshot is None else snapshot.replace(b"\\", b"\\\\"),
                    str(r.snapshot_seq).encode(),
                )
            )
        )
    lines.append(b"")
    return b"\n".join(lines)


_ROW_COLUMNS = tuple(f.name for f in dataclasses.fields(WorkflowRow) if f.name != "fresh")
_ROW_COLUMN_LIST = ", ".join(_ROW_COLUMNS)
_ROW_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS broker_row_stage (LIKE broker_workflows INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_UPSERT = f"""
INSERT INTO broker_workflows ({_ROW_COLUMN_LIST}) SELECT {_ROW_COLUMN_LIST} FROM broker_row_stage
ON CONFLICT (workflow_id) DO UPDATE SET
    tenant = excluded.tenant,
    parent_id = excluded.parent_id,
    epoch = excluded.epoch,
    engine = excluded.engine,
    first_seq = excluded.first_seq,
    last_seq = excluded.last_seq,
    state = excluded.state,
    created = excluded.created,
    updated = excluded.updated,
    terminal_seq = excluded.terminal_seq,
    terminal_wall = excluded.terminal_wall,
    log_counts = excluded.log_counts,
    snapshot = CASE WHEN excluded.snapshot IS NOT NULL OR excluded.epoch <> broker_workflows.epoch
        THEN excluded.snapshot ELSE broker_workflows.snapshot END,
    snapshot_seq = CASE WHEN excluded.snapshot IS NOT NULL OR excluded.epoch <> broker_workflows.epoch
        THEN excluded.snapshot_seq ELSE broker_workflows.snapshot_seq END
"""

_EVENT_COLUMNS = "workflow_id, epoch, tenant, seq, seq_from, kind, task_id, state, level, event_id, stored_at, body"
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS broker_stage "
    "(workflow_id text, epoch text, seq bigint, seq_from bigint, tenant text, kind text, task_id text, state text, "
    "level smallint, event_id text, stored_at bigint, body text) "
    "ON COMMIT DELETE ROWS"
)


def write_batch(conn: psycopg.Connection[Any], data: bytes, workflows: Sequence[WorkflowRow]) -> None:
    """One transaction: the entries and their workflows' rows; a batch
    written again after a lost commit acknowledgement is harmless."""
    with conn.transaction(), conn.cursor() as cur:
        fresh = [w for w in workflows if w.fresh]
        if fresh:
            # New incarnations: what the store holds under their id and
            # epoch is an earlier one's (core/restore.py WorkflowRow.fresh).
            ids, epochs = [w.workflow_id for w in fresh], [w.epoch for w in fresh]
            cur.execute(
                "DELETE FROM broker_events e USING unnest(%s::text[], %s::text[]) AS f(wid, epoch) "
                "WHERE e.workflow_id = f.wid AND e.epoch = f.epoch",
                (ids, epochs),
            )
            cur.execute("DELETE FROM broker_workflows WHERE workflow_id = ANY(%s)", (ids,))
        # Straight into the table, in a savepoint: the usual case. A batch
        # written again (its commit's acknowledgement was lost) meets its
        # own rows; then the savepoint goes and the batch takes the long
        # way: COPY into a temporary table (not WAL-logged) and one
        # INSERT … ON CONFLICT DO NOTHING.
        try:
            with conn.transaction(), cur.copy(f"COPY broker_events ({_EVENT_COLUMNS}) FROM STDIN") as copy:
                copy.write(data)
        except psycopg.errors.UniqueViolation:
            cur.execute(_STAGE)
            with cur.copy(f"COPY broker_stage ({_EVENT_COLUMNS}) FROM STDIN") as copy:
                copy.write(data)
            cur.execute(
                f"INSERT INTO broker_events ({_EVENT_COLUMNS}) SELECT {_EVENT_COLUMNS} FROM broker_stage "
                "ON CONFLICT DO NOTHING"
            )
        if workflows:
            cur.execute(_ROW_STAGE)
            with cur.copy(f"COPY broker_row_stage ({_ROW_COLUMN_LIST}) FROM STDIN") as copy:
                copy.write(copy_workflow_rows(workflows))
            cur.execute(_UPSERT)


# --------------------------------------------------------------- restore


@dataclass(frozen=True, slots=True)
class Restored:
    workflows: list[StoredWorkflow]
    entries: list[StoredEntry]


def load(
    conn: psycopg.Connection[Any],
    *,
    now_ms: int,
    terminal_ttl: float,
    ring_events: int,
    restore_events: int,
) -> Restored:
    """What a restart restores: the active workflows and the terminal ones
    within `terminal_ttl`, for each the entries after its snapshot and up
    to min(ring_events, restore_events / workflows) before (the dedup
    window's ids: `load_ids`)."""
    horizon = now_ms - int(terminal_ttl * 1000)
    rows = conn.execute(
        "SELECT workflow_id, tenant, parent_id, epoch, engine, first_seq, last_seq, terminal_seq, terminal_wall, "
        "log_counts, snapshot, snapshot_seq FROM broker_workflows "
        "WHERE terminal_seq IS NULL OR terminal_wall > %s",
        (horizon,),
    ).fetchall()
    workflows = [
        StoredWorkflow(
            workflow_id=r[0],
            tenant=r[1],
            parent_id=r[2],
            epoch=r[3],
            engine=r[4],
            first_seq=r[5],
            last_seq=r[6],
            terminal_seq=r[7],
            terminal_wall_ms=r[8],
            log_counts=tuple(orjson.loads(r[9])),
            snapshot=orjson.loads(r[10]) if r[10] is not None else None,
            snapshot_seq=r[11] if r[10] is not None else 0,
        )
        for r in rows
    ]
    per = min(ring_events, restore_events // max(1, len(workflows)))
    entries: list[StoredEntry] = []
    if workflows:
        afters = [min(w.snapshot_seq, max(0, w.last_seq - per)) for w in workflows]
        # Binary: the body arrives as the bytes streamed (no decode, no encode).
        cur = conn.cursor(binary=True)
        cur.execute(
            f"SELECT e.workflow_id, e.seq, {_ENTRY_COLUMNS} FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
            "AS r(wid, epoch, after) JOIN broker_events e "
            "ON e.workflow_id = r.wid AND e.epoch = r.epoch AND e.seq > r.after "
            "ORDER BY e.workflow_id, e.seq",
            ([w.workflow_id for w in workflows], [w.epoch for w in workflows], afters),
        )
        epochs = {w.workflow_id: w.epoch for w in workflows}
        entries = [
            StoredEntry(wid, seq, body, (wid, epochs[wid], seq, seq_from, kind, task, state, level))
            for wid, seq, seq_from, kind, task, state, level, body in cur
        ]
    return Restored(workflows, entries)


def load_ids(conn: psycopg.Connection[Any], *, now_ms: int, dedup_ids: int, dedup_age: float) -> list[Any]:
    """(tenant, event id, stored_at ms) of the dedup window, newest first
    (read beside `load`, on another connection)."""
    return conn.execute(
        "SELECT tenant, event_id, stored_at FROM broker_events "
        "WHERE stored_at > %s AND event_id IS NOT NULL ORDER BY stored_at DESC LIMIT %s",
        (now_ms - int(dedup_age * 1000), dedup_ids),
    ).fetchall()


# What a reader needs of a stored entry besides its ids: (seq_from, kind,
# task_id, state, level) and the body as bytes (core/entry.py Entry.restored).
_ENTRY_COLUMNS = "e.seq_from, e.kind, e.task_id, e.state, e.level, convert_to(e.body, 'UTF8')"


def history(conn: psycopg.Connection[Any], wid: str, epoch: str, after: int, limit: int) -> list[StoredEntry]:
    """A workflow's entries after `after`, in order: an index seek on the
    primary key, never a scan."""
    cur = conn.cursor(binary=True)
    cur.execute(
        f"SELECT e.seq, {_ENTRY_COLUMNS} FROM broker_events e "
        "WHERE e.workflow_id = %s AND e.epoch = %s AND e.seq > %s ORDER BY e.seq LIMIT %s",
        (wid, epoch, after, limit),
    )
    return [
        StoredEntry(wid, seq, body, (wid, epoch, seq, seq_from, kind, task, state, level))
        for seq, seq_from, kind, task, state, level, body in cur
    ]


def workflow_head(conn: psycopg.Connection[Any], wid: str) -> tuple[str, str, int, int | None] | None:
    """(tenant, epoch, last_seq, terminal_seq) of a workflow's latest
    incarnation, or None."""
    row = conn.execute(
        "SELECT tenant, epoch, last_seq, terminal_seq FROM broker_workflows WHERE workflow_id = %s", (wid,)
    ).fetchone()
    return (row[0], row[1], row[2], row[3]) if row else None


SUMMARY_COLUMNS = "workflow_id, tenant, parent_id, state, epoch, last_seq, created, updated"


def list_workflows(
    conn: psycopg.Connection[Any],
    *,
    tenant: str | None,
    states: Sequence[str] | None,
    parent: str | None,
    after: tuple[int, str] | None,
    limit: int,
    active: bool = False,
) -> list[tuple[Any, ...]]:
    """Workflows' summaries, newest first (updated, then id, descending),
    after the (updated, id) position `after`; in `states` (None: any), or
    with `active` also in any state that is not terminal."""
    where: list[str] = []
    args: list[Any] = []
    if tenant is not None:
        where.append("tenant = %s")
        args.append(tenant)
    if states is not None or active:
        either = []
        if states:
            either.append("state = ANY(%s)")
            args.append(list(states))
        if active:
            either.append("state <> ALL(%s)")
            args.append(sorted(TERMINAL_STATES))
        where.append("(" + " OR ".join(either) + ")" if either else "false")
    if parent is not None:
        where.append("parent_id = %s")
        args.append(parent)
    if after is not None:
        where.append("(updated, workflow_id) < (%s, %s)")
        args.extend(after)
    sql = f"SELECT {SUMMARY_COLUMNS} FROM broker_workflows"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY updated DESC, workflow_id DESC LIMIT %s"
    args.append(limit)
    return conn.execute(sql.encode(), args).fetchall()


def prune(conn: psycopg.Connection[Any], cutoff_ms: int, limit: int) -> bool:
    """Delete up to `limit` events stored before `cutoff_ms` (and terminal
    workflows' rows that ended before it); True if there may be more.

    Never the events of an active workflow after its stored snapshot: a
    restore rebuilds its state and sequence from them (its row and
    snapshot are written at intervals, so one that went quiet has events
    past both), however old they are."""
    with conn.transaction():
        cur = conn.execute(
            "DELETE FROM broker_events WHERE ctid IN (SELECT e.ctid FROM broker_events e WHERE e.stored_at < %s "
            "AND NOT EXISTS (SELECT 1 FROM broker_workflows w WHERE w.workflow_id = e.workflow_id "
            "AND w.epoch = e.epoch AND w.terminal_seq IS NULL AND e.seq > w.snapshot_seq) LIMIT %s)",
            (cutoff_ms, limit),
        )
        events = cur.rowcount
        cur = conn.execute(
            "DELETE FROM broker_workflows WHERE workflow_id IN (SELECT workflow_id FROM broker_workflows "
            "WHERE terminal_wall < %s LIMIT %s)",
            (cutoff_ms, limit),
        )
        rows = cur.rowcount
    return events >= limit or rows >= limit


def begin_run(conn: psycopg.Connection[Any], node_id: str) -> bool | None:
    """Mark `node_id` running (not cleanly stopped); whether its last run
    stopped cleanly (None: its first run on this database)."""
    with conn.transaction():
        row = conn.execute("SELECT clean FROM broker_nodes WHERE node_id = %s FOR UPDATE", (node_id,)).fetchone()
        conn.execute(
            "INSERT INTO broker_nodes (node_id, clean) VALUES (%s, false) "
            "ON CONFLICT (node_id) DO UPDATE SET clean = false, updated = now()",
            (node_id,),
        )
    return bool(row[0]) if row else None


def end_run(conn: psycopg.Connection[Any], node_id: str) -> None:
    """`node_id` stopped cleanly: everything it accepted is committed."""
    conn.execute("UPDATE broker_nodes SET clean = true, updated = now() WHERE node_id = %s", (node_id,))


def ping(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT 1")
