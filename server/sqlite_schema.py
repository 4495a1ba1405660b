"""The SQLite store's schema, one migration per version (see server/schema_migrations.py; the
PostgreSQL store lists the same versions in its dialect), and the upgrade run when a store
opens."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time

from server.schema_migrations import (
    CHECK_IN_NONCES_WHY,
    RATE_BUCKETS_WHY,
    REPLICAS_WHY,
    SECURE_ROUTES_WHY,
    Migration,
    pending_migrations,
)

log = logging.getLogger(__name__)

# Version 1 is the schema stores had before versioning: such a store (its tables, no
# schema_version) is recorded as version 1 when it is opened.
MIGRATIONS = (
    Migration(
        1,
        "resources, tasks, rounds, counted uploads, server state, assignments, enrollments",
        (
            "CREATE TABLE IF NOT EXISTS resources ("
            " sha256 TEXT PRIMARY KEY, kind TEXT NOT NULL, data BLOB NOT NULL)",
            "CREATE TABLE IF NOT EXISTS tasks ("
            " task_id TEXT PRIMARY KEY, config TEXT NOT NULL, model_sha256 TEXT NOT NULL,"
            " initial_weights_sha256 TEXT NOT NULL, num_parameters INTEGER NOT NULL,"
            " created_at REAL NOT NULL)",
            "CREATE TABLE IF NOT EXISTS task_states ("
            " task_id TEXT PRIMARY KEY, state TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS rounds ("
            " task_id TEXT NOT NULL, round_number INTEGER NOT NULL, state TEXT NOT NULL,"
            " selected INTEGER NOT NULL, reported INTEGER NOT NULL, dropped INTEGER NOT NULL,"
            " metrics TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL NOT NULL,"
            " weights_sha256 TEXT NOT NULL, PRIMARY KEY (task_id, round_number))",
            "CREATE TABLE IF NOT EXISTS counted_uploads ("
            " token_sha256 TEXT PRIMARY KEY, task_id TEXT NOT NULL, round_number INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS server_state ("
            " task_id TEXT NOT NULL, round_number INTEGER NOT NULL, state BLOB NOT NULL,"
            " PRIMARY KEY (task_id, round_number))",
            "CREATE TABLE IF NOT EXISTS assignments ("
            " token_sha256 TEXT PRIMARY KEY, task_id TEXT NOT NULL, round_number INTEGER NOT NULL,"
            " device_id TEXT NOT NULL, issued_at REAL NOT NULL)",
            "CREATE INDEX IF NOT EXISTS assignments_by_device"
            " ON assignments (task_id, device_id, issued_at)",
            "CREATE INDEX IF NOT EXISTS assignments_by_round"
            " ON assignments (task_id, round_number)",
            "CREATE TABLE IF NOT EXISTS enrolled_devices ("
            " device_id TEXT NOT NULL, population TEXT NOT NULL, public_key BLOB NOT NULL,"
            " credential TEXT NOT NULL, enrolled_at REAL NOT NULL,"
            " PRIMARY KEY (device_id, population))",
        ),
    ),
    Migration(
        2,
        "task leases: each task's leader, its epoch and expiry (fencing, server/leases.py)",
        (
            "CREATE TABLE task_leases ("
            " task_id TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch INTEGER NOT NULL,"
            " expires_at REAL NOT NULL)",
        ),
    ),
    Migration(
        3,
        "retention: assignments by issue time, rounds by finish time (prune_history)",
        (
            "CREATE INDEX IF NOT EXISTS assignments_by_time ON assignments (task_id, issued_at)",
            "CREATE INDEX IF NOT EXISTS rounds_by_finish ON rounds (finished_at)",
        ),
    ),
    # Replicas share a PostgreSQL database; a SQLite file has one coordinator and no tables
    # for them. The version stays in step with PostgreSQL's.
    Migration(4, REPLICAS_WHY, ()),
    Migration(5, SECURE_ROUTES_WHY, ()),
    Migration(6, CHECK_IN_NONCES_WHY, ()),
    Migration(7, RATE_BUCKETS_WHY, ()),
)


def upgrade(db: sqlite3.Connection, store_name: str) -> None:
    """Brings the schema to the newest version in one transaction, or raises
    IncompatibleStore and changes nothing. A store that is already current is only read, so
    a store on a read-only or full disk still opens. `db` is in autocommit mode."""
    pending = pending_migrations(_schema_version(db), MIGRATIONS, store_name)
    if not pending and _has_table(db, "schema_version"):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        found = _schema_version(db)
        if found and db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
            db.execute("INSERT INTO schema_version VALUES (1, ?)", (time.time(),))
        for migration in pending_migrations(found, MIGRATIONS, store_name):
            for statement in migration.statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (?, ?)", (migration.version, time.time()))
            log.info("%s: schema version %d (%s)", store_name, migration.version, migration.why)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def _schema_version(db: sqlite3.Connection) -> int:
    if _has_table(db, "schema_version"):
        row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if row[0] is not None:
            return int(row[0])
    # A store from before versioning has the tables of version 1 and no version row.
    return 1 if _has_table(db, "tasks") else 0


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None
