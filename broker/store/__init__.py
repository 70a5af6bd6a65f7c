"""The PostgreSQL store (DESIGN.md §10; docs/store.md).

- `schema.py`: the migrations, applied in order, each in a transaction.
- `pg.py`: every statement, as plain functions on a psycopg connection
  (sync: run from worker threads, FIELD-NOTES "psycopg 3 with trio").
- `writer.py`: the trio side: the one task that owns the write path
  (batches, spill queue, durable publish, status), the restore at start.

What is kept and how it is rebuilt is core/restore.py's; the queue of
entries not yet committed is core/spill.py's.
"""
