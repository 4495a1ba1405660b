"""Versioned schemas: an older store is upgraded at start, a newer one refused with a message,
and a failed upgrade changes nothing — for the SQLite and the PostgreSQL store alike."""

from __future__ import annotations

import pathlib
import sqlite3
import subprocess
import sys

import psycopg
import pytest

from server import postgres_schema, sqlite_schema
from server.errors import StoreUnavailable
from server.postgres_store import PostgresStore
from server.schema_migrations import IncompatibleStore, Migration
from server.sqlite_store import SqliteStore
from tests.server.test_store_conformance import _committed, _task

REPO = pathlib.Path(__file__).resolve().parents[2]
NEWEST = len(sqlite_schema.MIGRATIONS)
_TASK_ROW = ("t1", '{"task_id": "t1", "population": "p"}', "m" * 64, "w" * 64, 10, 1.0)


def _sqlite_versions(path: pathlib.Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY 1")]


def _postgres_versions(url: str) -> list[int]:
    with psycopg.connect(url) as db:
        return [row[0] for row in db.execute("SELECT version FROM schema_version ORDER BY 1")]


def test_both_stores_list_the_same_versions() -> None:
    sqlite = [(m.version, m.why) for m in sqlite_schema.MIGRATIONS]
    postgres = [(m.version, m.why) for m in postgres_schema.MIGRATIONS]

    assert sqlite == postgres
    assert [version for version, _ in sqlite] == list(range(1, NEWEST + 1))


def test_a_new_store_records_every_version(tmp_path: pathlib.Path, postgres_url: str) -> None:
    SqliteStore(tmp_path / "s.sqlite").close()
    PostgresStore(postgres_url).close()

    assert _sqlite_versions(tmp_path / "s.sqlite") == list(range(1, NEWEST + 1))
    assert _postgres_versions(postgres_url) == list(range(1, NEWEST + 1))


def test_a_sqlite_store_from_before_versioning_is_upgraded_and_keeps_its_data(
    tmp_path: pathlib.Path,
) -> None:
    # What every coordinator wrote before schema versions: version 1's tables, no version row.
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        for statement in sqlite_schema.MIGRATIONS[0].statements:
            db.execute(statement)
        db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?)", _TASK_ROW)

    store = SqliteStore(path)
    store.commit_round(_committed(1, b"w1"), b"w1", ["tok"])

    assert [t.config.task_id for t in store.tasks()] == ["t1"]
    assert store.is_counted("tok")
    store.close()
    assert _sqlite_versions(path)[0] == 1 and _sqlite_versions(path)[-1] == NEWEST


@pytest.mark.parametrize("version", range(1, NEWEST))
def test_a_sqlite_store_at_an_older_version_is_upgraded_and_keeps_its_data(
    tmp_path: pathlib.Path, version: int
) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        for migration in sqlite_schema.MIGRATIONS[:version]:
            for statement in migration.statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (?, 0)", (migration.version,))
        db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?)", _TASK_ROW)

    store = SqliteStore(path)

    assert [t.config.task_id for t in store.tasks()] == ["t1"]
    assert store.acquire_lease("t1", "replica-a", now=1.0, duration_s=10.0) is not None
    store.close()
    assert _sqlite_versions(path) == list(range(1, NEWEST + 1))


@pytest.mark.parametrize("version", range(1, NEWEST))
def test_a_postgres_store_at_an_older_version_is_upgraded_and_keeps_its_data(
    postgres_url: str, version: int
) -> None:
    with psycopg.connect(postgres_url) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at FLOAT8)")
        for migration in postgres_schema.MIGRATIONS[:version]:
            for statement in migration.statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (%s, 0)", (migration.version,))
        db.execute("INSERT INTO tasks VALUES (%s, %s, %s, %s, %s, %s)", _TASK_ROW)

    store = PostgresStore(postgres_url)

    assert [t.config.task_id for t in store.tasks()] == ["t1"]
    assert store.acquire_lease("t1", "replica-a", now=1.0, duration_s=10.0) is not None
    store.close()
    assert _postgres_versions(postgres_url) == list(range(1, NEWEST + 1))


def test_a_sqlite_store_from_a_newer_version_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.sqlite"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (NEWEST + 7,))

    with pytest.raises(IncompatibleStore, match=f"schema version {NEWEST + 7}, written by a newer"):
        SqliteStore(path)


def test_a_postgres_store_from_a_newer_version_is_refused(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url) as db:
        db.execute("INSERT INTO schema_version VALUES (%s, 0)", (NEWEST + 7,))

    with pytest.raises(IncompatibleStore, match=f"this one knows versions up to {NEWEST}"):
        PostgresStore(postgres_url)


def test_serve_refuses_a_newer_store_with_one_line(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "state"
    data.mkdir(mode=0o700)
    SqliteStore(data / "coordinator.sqlite").close()
    with sqlite3.connect(data / "coordinator.sqlite") as db:
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (NEWEST + 1,))

    result = subprocess.run(
        [sys.executable, "-m", "overnight", "serve", "--insecure", "--data-dir", str(data)]
        + ["--address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("serve: store ")
    assert "written by a newer overnight" in result.stderr


def _broken_next_version() -> Migration:
    return Migration(
        NEWEST + 1,
        "a step that fails half way",
        ("CREATE TABLE half_done (x INTEGER)", "INSERT INTO no_such_table VALUES (1)"),
    )


def test_a_failed_sqlite_upgrade_changes_nothing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.sqlite"
    store = SqliteStore(path)
    store.add_task(_task())
    store.close()
    monkeypatch.setattr(
        sqlite_schema, "MIGRATIONS", (*sqlite_schema.MIGRATIONS, _broken_next_version())
    )

    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        SqliteStore(path)

    monkeypatch.undo()
    assert _sqlite_versions(path)[-1] == NEWEST
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in tables
    assert SqliteStore(path).tasks() == [_task()]


def test_a_failed_postgres_upgrade_changes_nothing(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PostgresStore(postgres_url)
    store.add_task(_task())
    store.close()
    monkeypatch.setattr(
        postgres_schema, "MIGRATIONS", (*postgres_schema.MIGRATIONS, _broken_next_version())
    )

    with pytest.raises(StoreUnavailable, match="no_such_table"):
        PostgresStore(postgres_url)

    monkeypatch.undo()
    assert _postgres_versions(postgres_url)[-1] == NEWEST
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
    reopened = PostgresStore(postgres_url)
    assert reopened.tasks() == [_task()]
    reopened.close()
