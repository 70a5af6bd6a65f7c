"""The throwaway PostgreSQL of the tests: broker/tools/postgres.py (shared
with `broker bench`)."""

from broker.tools.postgres import DBNAME, ExternalPg, PgServer, free_port, start_postgres

__all__ = ["DBNAME", "ExternalPg", "PgServer", "free_port", "start_postgres"]
