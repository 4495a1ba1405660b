"""`overnight serve --repair`: rebuild a damaged SQLite store from what is still readable.

1. Damage in indexes only (e.g. a missing index row, which would let a token be counted
   twice) is repaired in place by REINDEX.
2. Otherwise every table is copied row by row into a fresh store; rows on damaged pages are
   lost. Then each task falls back to its last committed round whose weights and server
   state survived: later rounds are recorded abandoned and their counted uploads dropped
   (their updates are not in the surviving model). A task whose model or initial weights are
   lost cannot be repaired; nor can a store whose task table is unreadable.
3. The damaged file is kept beside the new one as `coordinator.sqlite.damaged-<time>`.

Raises DataDirError when the store cannot be repaired.
"""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
import time

from server.data_dir import DataDirError, store_problem

# Rows read per query while salvaging; a damaged page loses at most the rows it held.
salvage_batch_rows = 256


def repair_store(path: pathlib.Path) -> list[str]:
    """Repairs the store at `path` in place; returns what it did, one line per fact."""
    if _reindexed(path):
        return [f"rebuilt the indexes of {path.name}; no data was lost"]
    fresh = path.with_name(path.name + ".repairing")
    fresh.unlink(missing_ok=True)
    from server.sqlite_store import SqliteStore

    SqliteStore(fresh).close()  # the current schema
    report: list[str] = []
    with contextlib.closing(sqlite3.connect(fresh, isolation_level=None)) as new:
        try:
            old = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.DatabaseError as exc:
            raise DataDirError(f"{path} cannot be repaired: {exc}; restore a backup") from None
        with contextlib.closing(old):
            for table in _tables(new):
                kept, lost = _copy_table(old, new, table)
                if lost:
                    report.append(f"table {table}: {kept} rows kept, a damaged part skipped")
        if new.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 0:
            raise DataDirError(f"{path} cannot be repaired: no task survived; restore a backup")
        report.extend(_fall_back_to_last_good_commit(new))
    problem = store_problem(fresh, full_check_below_bytes=1 << 62)
    if problem is not None:
        raise DataDirError(f"{path} cannot be repaired ({problem}); restore it from a backup")
    damaged = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(damaged)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    fresh.rename(path)
    report.append(f"the damaged store is kept as {damaged.name}")
    return report


def _reindexed(path: pathlib.Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("REINDEX")
    except sqlite3.DatabaseError:
        return False
    return store_problem(path, full_check_below_bytes=1 << 62) is None


def _tables(db: sqlite3.Connection) -> list[str]:
    rows = db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return [row[0] for row in rows]


def _copy_table(old: sqlite3.Connection, new: sqlite3.Connection, table: str) -> tuple[int, bool]:
    """Copies what is readable, walking the table by rowid; returns (rows kept, anything
    lost). A query that hits a damaged page skips ahead past it."""
    try:
        columns = [row[1] for row in old.execute(f"PRAGMA table_info({table})")]
    except sqlite3.DatabaseError:
        return 0, True
    if not columns:
        return 0, False
    names = ", ".join(columns)
    insert = f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})"
    after, kept, lost, step = -(1 << 63), 0, False, 1
    while True:
        try:
            rows = old.execute(
                f"SELECT rowid, {names} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, salvage_batch_rows),
            ).fetchall()
        except sqlite3.DatabaseError:
            lost = True
            if after > (1 << 62):
                return kept, lost
            after = max(after, 0) + step  # past the damaged page, further each time
            step *= 2
            continue
        if not rows:
            return kept, lost
        step = 1
        new.executemany(insert, [row[1:] for row in rows])
        kept += len(rows)
        after = rows[-1][0]


def _fall_back_to_last_good_commit(db: sqlite3.Connection) -> list[str]:
    report = []
    for task_id, model, initial in db.execute(
        "SELECT task_id, model_sha256, initial_weights_sha256 FROM tasks"
    ).fetchall():
        for sha in (model, initial):
            if not _has_resource(db, sha):
                raise DataDirError(
                    f"task {task_id!r} cannot be repaired: its model or initial weights are "
                    "lost; restore the data directory from a backup"
                )
        committed = db.execute(
            "SELECT round_number, weights_sha256 FROM rounds "
            "WHERE task_id = ? AND state = 'committed' ORDER BY round_number DESC",
            (task_id,),
        ).fetchall()
        for number, weights in committed:
            state = db.execute(
                "SELECT 1 FROM server_state WHERE task_id = ? AND round_number = ?",
                (task_id, number),
            ).fetchone()
            if _has_resource(db, weights) and state is not None:
                break
            db.execute(
                "UPDATE rounds SET state = 'abandoned', weights_sha256 = '' "
                "WHERE task_id = ? AND round_number = ?",
                (task_id, number),
            )
            db.execute(
                "DELETE FROM counted_uploads WHERE task_id = ? AND round_number = ?",
                (task_id, number),
            )
            db.execute(
                "DELETE FROM server_state WHERE task_id = ? AND round_number = ?",
                (task_id, number),
            )
            report.append(f"task {task_id}: committed round {number} lost its weights; abandoned")
        last = db.execute(
            "SELECT MAX(round_number) FROM rounds WHERE task_id = ? AND state = 'committed'",
            (task_id,),
        ).fetchone()[0]
        report.append(f"task {task_id}: resumes after committed round {last or 0}")
    return report


def _has_resource(db: sqlite3.Connection, sha256: str) -> bool:
    return db.execute("SELECT 1 FROM resources WHERE sha256 = ?", (sha256,)).fetchone() is not None
