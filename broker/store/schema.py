"""The store's schema, as numbered migrations (DESIGN.md §10).

`broker migrate` (and every start) applies those not applied yet, each in
its own transaction with its row in `broker_migrations`; a database whose
schema is newer than this broker knows is refused, never used.

Tables:

- `broker_events`: every accepted entry, its exact streamed body and the
  fields a reader filters on (kind, task, state, level: read back without
  parsing the body), keyed by
  (workflow, epoch, seq): the seek a resume needs, never a scan. `stored_at`
  (ms, when the writer took it) is indexed for retention and the dedup
  window's restore.
- `broker_workflows`: one row per workflow (its latest incarnation): what
  a restart needs to go on (epoch, mode, last seq, terminal seq, log
  counts) and a snapshot as of `snapshot_seq`; listing by tenant, newest
  first.
- `broker_nodes`: per node, whether it stopped cleanly (everything
  committed): a start after an unclean stop skips broker sequence numbers
  that may have been streamed but never written (store/writer.py).
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE broker_events (
            workflow_id text NOT NULL,
            epoch text NOT NULL,
            seq bigint NOT NULL,
            seq_from bigint NOT NULL,
            tenant text NOT NULL,
            kind text NOT NULL,
            task_id text,
            state text,
            level smallint NOT NULL,
            event_id text,
            stored_at bigint NOT NULL,
            body text NOT NULL,
            PRIMARY KEY (workflow_id, epoch, seq)
        );
        CREATE INDEX broker_events_stored_at ON broker_events (stored_at);
        CREATE TABLE broker_workflows (
            workflow_id text PRIMARY KEY,
            tenant text NOT NULL,
            parent_id text,
            epoch text NOT NULL,
            engine boolean NOT NULL,
            first_seq bigint NOT NULL,
            last_seq bigint NOT NULL,
            state text NOT NULL,
            created bigint,
            updated bigint NOT NULL,
            terminal_seq bigint,
            terminal_wall bigint,
            log_counts text NOT NULL,
            snapshot text,
            snapshot_seq bigint NOT NULL DEFAULT 0
        );
        CREATE INDEX broker_workflows_tenant_updated ON broker_workflows (tenant, updated DESC);
        CREATE INDEX broker_workflows_parent ON broker_workflows (parent_id) WHERE parent_id IS NOT NULL;
        CREATE INDEX broker_workflows_terminal_wall ON broker_workflows (terminal_wall);
        CREATE TABLE broker_nodes (
            node_id text PRIMARY KEY,
            clean boolean NOT NULL,
            updated timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
)

LATEST = MIGRATIONS[-1][0]
