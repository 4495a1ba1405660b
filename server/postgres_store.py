"""PostgreSQL implementation of the coordinator store (psycopg 3 and its connection pool), for
coordinators that keep their state in a database their operators already run:
`overnight serve --store postgresql://USER@HOST/DB`.

Same contract and conformance suite as the SQLite store. Each method is one transaction on a
pooled connection. `commit_round` makes the round, its weights, its counted uploads and the
server state visible together, and returns once they are durable under the database's
`synchronous_commit` (by default: its WAL flushed). Writes on the request path (assignments,
enrollments, resources) do not wait for the flush; see `_relaxed_commits` for why that is as
safe as the SQLite store's `synchronous=NORMAL`.

One coordinator per database: opened with `sole_coordinator=True` (as `overnight serve` opens
it), the store holds the database's claim (server/postgres_claim.py) and checks it before every
commit. Replicas (`serve --replica`) share the claim among themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Literal

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from server.errors import AlreadyExists, StoreUnavailable
from server.leases import Lease, check_fence, next_lease, released_at
from server.postgres_claim import DatabaseClaim
from server.postgres_schema import upgrade
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

# The event loop calls the store inline and a commit runs in a worker thread, so a few
# connections serve a coordinator; each replica of a cluster opens this many at most.
pool_max_connections = 4
# How long a call waits for a pooled connection before it fails as StoreUnavailable. Short:
# calls block the event loop, and a device told UNAVAILABLE simply comes back later.
pool_wait_s = 2.0
# libpq's own limit on opening a connection (it does not accept fractions).
connect_timeout_s = 5


def describe(url: str) -> str:
    """Where a connection string points, without its password: for messages and logs."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"--store is not a valid PostgreSQL connection string: {exc}") from None
    host = parts.get("host") or "the local socket"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"PostgreSQL database {parts.get('dbname') or '(default)'!s} on {host}{port}"


