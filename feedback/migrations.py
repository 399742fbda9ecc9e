"""Versioned schema migrations of the feedback database, applied in order when a store opens.

The schema version lives in a one-row table `docrl_schema_version`. Each migration is a numbered
function of a SQLAlchemy connection; `upgrade` runs the missing ones and bumps the version in the
same transaction, under a lock (a PostgreSQL advisory lock, SQLite's BEGIN IMMEDIATE), so that
several Serve replicas opening one database at once migrate it exactly once, and a migration
that fails leaves the previous version intact (both databases have transactional DDL).

Why not alembic: three tables and a handful of migrations do not need a script directory, an
env.py and an ini file shipped inside the package; these functions are the whole mechanism.

A migration describes the schema *as it was* at its version (never import the current models
here); `tests/test_feedback.py` checks that the migrated schema equals `feedback.store`'s models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (JSON, CheckConstraint, Column, Connection, DateTime, Engine, ForeignKey, Integer, LargeBinary,
                        MetaData, String, Table, Text, inspect, text)

VERSION_TABLE = "docrl_schema_version"
_PG_LOCK_KEY = 0x646F63726C  # "docrl": the advisory lock that serializes migrations on PostgreSQL


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this docrl (e.g. it is newer than this code)."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_tables(conn: Connection) -> None:
    md = MetaData()
    Table(
        "interactions", md,
        Column("response_id", String(128), primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("question", Text, nullable=False),
        Column("page_ids", JSON, nullable=False),
        Column("image_hashes", JSON, nullable=False),
        Column("answer", Text, nullable=False),
        Column("model", String(200), nullable=False),
        Column("weights_version", Integer, nullable=True),
        Column("checkpoint", String(1000), nullable=True),
        Column("created_at", DateTime, nullable=False),
    )
    Table(
        "images", md,
        Column("sha256", String(64), primary_key=True),
        Column("data", LargeBinary, nullable=False),
        Column("num_bytes", Integer, nullable=False),
        Column("created_at", DateTime, nullable=False),
    )
    Table(
        "feedback", md,
        Column("response_id", String(128), ForeignKey("interactions.response_id", ondelete="CASCADE"),
               primary_key=True),
        Column("rating", String(8), nullable=False),
        Column("correction", Text, nullable=True),
        Column("comment", Text, nullable=True),
        Column("created_at", DateTime, nullable=False),
        Column("updated_at", DateTime, nullable=False),
        CheckConstraint("rating IN ('up', 'down')", name="ck_feedback_rating"),
    )
    md.create_all(conn)


def _v2_time_indexes(conn: Connection) -> None:
    # `docrl feedback export --since` and `stats` filter on these times; without indexes every
    # export scans the whole interaction log.
    conn.execute(text("CREATE INDEX ix_interactions_created_at ON interactions (created_at)"))
    conn.execute(text("CREATE INDEX ix_feedback_updated_at ON feedback (updated_at)"))


def _v3_answer_page(conn: Connection) -> None:
    # a rater's page label: which cited page holds the answer ('none': none does); NULL before v3
    conn.execute(text("ALTER TABLE feedback ADD COLUMN answer_page TEXT"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "interactions, images and feedback tables", _v1_tables),
    Migration(2, "indexes on interactions.created_at and feedback.updated_at", _v2_time_indexes),
    Migration(3, "feedback.answer_page, the rater's page label", _v3_answer_page),
)
LATEST = MIGRATIONS[-1].version


def _lock_and_read_version(conn: Connection) -> int:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    # (SQLite: the caller's transaction began with BEGIN IMMEDIATE, which already holds the lock)
    if not inspect(conn).has_table(VERSION_TABLE):
        Table(VERSION_TABLE, MetaData(), Column("version", Integer, nullable=False)).create(conn)
        conn.execute(text(f"INSERT INTO {VERSION_TABLE} (version) VALUES (0)"))
        return 0
    return int(conn.execute(text(f"SELECT version FROM {VERSION_TABLE}")).scalar_one())


def schema_version(engine: Engine) -> int:
    """The database's schema version (0 for an empty database)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return 0
        return int(conn.execute(text(f"SELECT version FROM {VERSION_TABLE}")).scalar_one())


def upgrade(engine: Engine, target: int = LATEST) -> list[int]:
    """Apply the migrations after the database's version up to `target`; returns those applied.

    Raises SchemaError when the database is newer than this code knows.
    """
    with engine.connect() as conn:
        conn = conn.execution_options(docrl_write_lock=True)  # SQLite: BEGIN IMMEDIATE
        with conn.begin():
            current = _lock_and_read_version(conn)
            if current > LATEST:
                raise SchemaError(
                    f"the feedback database has schema version {current}, newer than this docrl knows ({LATEST}); "
                    "upgrade docrl, or point feedback.database_url at another database")
            applied = []
            for m in MIGRATIONS:
                if current < m.version <= target:
                    m.apply(conn)
                    applied.append(m.version)
            if applied:
                conn.execute(text(f"UPDATE {VERSION_TABLE} SET version = :v"), {"v": applied[-1]})
            return applied
