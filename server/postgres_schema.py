"""The PostgreSQL store's schema: the same versions as the SQLite store's, in PostgreSQL's
dialect (see server/schema_migrations.py), and the upgrade run when a store opens."""

from __future__ import annotations

import logging
import time

import psycopg

from server.schema_migrations import (
    CHECK_IN_NONCES_WHY,
    RATE_BUCKETS_WHY,
    REPLICAS_WHY,
    SECURE_ROUTES_WHY,
    Migration,
    pending_migrations,
)

log = logging.getLogger(__name__)

MIGRATIONS = (
    Migration(
        1,
        "resources, tasks, rounds, counted uploads, server state, assignments, enrollments",
        (
            "CREATE TABLE resources ("
            " sha256 TEXT PRIMARY KEY, kind TEXT NOT NULL, data BYTEA NOT NULL)",
            # Weights and optimizer moments are float32 noise to a compressor: storing them
            # out of line uncompressed (EXTERNAL) spares PostgreSQL a futile pglz pass over
            # every 6.65 MB model it writes and reads.
            "ALTER TABLE resources ALTER COLUMN data SET STORAGE EXTERNAL",
            "CREATE TABLE tasks ("
            " task_id TEXT PRIMARY KEY, config TEXT NOT NULL, model_sha256 TEXT NOT NULL,"
            " initial_weights_sha256 TEXT NOT NULL, num_parameters BIGINT NOT NULL,"
            " created_at DOUBLE PRECISION NOT NULL)",
            "CREATE TABLE task_states (task_id TEXT PRIMARY KEY, state TEXT NOT NULL)",
            "CREATE TABLE rounds ("
            " task_id TEXT NOT NULL, round_number INTEGER NOT NULL, state TEXT NOT NULL,"
            " selected INTEGER NOT NULL, reported INTEGER NOT NULL, dropped INTEGER NOT NULL,"
            " metrics TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL,"
            " finished_at DOUBLE PRECISION NOT NULL, weights_sha256 TEXT NOT NULL,"
            " PRIMARY KEY (task_id, round_number))",
            "CREATE TABLE counted_uploads ("
            " token_sha256 TEXT PRIMARY KEY, task_id TEXT NOT NULL, round_number INTEGER NOT NULL)",
            "CREATE TABLE server_state ("
            " task_id TEXT NOT NULL, round_number INTEGER NOT NULL, state BYTEA NOT NULL,"
            " PRIMARY KEY (task_id, round_number))",
            "ALTER TABLE server_state ALTER COLUMN state SET STORAGE EXTERNAL",
            "CREATE TABLE assignments ("
            " token_sha256 TEXT PRIMARY KEY, task_id TEXT NOT NULL, round_number INTEGER NOT NULL,"
            " device_id TEXT NOT NULL, issued_at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX assignments_by_device ON assignments (task_id, device_id, issued_at)",
            "CREATE INDEX assignments_by_round ON assignments (task_id, round_number)",
            "CREATE TABLE enrolled_devices ("
            " device_id TEXT NOT NULL, population TEXT NOT NULL, public_key BYTEA NOT NULL,"
            " credential TEXT NOT NULL, enrolled_at DOUBLE PRECISION NOT NULL,"
            " PRIMARY KEY (device_id, population))",
        ),
    ),
    Migration(
        2,
        "task leases: each task's leader, its epoch and expiry (fencing, server/leases.py)",
        (
            "CREATE TABLE task_leases ("
            " task_id TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch BIGINT NOT NULL,"
            " expires_at DOUBLE PRECISION NOT NULL)",
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
    Migration(
        4,
        REPLICAS_WHY,
        (
            # Every replica's heartbeat and counters (server/replica_ledger.py).
            "CREATE TABLE replicas ("
            " name TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,"
            " started_at DOUBLE PRECISION NOT NULL, seen_at DOUBLE PRECISION NOT NULL,"
            " check_ins BIGINT NOT NULL DEFAULT 0, uploads BIGINT NOT NULL DEFAULT 0)",
            # Each open round as all replicas see it: its global counts decide its state.
            "CREATE TABLE shared_rounds ("
            " task_id TEXT NOT NULL, round_number INTEGER NOT NULL, state TEXT NOT NULL,"
            " epoch BIGINT NOT NULL, seed NUMERIC NOT NULL, aggregator_state TEXT NOT NULL,"
            " base_weights_sha256 TEXT NOT NULL, base_version INTEGER NOT NULL,"
            " started_at DOUBLE PRECISION NOT NULL, reporting_started_at DOUBLE PRECISION,"
            " reporting_deadline DOUBLE PRECISION, closed_at DOUBLE PRECISION,"
            " selected INTEGER NOT NULL DEFAULT 0, reported INTEGER NOT NULL DEFAULT 0,"
            " failed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (task_id, round_number))",
            "CREATE INDEX shared_rounds_by_state ON shared_rounds (state)",
            "CREATE TABLE shared_assignments ("
            " token_sha256 TEXT PRIMARY KEY, task_id TEXT NOT NULL, round_number INTEGER NOT NULL,"
            " device_id TEXT NOT NULL, declared_examples BIGINT NOT NULL,"
            " issued_by TEXT NOT NULL, state TEXT NOT NULL, reported_by TEXT,"
            " failure TEXT NOT NULL DEFAULT '', network TEXT,"
            " UNIQUE (task_id, round_number, device_id))",
            # A network's share of a round is counted across replicas.
            "CREATE INDEX shared_assignments_by_network"
            " ON shared_assignments (task_id, round_number, network)",
            "CREATE TABLE replica_round_counts ("
            " task_id TEXT NOT NULL, round_number INTEGER NOT NULL, replica TEXT NOT NULL,"
            " selected INTEGER NOT NULL DEFAULT 0, reported INTEGER NOT NULL DEFAULT 0,"
            " PRIMARY KEY (task_id, round_number, replica))",
            "CREATE TABLE round_partials ("
            " task_id TEXT NOT NULL, round_number INTEGER NOT NULL, replica TEXT NOT NULL,"
            " tokens TEXT NOT NULL, partial BYTEA NOT NULL,"
            " PRIMARY KEY (task_id, round_number, replica))",
            "ALTER TABLE round_partials ALTER COLUMN partial SET STORAGE EXTERNAL",
        ),
    ),
    Migration(
        5,
        SECURE_ROUTES_WHY,
        (
            # The address other replicas forward to (`serve --replica-address`).
            "ALTER TABLE replicas ADD COLUMN address TEXT NOT NULL DEFAULT ''",
            # Calls it forwarded to other replicas (`serve --replica`, secure tasks).
            "ALTER TABLE replicas ADD COLUMN forwarded BIGINT NOT NULL DEFAULT 0",
            # A secure round's session, by id: its task, whose leader hosts it.
            "CREATE TABLE secure_sessions ("
            " session_id BYTEA PRIMARY KEY, task_id TEXT NOT NULL, round_number INTEGER NOT NULL)",
            "CREATE INDEX secure_sessions_by_round ON secure_sessions (task_id, round_number)",
            # Keys replicas share (the MAC of what a forwarding replica asserts).
            "CREATE TABLE cluster_secrets (name TEXT PRIMARY KEY, secret BYTEA NOT NULL)",
        ),
    ),
    Migration(
        6,
        CHECK_IN_NONCES_WHY,
        (
            # Each replica remembers the nonces it saw; this holds the nonce of every check-in
            # any replica assigned, until the check-in is too old to be accepted anyway.
            "CREATE TABLE assigned_nonces ("
            " device_id TEXT NOT NULL, nonce BYTEA NOT NULL,"
            " expires_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (device_id, nonce))",
            "CREATE INDEX assigned_nonces_by_expiry ON assigned_nonces (expires_at)",
        ),
    ),
    Migration(
        7,
        RATE_BUCKETS_WHY,
        (
            "CREATE TABLE rate_buckets ("
            " scope TEXT NOT NULL, key TEXT NOT NULL, tokens DOUBLE PRECISION NOT NULL,"
            " updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (scope, key))",
            "CREATE INDEX rate_buckets_by_age ON rate_buckets (scope, updated_at)",
        ),
    ),
)

# Session-independent advisory lock keys (64-bit), named so `pg_locks` readers can tell ours
# from an application's: the upgrade lock serializes replicas that start together.
schema_upgrade_lock_key = 0x6F7665726E696701  # "overnig" + 1


def upgrade(conn: psycopg.Connection, store_name: str) -> None:
    """Brings the schema to the newest version in one transaction, or raises
    IncompatibleStore and changes nothing. Replicas starting at the same time take turns
    (a transaction-scoped advisory lock); the second finds the work done."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema_upgrade_lock_key,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
        )
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        found = int(row[0]) if row else 0
        for migration in pending_migrations(found, MIGRATIONS, store_name):
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version VALUES (%s, %s)", (migration.version, time.time())
            )
            log.info("%s: schema version %d (%s)", store_name, migration.version, migration.why)
