"""What replicas of one coordinator share in PostgreSQL, beside the store: each open round with
its global counts, every assignment's fate, who handed over which partial aggregate, and a
heartbeat per replica.

Every change of a round's counts happens in one transaction with the row of its round
locked, and the round's next state follows from the counts in that same transaction, by the
same rules a single process applies (server/rounds/selecting.py, reporting.py). So a round's
quota, its target and its closing are global: N replicas select `target * over_selection`
devices between them, as one process would, and an upload is counted at most once whichever
replica receives it.

The rounds' states and rules are in server/shared_rounds.py.

Leader-only steps (opening a round, applying deadlines, taking partials) are fenced: they go
through only while the caller's lease is still the task's current one, checked in the same
transaction (server/leases.py).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import psycopg

from server.config import TaskConfig
from server.errors import AlreadyExists, FailedPrecondition, Unauthenticated
from server.flood_limits import network_slot_cap
from server.leases import Lease, check_fence
from server.postgres_store import PostgresStore
from server.shared_rounds import (
    ROUND_COLUMNS,
    TERMINAL_STATES,
    Handover,
    ReplicaRow,
    SharedAssignment,
    SharedRound,
    SharedState,
    next_state,
)
from server.store import AssignmentRecord


class ReplicaLedger:
    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    # ----- replicas ------------------------------------------------------------------------

    def heartbeat(self, replica: ReplicaRow) -> None:
        with self._store.relaxed_transaction() as conn:
            conn.execute(
                "INSERT INTO replicas (name, host, pid, started_at, seen_at, check_ins, uploads,"
                " address, forwarded) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                "started_at = excluded.started_at, seen_at = excluded.seen_at, check_ins = "
                "excluded.check_ins, uploads = excluded.uploads, address = excluded.address, "
                "forwarded = excluded.forwarded",
                dataclasses.astuple(replica),
            )

    def remove_replica(self, name: str) -> None:
        with self._store.relaxed_transaction() as conn:
            conn.execute("DELETE FROM replicas WHERE name = %s", (name,))

    def reported_by(self, replica: str, task_id: str, round_number: int) -> int:
        """Uploads `replica` (by name, any run of it) accepted in the round."""
        with self._store.relaxed_transaction() as conn:
            row = conn.execute(
                "SELECT reported FROM replica_round_counts WHERE replica = %s AND task_id = %s "
                "AND round_number = %s",
                (replica, task_id, round_number),
            ).fetchone()
        return int(row[0]) if row else 0

    def replicas(self) -> list[ReplicaRow]:
        with self._store.relaxed_transaction() as conn:
            rows = conn.execute(
                "SELECT name, host, pid, started_at, seen_at, check_ins, uploads, address, "
                "forwarded FROM replicas "
                'ORDER BY name COLLATE "C"'
            ).fetchall()
        return [ReplicaRow(*row) for row in rows]

    def leases(self) -> list[Lease]:
        with self._store.relaxed_transaction() as conn:
            rows = conn.execute(
                "SELECT task_id, holder, epoch, expires_at FROM task_leases "
                'ORDER BY task_id COLLATE "C"'
            ).fetchall()
        return [Lease(*row) for row in rows]

    def replica_counts(self) -> list[tuple[str, str, int, int]]:
        """(replica, task, devices selected, uploads accepted) over every round."""
        with self._store.relaxed_transaction() as conn:
            rows = conn.execute(
                "SELECT replica, task_id, SUM(selected), SUM(reported) FROM replica_round_counts "
                'GROUP BY replica, task_id ORDER BY replica COLLATE "C", task_id COLLATE "C"'
            ).fetchall()
        return [(r, t, int(s), int(u)) for r, t, s, u in rows]

    # ----- rounds --------------------------------------------------------------------------

    def unfinished_rounds(self, task_id: str | None = None) -> list[SharedRound]:
        """Rounds not yet committed, failed or abandoned (of one task, or of all)."""
        where = "state NOT IN (%s, %s, %s)"
        params: list[Any] = list(TERMINAL_STATES)
        if task_id is not None:
            where += " AND task_id = %s"
            params.append(task_id)
        with self._store.relaxed_transaction() as conn:
            rows = conn.execute(
                f"SELECT {ROUND_COLUMNS} FROM shared_rounds WHERE {where} "
                "ORDER BY task_id, round_number",
                params,
            ).fetchall()
        return [SharedRound.from_row(row) for row in rows]

    def committed_rounds(self) -> dict[str, int]:
        """How many rounds each task has committed (a follower's view of the leader's work)."""
        with self._store.relaxed_transaction() as conn:
            rows = conn.execute(
                "SELECT task_id, COUNT(*) FROM rounds WHERE state = 'committed' GROUP BY task_id"
            ).fetchall()
        return {task_id: int(count) for task_id, count in rows}

    def newest_round_number(self, task_id: str) -> int:
        with self._store.relaxed_transaction() as conn:
            row = conn.execute(
                "SELECT COALESCE(MAX(round_number), 0) FROM shared_rounds WHERE task_id = %s",
                (task_id,),
            ).fetchone()
        return int(row[0]) if row else 0

    def open_round(self, fence: Lease, shared: SharedRound) -> None:
        with self._store.durable_transaction() as conn:
            _check_fence(conn, fence, shared.task_id)
            conn.execute(
                f"INSERT INTO shared_rounds ({ROUND_COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, NULL, NULL, NULL, 0, 0, 0)",
                (
                    shared.task_id,
                    shared.round_number,
                    shared.state.value,
                    shared.epoch,
                    shared.seed,
                    json.dumps(shared.aggregator_state),
                    shared.base_weights_sha256,
                    shared.base_version,
                    shared.started_at,
                ),
            )

    def apply_deadlines(self, fence: Lease, task_id: str, config: TaskConfig, now: float) -> None:
        """The leader's pass: moves the task's open rounds on by their deadlines. Rounds
        whose state stays are only read (a pass every quarter second writes nothing)."""
        due = [
            shared
            for shared in self.unfinished_rounds(task_id)
            if shared.state.open and next_state(shared, config, now) != shared
        ]
        if not due:
            return
        with self._store.durable_transaction() as conn:
            _check_fence(conn, fence, task_id)
            for stale in due:
                shared = _locked_round(conn, task_id, stale.round_number)
                if shared is None:
                    continue
                after = next_state(shared, config, now)
                if after != shared:
                    _write_state(conn, after)

    def finish(self, task_id: str, round_number: int, state: SharedState, now: float) -> None:
        """Marks a round terminal once its record is durable, and drops what only its open
        life needed (assignments' fates, partials), and check-in nonces too old to replay."""
        if not state.terminal:
            raise ValueError(f"{state} is not terminal")
        key = (task_id, round_number)
        with self._store.relaxed_transaction() as conn:
            conn.execute(
                "UPDATE shared_rounds SET state = %s WHERE task_id = %s AND round_number = %s",
                (state.value, *key),
            )
            conn.execute("DELETE FROM round_partials WHERE task_id = %s AND round_number = %s", key)
            conn.execute(
                "DELETE FROM shared_assignments WHERE task_id = %s AND round_number = %s", key
            )
            conn.execute("DELETE FROM assigned_nonces WHERE expires_at < %s", (now,))

    # ----- assignments ---------------------------------------------------------------------

    def assign(
        self,
        record: AssignmentRecord,
        declared_examples: int,
        network: str | None,
        replica: str,
        config: TaskConfig,
        now: float,
        check_in_nonce: bytes,
        nonce_kept_s: float,
    ) -> SharedRound | None:
        """Counts an assignment against the round's global quota and the share of it one
        network may take (None: not limited), or returns None (and writes nothing) if the
        round takes no more devices, none from this network, or already has this device.
        Raises Unauthenticated (and writes nothing) if the signed check-in it answers, by
        its nonce, was already assigned by any replica: a replay. The nonce is kept
        `nonce_kept_s` (as long as a replica's own memory of nonces keeps it)."""
        with self._store.relaxed_transaction() as conn:
            shared = _locked_round(conn, record.task_id, record.round_number)
            if (
                shared is None
                or shared.state is not SharedState.SELECTING
                or shared.selected >= config.selection_quota
            ):
                return None
            if network is not None:
                row = conn.execute(
                    "SELECT COUNT(*) FROM shared_assignments WHERE task_id = %s "
                    "AND round_number = %s AND network = %s",
                    (record.task_id, record.round_number, network),
                ).fetchone()
                cap = network_slot_cap(config.max_network_share, config.selection_quota)
                if row is not None and row[0] >= cap:
                    return None
            inserted = conn.execute(
                "INSERT INTO shared_assignments (token_sha256, task_id, round_number, device_id,"
                " declared_examples, issued_by, state, failure, network) "
                "VALUES (%s, %s, %s, %s, %s, %s, 'assigned', '', %s) ON CONFLICT DO NOTHING",
                (
                    record.token_sha256,
                    record.task_id,
                    record.round_number,
                    record.device_id,
                    declared_examples,
                    replica,
                    network,
                ),
            )
            if inserted.rowcount != 1:
                return None
            fresh = conn.execute(
                "INSERT INTO assigned_nonces VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (record.device_id, check_in_nonce, now + nonce_kept_s),
            )
            if fresh.rowcount != 1:
                raise Unauthenticated("replayed check-in: this nonce was already used")
            conn.execute(
                "INSERT INTO assignments VALUES (%s, %s, %s, %s, %s)",
                dataclasses.astuple(record),
            )
            shared = dataclasses.replace(shared, selected=shared.selected + 1)
            _count(conn, shared, replica, "selected", 1)
            shared = next_state(shared, config, now)
            _write_state(conn, shared)
        return shared

    def assignment(self, token_sha256: str) -> SharedAssignment | None:
        with self._store.relaxed_transaction() as conn:
            row = conn.execute(
                "SELECT token_sha256, task_id, round_number, device_id, declared_examples, "
                "state, reported_by, failure FROM shared_assignments WHERE token_sha256 = %s",
                (token_sha256,),
            ).fetchone()
        return SharedAssignment(*row) if row else None

    def round_assignments(self, task_id: str, round_number: int) -> list[SharedAssignment]:
        with self._store.relaxed_transaction() as conn:
            rows = conn.execute(
                "SELECT token_sha256, task_id, round_number, device_id, declared_examples, "
                "state, reported_by, failure FROM shared_assignments "
                "WHERE task_id = %s AND round_number = %s",
                (task_id, round_number),
            ).fetchall()
        return [SharedAssignment(*row) for row in rows]

    def reserve_report(
        self, token_sha256: str, replica: str, config: TaskConfig, now: float
    ) -> SharedRound:
        """Counts one upload, received by `replica`, once for the whole cluster.

        Raises Unauthenticated (unknown token), AlreadyExists (counted already, here or on
        another replica), FailedPrecondition (round closed, deadline passed, assignment
        failed); nothing changes then."""
        with self._store.relaxed_transaction() as conn:
            assignment, shared = _locked_assignment(conn, token_sha256)
            if assignment.state == "reported":
                raise AlreadyExists("an update for this upload token was already accepted")
            if assignment.state == "failed":
                raise FailedPrecondition("this assignment was reported as failed")
            if not shared.state.open or now >= shared.reporting_deadline:
                raise FailedPrecondition(
                    f"round {shared.round_number} of task {shared.task_id!r} takes no reports"
                )
            conn.execute(
                "UPDATE shared_assignments SET state = 'reported', reported_by = %s "
                "WHERE token_sha256 = %s",
                (replica, token_sha256),
            )
            shared = dataclasses.replace(shared, reported=shared.reported + 1)
            _count(conn, shared, replica, "reported", 1)
            shared = next_state(shared, config, now)
            _write_state(conn, shared)
        return shared

    def release_report(self, token_sha256: str, replica: str) -> None:
        """Takes back a reservation whose update the replica then refused (undecodable)."""
        with self._store.relaxed_transaction() as conn:
            assignment, shared = _locked_assignment(conn, token_sha256)
            if assignment.state != "reported" or assignment.reported_by != replica:
                return
            conn.execute(
                "UPDATE shared_assignments SET state = 'assigned', reported_by = NULL "
                "WHERE token_sha256 = %s",
                (token_sha256,),
            )
            _write_state(conn, dataclasses.replace(shared, reported=shared.reported - 1))
            _count(conn, shared, replica, "reported", -1)

    def fail_assignment(
        self, token_sha256: str, cause: str, config: TaskConfig, now: float
    ) -> SharedRound:
        """A device reported that it could not finish. Raises as reserve_report."""
        with self._store.relaxed_transaction() as conn:
            assignment, shared = _locked_assignment(conn, token_sha256)
            if assignment.state != "assigned":
                raise FailedPrecondition(f"assignment already {assignment.state}")
            if not shared.state.open:
                raise FailedPrecondition(
                    f"round {shared.round_number} of task {shared.task_id!r} takes no reports"
                )
            conn.execute(
                "UPDATE shared_assignments SET state = 'failed', failure = %s "
                "WHERE token_sha256 = %s",
                (cause, token_sha256),
            )
            shared = next_state(dataclasses.replace(shared, failed=shared.failed + 1), config, now)
            _write_state(conn, shared)
        return shared

    # ----- handover and merge --------------------------------------------------------------

    def hand_over(
        self,
        task_id: str,
        round_number: int,
        replica: str,
        tokens: list[str],
        partial: bytes,
        early: bool = False,
    ) -> bool:
        """Leaves a replica's partial for the leader: once the round closed, or `early` (a
        replica that stops and takes no more uploads). False if the leader already merged
        (the replica's uploads then count as dropouts)."""
        accepted = [SharedState.AGGREGATING.value]
        if early:
            accepted += [SharedState.SELECTING.value, SharedState.REPORTING.value]
        with self._store.relaxed_transaction() as conn:
            row = conn.execute(
                "SELECT state FROM shared_rounds WHERE task_id = %s AND round_number = %s "
                "FOR SHARE",
                (task_id, round_number),
            ).fetchone()
            if row is None or row[0] not in accepted:
                return False
            conn.execute(
                "INSERT INTO round_partials VALUES (%s, %s, %s, %s, %b) ON CONFLICT DO NOTHING",
                (task_id, round_number, replica, json.dumps(tokens), partial),
            )
        return True

    def handovers_done(
        self, shared: SharedRound, now: float, silent_after_s: float, wait_at_most_s: float
    ) -> bool:
        """Whether every replica that accepted uploads for the round handed its partial over,
        or was silent (no heartbeat) for `silent_after_s`, or the leader waited long enough."""
        if now >= shared.closed_at + wait_at_most_s:
            return True
        with self._store.relaxed_transaction() as conn:
            rows = conn.execute(
                "SELECT r.seen_at, p.replica IS NOT NULL FROM replica_round_counts c "
                "LEFT JOIN replicas r ON r.name = c.replica "
                "LEFT JOIN round_partials p ON p.task_id = c.task_id "
                "AND p.round_number = c.round_number AND p.replica = c.replica "
                "WHERE c.task_id = %s AND c.round_number = %s AND c.reported > 0",
                (shared.task_id, shared.round_number),
            ).fetchall()
        return all(handed or seen is None or now - seen >= silent_after_s for seen, handed in rows)

    def take_partials(
        self, fence: Lease, task_id: str, round_number: int
    ) -> tuple[SharedRound, list[Handover], list[SharedAssignment]] | None:
        """Closes the round to handovers (merging) and returns its partials and assignments;
        None if the round is not aggregating or merging."""
        with self._store.durable_transaction() as conn:
            _check_fence(conn, fence, task_id)
            shared = _locked_round(conn, task_id, round_number)
            if shared is None or shared.state not in (
                SharedState.AGGREGATING,
                SharedState.MERGING,
            ):
                return None
            shared = dataclasses.replace(shared, state=SharedState.MERGING)
            _write_state(conn, shared)
            rows = conn.execute(
                "SELECT replica, tokens, partial FROM round_partials "
                'WHERE task_id = %s AND round_number = %s ORDER BY replica COLLATE "C"',
                (task_id, round_number),
                binary=True,
            ).fetchall()
        handovers = [Handover(r, json.loads(t), bytes(p)) for r, t, p in rows]
        return shared, handovers, self.round_assignments(task_id, round_number)


def _check_fence(conn: psycopg.Connection, fence: Lease, task_id: str) -> None:
    if fence.task_id != task_id:
        raise ValueError(f"a lease of task {fence.task_id!r} fences {task_id!r}")
    row = conn.execute(
        "SELECT holder, epoch, expires_at FROM task_leases WHERE task_id = %s FOR SHARE",
        (task_id,),
    ).fetchone()
    check_fence(fence, Lease(task_id, *row) if row else None)


def _locked_round(conn: psycopg.Connection, task_id: str, round_number: int) -> SharedRound | None:
    row = conn.execute(
        f"SELECT {ROUND_COLUMNS} FROM shared_rounds WHERE task_id = %s AND round_number = %s "
        "FOR UPDATE",
        (task_id, round_number),
    ).fetchone()
    return SharedRound.from_row(row) if row else None


def _locked_assignment(
    conn: psycopg.Connection, token_sha256: str
) -> tuple[SharedAssignment, SharedRound]:
    row = conn.execute(
        "SELECT token_sha256, task_id, round_number, device_id, declared_examples, state, "
        "reported_by, failure FROM shared_assignments WHERE token_sha256 = %s FOR UPDATE",
        (token_sha256,),
    ).fetchone()
    if row is None:
        raise Unauthenticated("unknown upload token")
    assignment = SharedAssignment(*row)
    shared = _locked_round(conn, assignment.task_id, assignment.round_number)
    if shared is None:
        raise FailedPrecondition(f"round {assignment.round_number} is closed")
    return assignment, shared


def _write_state(conn: psycopg.Connection, shared: SharedRound) -> None:
    def finite(value: float) -> float | None:
        return None if value == float("inf") else value

    conn.execute(
        "UPDATE shared_rounds SET state = %s, reporting_started_at = %s, reporting_deadline = %s,"
        " closed_at = %s, selected = %s, reported = %s, failed = %s "
        "WHERE task_id = %s AND round_number = %s",
        (
            shared.state.value,
            finite(shared.reporting_started_at),
            finite(shared.reporting_deadline),
            finite(shared.closed_at),
            shared.selected,
            shared.reported,
            shared.failed,
            shared.task_id,
            shared.round_number,
        ),
    )


def _count(
    conn: psycopg.Connection, shared: SharedRound, replica: str, column: str, delta: int
) -> None:
    assert column in ("selected", "reported")
    conn.execute(
        f"INSERT INTO replica_round_counts (task_id, round_number, replica, {column}) "
        f"VALUES (%s, %s, %s, %s) ON CONFLICT (task_id, round_number, replica) "
        f"DO UPDATE SET {column} = replica_round_counts.{column} + excluded.{column}",
        (shared.task_id, shared.round_number, replica, delta),
    )