class PostgresStore(Store):
    def __init__(self, url: str, sole_coordinator: bool = False, replica: bool = False) -> None:
        """`sole_coordinator`: hold the database's claim alone; `replica`: share it with other
        replicas only (server/postgres_claim.py)."""
        self._where = describe(url)
        # The application name tells this process in pg_stat_activity, and so in the
        # refusal a second coordinator gets.
        name = f"overnight coordinator pid {os.getpid()} on {socket.gethostname()}"
        self._conninfo = make_conninfo(
            url, application_name=name[:63], connect_timeout=connect_timeout_s
        )
        self._claim: DatabaseClaim | None = None
        try:
            with psycopg.connect(self._conninfo) as first:
                upgrade(first, self._where)
            if sole_coordinator or replica:
                self._claim = DatabaseClaim(self._conninfo, self._where, shared=replica)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot use the {self._where}: {_reason(exc)}") from None
        self._pool = psycopg_pool.ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=pool_max_connections,
            kwargs={"autocommit": True},
            configure=_relaxed_commits,
            timeout=pool_wait_s,
            name="overnight-store",
            open=False,
        )
        self._pool.open()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in autocommit mode: each statement is its own transaction, one
        round trip (a transaction block would add BEGIN and COMMIT to every read). Failures
        of the database or the network become StoreUnavailable naming the cause; constraint
        violations stay psycopg.IntegrityError for the caller to map."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.IntegrityError:
            raise
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            if isinstance(exc, psycopg.OperationalError):
                # A lost connection (a database restart, a network cut) fails this call; the
                # pool's other idle connections are tested now, so the next call does not
                # fail on one of them as well.
                self._pool.check()
            raise StoreUnavailable(
                f"the coordinator's store ({self._where}) failed: {_reason(exc)}"
            ) from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """A durable transaction: committed when the block ends (once PostgreSQL has flushed
        it, under the database's own synchronous_commit), rolled back if it raises."""
        with self._connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit TO DEFAULT")
            yield conn

    def relaxed_transaction(self) -> contextlib.AbstractContextManager[psycopg.Connection]:
        """A transaction on a pooled connection that commits without waiting for the WAL
        flush (see `_relaxed_commits`), for PostgreSQL-only state on the request path
        (server/replica_ledger.py). Errors as the store's own calls."""
        return _in_transaction(self._connection())

    def durable_transaction(self) -> contextlib.AbstractContextManager[psycopg.Connection]:
        """A transaction that returns once durable, as a commit's."""
        return self._transaction()

    def put_resource(self, kind: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO resources VALUES (%s, %s, %b) ON CONFLICT (sha256) DO NOTHING",
                (digest, kind, data),
            )
        return digest

    def get_resource(self, sha256: str) -> bytes | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT data FROM resources WHERE sha256 = %s", (sha256,), binary=True
            ).fetchone()
        return bytes(row[0]) if row else None

    def add_task(self, task: TaskRecord) -> None:
        try:
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO tasks VALUES (%s, %s, %s, %s, %s, %s)",
                    (
                        task.config.task_id,
                        json.dumps(task.config.to_dict()),
                        task.model_sha256,
                        task.initial_weights_sha256,
                        task.num_parameters,
                        task.created_at,
                    ),
                )
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists(f"task {task.config.task_id!r} already exists") from None

    def tasks(self) -> list[TaskRecord]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT tasks.task_id, config, model_sha256, initial_weights_sha256, "
                "num_parameters, created_at, COALESCE(task_states.state, 'running') FROM tasks "
                "LEFT JOIN task_states USING (task_id) "
                # Byte order, as SQLite sorts, whatever the database's locale.
                'ORDER BY created_at, tasks.task_id COLLATE "C"'
            ).fetchall()
        return [TaskRecord.from_row(row) for row in rows]

    def set_task_state(self, task_id: str, state: TaskState) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO task_states VALUES (%s, %s) "
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
        if self._claim is not None:
            self._claim.hold(on_lost=self._pool.check)
        try:
            with self._transaction() as conn:
                _check_fence(conn, record, fence)
                conn.execute(
                    "INSERT INTO resources VALUES (%s, 'weights', %b) "
                    "ON CONFLICT (sha256) DO NOTHING",
                    (digest, weights),
                )
                _insert_round(conn, record)
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO counted_uploads VALUES (%s, %s, %s)",
                        [(token, record.task_id, record.round_number) for token in counted_tokens],
                    )
                conn.execute(
                    "INSERT INTO server_state VALUES (%s, %s, %b)",
                    (record.task_id, record.round_number, server_state),
                )
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists(
                f"task {record.task_id!r} round {record.round_number}: "
                "the round or one of its uploads was already committed"
            ) from None

    def record_closed_round(self, record: RoundRecord, fence: Lease | None = None) -> None:
        if record.state not in (RoundState.FAILED, RoundState.ABANDONED):
            raise ValueError(
                f"record_closed_round takes failed or abandoned rounds, not {record.state}"
            )
        try:
            with self._transaction() as conn:
                _check_fence(conn, record, fence)
                _insert_round(conn, record)
        except psycopg.errors.UniqueViolation:
            raise AlreadyExists(
                f"task {record.task_id!r} round {record.round_number} already recorded"
            ) from None

    def acquire_lease(
        self, task_id: str, holder: str, now: float, duration_s: float
    ) -> Lease | None:
        with self._transaction() as conn:
            # The row lock makes acquirers take turns: the second one reads the first one's
            # lease once it commits, and is refused while that lease is live.
            current = _lease(conn, task_id, "FOR UPDATE")
            granted = next_lease(current, task_id, holder, now, duration_s)
            if granted is None:
                return None
            if current is None:
                # No row to lock yet: of two first acquirers, the second inserts nothing.
                inserted = conn.execute(
                    "INSERT INTO task_leases VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (task_id) DO NOTHING",
                    (task_id, granted.holder, granted.epoch, granted.expires_at),
                )
                return granted if inserted.rowcount == 1 else None
            conn.execute(
                "UPDATE task_leases SET holder = %s, epoch = %s, expires_at = %s "
                "WHERE task_id = %s",
                (granted.holder, granted.epoch, granted.expires_at, task_id),
            )
        return granted

    def release_lease(self, lease: Lease) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE task_leases SET expires_at = %s WHERE task_id = %s AND holder = %s "
                "AND epoch = %s",
                (released_at, lease.task_id, lease.holder, lease.epoch),
            )

    def current_lease(self, task_id: str) -> Lease | None:
        with self._connection() as conn:
            return _lease(conn, task_id)

    def rounds(self, task_id: str) -> list[RoundRecord]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT task_id, round_number, state, selected, reported, dropped, metrics, "
                "started_at, finished_at, weights_sha256 FROM rounds WHERE task_id = %s "
                "ORDER BY round_number",
                (task_id,),
            ).fetchall()
        return [RoundRecord.from_row(row) for row in rows]

    def is_counted(self, token_sha256: str) -> bool:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT 1 FROM counted_uploads WHERE token_sha256 = %s", (token_sha256,)
            ).fetchone()
        return row is not None

    def server_state(self, task_id: str) -> bytes:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT state FROM server_state WHERE task_id = %s "
                "ORDER BY round_number DESC LIMIT 1",
                (task_id,),
                binary=True,
            ).fetchone()
        return bytes(row[0]) if row else b""

    def add_assignment(self, assignment: AssignmentRecord) -> None:
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO assignments VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (token_sha256) DO NOTHING",
                (
                    assignment.token_sha256,
                    assignment.task_id,
                    assignment.round_number,
                    assignment.device_id,
                    assignment.issued_at,
                ),
            )

    def assignment(self, token_sha256: str) -> AssignmentRecord | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT token_sha256, task_id, round_number, device_id, issued_at "
                "FROM assignments WHERE token_sha256 = %s",
                (token_sha256,),
            ).fetchone()
        return AssignmentRecord(*row) if row else None

    def last_assignment_time(self, task_id: str, device_id: str) -> float | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT MAX(issued_at) FROM assignments WHERE task_id = %s AND device_id = %s",
                (task_id, device_id),
            ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def prune_history(self, task_id: str, before: float) -> int:
        # The same rule as the SQLite store's (see there); PostgreSQL's autovacuum reclaims
        # the deleted rows' space for later inserts.
        old_assignments = (
            "FROM assignments AS a WHERE a.task_id = %(task)s AND a.issued_at < %(before)s "
            "AND EXISTS (SELECT 1 FROM rounds AS r WHERE r.task_id = a.task_id "
            "AND r.round_number = a.round_number)"
        )
        old_commits = (
            "SELECT s.round_number FROM server_state AS s WHERE s.task_id = %(task)s "
            "AND s.round_number < (SELECT MAX(round_number) FROM server_state "
            "WHERE task_id = %(task)s) AND EXISTS (SELECT 1 FROM rounds AS r "
            "WHERE r.task_id = s.task_id AND r.round_number = s.round_number "
            "AND r.finished_at < %(before)s)"
        )
        still_named = (
            "SELECT initial_weights_sha256 FROM tasks UNION "
            "SELECT weights_sha256 FROM rounds WHERE finished_at >= %(before)s UNION "
            "SELECT r.weights_sha256 FROM (SELECT task_id, MAX(round_number) AS n "
            "FROM server_state GROUP BY task_id) AS latest JOIN rounds AS r "
            "ON r.task_id = latest.task_id AND r.round_number = latest.n"
        )
        names = {"task": task_id, "before": before}
        with self._transaction() as conn:
            removed = conn.execute(
                "DELETE FROM counted_uploads WHERE token_sha256 IN "
                f"(SELECT a.token_sha256 {old_assignments})",
                names,
            ).rowcount
            removed += conn.execute(
                "DELETE FROM assignments WHERE token_sha256 IN "
                f"(SELECT a.token_sha256 {old_assignments})",
                names,
            ).rowcount
            removed += conn.execute(
                "DELETE FROM resources WHERE kind = 'weights' AND sha256 IN "
                f"(SELECT r.weights_sha256 FROM ({old_commits}) AS o JOIN rounds AS r "
                "ON r.task_id = %(task)s AND r.round_number = o.round_number) "
                f"AND sha256 NOT IN ({still_named})",
                names,
            ).rowcount
            removed += conn.execute(
                f"DELETE FROM server_state WHERE task_id = %(task)s AND round_number IN "
                f"({old_commits})",
                names,
            ).rowcount
        return removed

    def unrecorded_rounds(self, task_id: str) -> list[UnrecordedRound]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT round_number, COUNT(*), MIN(issued_at) FROM assignments a "
                "WHERE task_id = %s AND NOT EXISTS (SELECT 1 FROM rounds r "
                "WHERE r.task_id = a.task_id AND r.round_number = a.round_number) "
                "GROUP BY round_number ORDER BY round_number",
                (task_id,),
            ).fetchall()
        return [UnrecordedRound(number, selected, started) for number, selected, started in rows]

    def enroll_device(self, device: EnrolledDevice) -> bool:
        with self._connection() as conn:
            cursor = conn.execute(
                "INSERT INTO enrolled_devices VALUES (%s, %s, %b, %s, %s) "
                "ON CONFLICT (device_id, population) DO NOTHING",
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
        with self._connection() as conn:
            row = conn.execute(
                "SELECT device_id, population, public_key, credential, enrolled_at "
                "FROM enrolled_devices WHERE device_id = %s AND population = %s",
                (device_id, population),
                binary=True,
            ).fetchone()
        if row is None:
            return None
        return EnrolledDevice(row[0], row[1], bytes(row[2]), row[3], row[4])

    def enrolled_devices(self, population: str) -> int:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM enrolled_devices WHERE population = %s", (population,)
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._pool.close()
        if self._claim is not None:
            self._claim.release()


@contextlib.contextmanager
def _in_transaction(
    connection: contextlib.AbstractContextManager[psycopg.Connection],
) -> Iterator[psycopg.Connection]:
    with connection as conn, conn.transaction():
        yield conn


def _relaxed_commits(conn: psycopg.Connection) -> None:
    """Pooled connections commit without waiting for the WAL flush: an assignment, an
    enrollment or a resource written on the request path costs a round trip, not a disk
    flush (4 ms here). A crash of this process loses none of them, since PostgreSQL has
    them; a crash of the database server may lose the last fraction of a second of them, as
    an OS crash may with SQLite's synchronous=NORMAL. Writes that must outlive any crash
    (round commits and records, tasks and operator decisions, leases) run in `_transaction`,
    which restores the database's own setting. A later durable commit also flushes every
    relaxed one before it: the WAL is one sequence."""
    conn.execute("SET synchronous_commit = off")


def _lease(
    conn: psycopg.Connection,
    task_id: str,
    lock: Literal["", "FOR UPDATE", "FOR SHARE"] = "",
) -> Lease | None:
    row = conn.execute(
        f"SELECT holder, epoch, expires_at FROM task_leases WHERE task_id = %s {lock}",
        (task_id,),
    ).fetchone()
    return Lease(task_id, row[0], row[1], row[2]) if row else None


def _check_fence(conn: psycopg.Connection, record: RoundRecord, fence: Lease | None) -> None:
    """In the commit's transaction; the shared row lock holds off a takeover until the
    commit is durable (the new leader then finds it), so no commit slips in after one."""
    if fence is None:
        return
    if fence.task_id != record.task_id:
        raise ValueError(f"a lease of task {fence.task_id!r} fences {record.task_id!r}")
    check_fence(fence, _lease(conn, fence.task_id, "FOR SHARE"))


def _insert_round(conn: psycopg.Connection, record: RoundRecord) -> None:
    conn.execute(
        "INSERT INTO rounds VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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


def _reason(exc: BaseException) -> str:
    """The first line of a driver error: libpq's messages run on with hints and context."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
