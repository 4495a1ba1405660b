"""SQLite (WAL) implementation of the coordinator store: the embedded default."""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import sqlite3
import threading
from collections.abc import Iterator

from server.errors import AlreadyExists, StoreUnavailable
from server.leases import Lease, check_fence, next_lease, released_at
from server.private_files import ensure_private_file, prepare_data_dir
from server.sqlite_schema import upgrade
from server.store import (
    AssignmentRecord,
    EnrolledDevice,
    RoundRecord,
    RoundState,
    Store,
    TaskRecord,
    TaskState,
    UnrecordedRound,
)

wal_size_limit_bytes = 4 << 20


class SqliteStore(Store):
    """`path` is a file, or ":memory:" for a store that lives as long as the object.

    The database file is 0600 (its -wal and -shm files take its mode): it holds device ids."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self._lock = threading.Lock()
        if str(path) != ":memory:":
            ensure_private_file(path)
            for suffix in ("-wal", "-shm"):  # left by an older version with wider modes
                companion = pathlib.Path(f"{path}{suffix}")
                if companion.exists():
                    ensure_private_file(companion)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        # Each commit writes a whole model (6.65 MB for the McMahan CNN) as one blob, and each
        # assignment a small row. Measured per page size (WAL, synchronous=NORMAL):
        #   4 KiB: blob commit 27 ms, small insert 0.026 ms (worst 4.5 ms, a checkpoint)
        #  16 KiB: blob commit  7 ms, small insert 0.047 ms (worst 11 ms)
        #  64 KiB: blob commit  4 ms, small insert 0.110 ms (worst 30 ms)
        # (Takes effect when the file is created; an existing store keeps its page size.)
        self._db.execute("PRAGMA page_size=16384")
        if str(path) != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: every committed transaction survives a process crash (kill -9); an OS
        # crash may lose the latest transactions but never corrupts the database.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # The WAL grows to ~16 MiB between automatic checkpoints (1,000 pages of 16 KiB) and
        # would keep that size for ever; past this limit a checkpoint truncates it. A chaos
        # test found a full WAL filling a small disk and staying full.
        self._db.execute(f"PRAGMA journal_size_limit={wal_size_limit_bytes}")
        upgrade(self._db, f"store {path}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serializes access, and turns SQLite's operational failures (disk full, read-only
        file, I/O error, corruption) into StoreUnavailable naming the real cause. Constraint
        violations stay sqlite3.IntegrityError for the caller to map."""
        with self._lock:
            try:
                yield
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"the coordinator's store failed: {exc}") from exc

    @classmethod
    def in_data_dir(cls, data_dir: str | pathlib.Path) -> SqliteStore:
        return cls(prepare_data_dir(data_dir) / "coordinator.sqlite")

    def put_resource(self, kind: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        with self._locked():
            self._db.execute(
                "INSERT OR IGNORE INTO resources (sha256, kind, data) VALUES (?, ?, ?)",
                (digest, kind, data),
            )
        return digest

    def get_resource(self, sha256: str) -> bytes | None:
        with self._locked():
            row = self._db.execute(
                "SELECT data FROM resources WHERE sha256 = ?", (sha256,)
            ).fetchone()
        return bytes(row[0]) if row else None

    def add_task(self, task: TaskRecord) -> None:
        with self._locked():
            try:
                self._db.execute(
                    "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        task.config.task_id,
                        json.dumps(task.config.to_dict()),
                        task.model_sha256,
                        task.initial_weights_sha256,
                        task.num_parameters,
                        task.created_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"task {task.config.task_id!r} already exists") from None

    def tasks(self) -> list[TaskRecord]:
        with self._locked():
            rows = self._db.execute(
                "SELECT tasks.task_id, config, model_sha256, initial_weights_sha256, "
                "num_parameters, created_at, COALESCE(task_states.state, 'running') FROM tasks "
                "LEFT JOIN task_states ON tasks.task_id = task_states.task_id "
                "ORDER BY created_at, tasks.task_id"
            ).fetchall()
        return [TaskRecord.from_row(row) for row in rows]

    def set_task_state(self, task_id: str, state: TaskState) -> None:
        with self._locked():
            self._db.execute(
                "INSERT INTO task_states VALUES (?, ?) "
                "ON CONFLICT (task_id) DO UPDATE SET state = excluded.state",
                (task_id, state.value),
            )

    def commit_round(
        self,
        record: RoundRecord,
        weights: bytes,
        counted_tokens: list[str],
        server_state: bytes = b"",
        fence: Lease | None = None,
    ) -> None:
        digest = hashlib.sha256(weights).hexdigest()
        if record.state is not RoundState.COMMITTED or record.weights_sha256 != digest:
            raise ValueError("commit_round needs a committed record naming the weights it commits")
        with self._locked():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._check_fence(record, fence)
                self._db.execute(
                    "INSERT OR IGNORE INTO resources (sha256, kind, data) VALUES (?, 'weights', ?)",
                    (digest, weights),
                )
                self._insert_round(record)
                self._db.executemany(
                    "INSERT INTO counted_uploads VALUES (?, ?, ?)",
                    [(token, record.task_id, record.round_number) for token in counted_tokens],
                )
                self._db.execute(
                    "INSERT INTO server_state VALUES (?, ?, ?)",
                    (record.task_id, record.round_number, server_state),
                )
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._rollback()
                raise AlreadyExists(
                    f"task {record.task_id!r} round {record.round_number}: "
                    "the round or one of its uploads was already committed"
                ) from None
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """Undoes an open transaction. SQLite may already have rolled it back itself (it does
        on a full disk), and a second ROLLBACK would then hide the real error."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def record_closed_round(self, record: RoundRecord, fence: Lease | None = None) -> None:
        if record.state not in (RoundState.FAILED, RoundState.ABANDONED):
            raise ValueError(
                f"record_closed_round takes failed or abandoned rounds, not {record.state}"
            )
        with self._locked():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._check_fence(record, fence)
                self._insert_round(record)
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._rollback()
                raise AlreadyExists(
                    f"task {record.task_id!r} round {record.round_number} already recorded"
                ) from None
            except BaseException:
                self._rollback()
                raise

    def _check_fence(self, record: RoundRecord, fence: Lease | None) -> None:
        """Inside the write transaction, so no lease can change before it commits."""
        if fence is None:
            return
        if fence.task_id != record.task_id:
            raise ValueError(f"a lease of task {fence.task_id!r} fences {record.task_id!r}")
        check_fence(fence, self._lease(fence.task_id))

    def acquire_lease(
        self, task_id: str, holder: str, now: float, duration_s: float
    ) -> Lease | None:
        with self._locked():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                granted = next_lease(self._lease(task_id), task_id, holder, now, duration_s)
                if granted is not None:
                    self._db.execute(
                        "INSERT INTO task_leases VALUES (?, ?, ?, ?) ON CONFLICT (task_id) "
                        "DO UPDATE SET holder = excluded.holder, epoch = excluded.epoch, "
                        "expires_at = excluded.expires_at",
                        (task_id, granted.holder, granted.epoch, granted.expires_at),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return granted

    def release_lease(self, lease: Lease) -> None:
        with self._locked():
            self._db.execute(
                "UPDATE task_leases SET expires_at = ? WHERE task_id = ? AND holder = ? "
                "AND epoch = ?",
                (released_at, lease.task_id, lease.holder, lease.epoch),
            )

    def current_lease(self, task_id: str) -> Lease | None:
        with self._locked():
            return self._lease(task_id)

    def _lease(self, task_id: str) -> Lease | None:
        row = self._db.execute(
            "SELECT holder, epoch, expires_at FROM task_leases WHERE task_id = ?", (task_id,)
        ).fetchone()
        return Lease(task_id, row[0], row[1], row[2]) if row else None

    def _insert_round(self, record: RoundRecord) -> None:
        self._db.execute(
            "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.task_id,
                record.round_number,
                record.state.value,
                record.selected,
                record.reported,
                record.dropped,
                json.dumps(record.metrics, sort_keys=True),
                record.started_at,
                record.finished_at,
                record.weights_sha256,
            ),
        )

    def rounds(self, task_id: str) -> list[RoundRecord]:
        with self._locked():
            rows = self._db.execute(
                "SELECT * FROM rounds WHERE task_id = ? ORDER BY round_number", (task_id,)
            ).fetchall()
        return [RoundRecord.from_row(row) for row in rows]

    def is_counted(self, token_sha256: str) -> bool:
        with self._locked():
            row = self._db.execute(
                "SELECT 1 FROM counted_uploads WHERE token_sha256 = ?", (token_sha256,)
            ).fetchone()
        return row is not None

    def server_state(self, task_id: str) -> bytes:
        with self._locked():
            row = self._db.execute(
                "SELECT state FROM server_state WHERE task_id = ? "
                "ORDER BY round_number DESC LIMIT 1",
                (task_id,),
            ).fetchone()
        return bytes(row[0]) if row else b""

    def add_assignment(self, assignment: AssignmentRecord) -> None:
        with self._locked():
            self._db.execute(
                "INSERT OR IGNORE INTO assignments VALUES (?, ?, ?, ?, ?)",
                (
                    assignment.token_sha256,
                    assignment.task_id,
                    assignment.round_number,
                    assignment.device_id,
                    assignment.issued_at,
                ),
            )

    def assignment(self, token_sha256: str) -> AssignmentRecord | None:
        with self._locked():
            row = self._db.execute(
                "SELECT * FROM assignments WHERE token_sha256 = ?", (token_sha256,)
            ).fetchone()
        return AssignmentRecord(*row) if row else None

    def last_assignment_time(self, task_id: str, device_id: str) -> float | None:
        with self._locked():
            row = self._db.execute(
                "SELECT MAX(issued_at) FROM assignments WHERE task_id = ? AND device_id = ?",
                (task_id, device_id),
            ).fetchone()
        return row[0] if row and row[0] is not None else None

    def unrecorded_rounds(self, task_id: str) -> list[UnrecordedRound]:
        with self._locked():
            rows = self._db.execute(
                "SELECT round_number, COUNT(*), MIN(issued_at) FROM assignments "
                "WHERE task_id = ? AND round_number "
                "NOT IN (SELECT round_number FROM rounds WHERE task_id = ?) "
                "GROUP BY round_number ORDER BY round_number",
                (task_id, task_id),
            ).fetchall()
        return [UnrecordedRound(number, selected, started) for number, selected, started in rows]

    def prune_history(self, task_id: str, before: float) -> int:
        # Deleted pages go to SQLite's free list and are reused by later inserts, so the file
        # stops growing once the retention age is reached; no VACUUM (it rewrites the file).
        old_assignments = (
            "FROM assignments AS a WHERE a.task_id = ? AND a.issued_at < ? AND EXISTS "
            "(SELECT 1 FROM rounds AS r WHERE r.task_id = a.task_id "
            "AND r.round_number = a.round_number)"
        )
        # Committed rounds whose checkpoint is still held, older than `before`, except the
        # latest: a committed round always has a server_state row, so that small table (not
        # every round ever recorded) is what these queries walk.
        old_commits = (
            "SELECT s.round_number FROM server_state AS s WHERE s.task_id = ? "
            "AND s.round_number < (SELECT MAX(round_number) FROM server_state WHERE task_id = ?) "
            "AND EXISTS (SELECT 1 FROM rounds AS r WHERE r.task_id = s.task_id "
            "AND r.round_number = s.round_number AND r.finished_at < ?)"
        )
        still_named = (
            "SELECT initial_weights_sha256 FROM tasks UNION "
            "SELECT weights_sha256 FROM rounds WHERE finished_at >= ? UNION "
            "SELECT r.weights_sha256 FROM (SELECT task_id, MAX(round_number) AS n "
            "FROM server_state GROUP BY task_id) AS latest JOIN rounds AS r "
            "ON r.task_id = latest.task_id AND r.round_number = latest.n"
        )
        with self._locked():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                removed = self._db.execute(
                    "DELETE FROM counted_uploads WHERE token_sha256 IN "
                    f"(SELECT a.token_sha256 {old_assignments})",
                    (task_id, before),
                ).rowcount
                removed += self._db.execute(
                    f"DELETE FROM assignments WHERE token_sha256 IN "
                    f"(SELECT a.token_sha256 {old_assignments})",
                    (task_id, before),
                ).rowcount
                # CROSS JOIN keeps SQLite from driving this from `rounds` (every round ever).
                removed += self._db.execute(
                    "DELETE FROM resources WHERE kind = 'weights' AND sha256 IN "
                    f"(SELECT r.weights_sha256 FROM ({old_commits}) AS o CROSS JOIN rounds AS r "
                    "ON r.task_id = ? AND r.round_number = o.round_number) "
                    f"AND sha256 NOT IN ({still_named})",
                    (task_id, task_id, before, task_id, before),
                ).rowcount
                removed += self._db.execute(
                    "DELETE FROM server_state WHERE task_id = ? "
                    f"AND round_number IN ({old_commits})",
                    (task_id, task_id, task_id, before),
                ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return removed

    def enroll_device(self, device: EnrolledDevice) -> bool:
        with self._locked():
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO enrolled_devices VALUES (?, ?, ?, ?, ?)",
                (
                    device.device_id,
                    device.population,
                    device.public_key_der,
                    device.credential,
                    device.enrolled_at,
                ),
            )
        return cursor.rowcount == 1

    def enrolled_device(self, device_id: str, population: str) -> EnrolledDevice | None:
        with self._locked():
            row = self._db.execute(
                "SELECT * FROM enrolled_devices WHERE device_id = ? AND population = ?",
                (device_id, population),
            ).fetchone()
        if row is None:
            return None
        return EnrolledDevice(row[0], row[1], bytes(row[2]), row[3], row[4])

    def enrolled_devices(self, population: str) -> int:
        with self._locked():
            row = self._db.execute(
                "SELECT COUNT(*) FROM enrolled_devices WHERE population = ?", (population,)
            ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._locked():
            self._db.close()
