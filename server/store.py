"""The coordinator's persistent state, behind an interface any store implementation must meet.

Contract (checked by tests/server/test_store_conformance.py for every implementation):
- resources are content-addressed and immutable;
- `commit_round` is atomic: the round summary, the new global weights and the set of counted
  uploads become visible together or not at all;
- a token counted once can never be counted again (`commit_round` raises AlreadyExists) until
  `prune_history` forgets it with its assignment; a forgotten token is unknown, and the
  coordinator refuses unknown tokens before it counts anything;
- a commit fenced by a task lease goes through only while that lease is the task's current
  one (`commit_round` raises StaleLeader), checked in the commit's own transaction
  (server/leases.py has the lease rule).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import json
from collections.abc import Sequence
from typing import Any

from server.config import TaskConfig
from server.leases import Lease


class RoundState(enum.Enum):
    """A round's lifecycle; each state's rules live in `server/rounds/<state>.py`."""

    SELECTING = "selecting"  # taking devices (early reports accepted)
    REPORTING = "reporting"  # selection closed; waiting for reports
    AGGREGATING = "aggregating"  # closed to reports; finalizing and committing
    COMMITTED = "committed"  # terminal: new global weights stored
    FAILED = "failed"  # terminal: too few reports; the task retries with a new round
    ABANDONED = "abandoned"  # terminal: the coordinator died while the round was open


class TaskState(enum.Enum):
    """What an operator has decided for a task (`overnight task pause|resume|cancel`).

    Completion is not a state here: a task completes when it has committed its rounds."""

    RUNNING = "running"  # takes devices while it has rounds to run
    PAUSED = "paused"  # takes no devices; its open rounds run to their deadlines
    CANCELLED = "cancelled"  # terminal: takes no devices; its open rounds were abandoned


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    config: TaskConfig
    model_sha256: str
    initial_weights_sha256: str
    num_parameters: int
    created_at: float
    state: TaskState = TaskState.RUNNING

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> TaskRecord:
        """From (task_id, config JSON, model_sha256, initial_weights_sha256, num_parameters,
        created_at, state): the columns every store selects for its tasks."""
        _, config, model, weights, num, created, state = row
        return cls(
            TaskConfig.from_dict(json.loads(config)), model, weights, num, created, TaskState(state)
        )


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    task_id: str
    round_number: int
    state: RoundState
    selected: int
    reported: int
    dropped: int
    metrics: dict[str, float]
    started_at: float
    finished_at: float
    weights_sha256: str = ""  # committed rounds: the global weights after this round

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RoundRecord:
        """From the `rounds` table's columns in order (metrics as JSON), in every store."""
        task_id, number, state, selected, reported, dropped, metrics, started, finished = row[:9]
        return cls(
            task_id=task_id,
            round_number=number,
            state=RoundState(state),
            selected=selected,
            reported=reported,
            dropped=dropped,
            metrics=json.loads(metrics),
            started_at=started,
            finished_at=finished,
            weights_sha256=row[9],
        )


@dataclasses.dataclass(frozen=True)
class AssignmentRecord:
    token_sha256: str
    task_id: str
    round_number: int
    device_id: str
    issued_at: float


@dataclasses.dataclass(frozen=True)
class EnrolledDevice:
    """A device key enrolled in a population. `device_id` is the SHA-256 hex of the key."""

    device_id: str
    population: str
    public_key_der: bytes
    credential: str  # which credential admitted it (e.g. "shared-secret", "allowlist")
    enrolled_at: float


@dataclasses.dataclass(frozen=True)
class UnrecordedRound:
    """A round that issued assignments but has no outcome in the store: it was open when a
    coordinator process ended."""

    round_number: int
    selected: int  # assignments it issued
    started_at: float  # its first assignment


class Store(abc.ABC):
    """Every method may raise server.errors.StoreUnavailable when the storage underneath
    fails (disk full, read-only, I/O error); it then changed nothing."""

    @abc.abstractmethod
    def put_resource(self, kind: str, data: bytes) -> str:
        """Stores bytes under their SHA-256 (hex), which it returns. Idempotent."""

    @abc.abstractmethod
    def get_resource(self, sha256: str) -> bytes | None:
        """The bytes stored under `sha256`, or None."""

    @abc.abstractmethod
    def add_task(self, task: TaskRecord) -> None:
        """Adds a task. Raises AlreadyExists if its id is taken."""

    @abc.abstractmethod
    def tasks(self) -> list[TaskRecord]:
        """All tasks, in creation order, each with its latest state."""

    @abc.abstractmethod
    def set_task_state(self, task_id: str, state: TaskState) -> None:
        """Records an operator's decision for a task; durable once it returns."""

    @abc.abstractmethod
    def commit_round(
        self,
        record: RoundRecord,
        weights: bytes,
        counted_tokens: list[str],
        server_state: bytes = b"",
        fence: Lease | None = None,
    ) -> None:
        """Atomically records a committed round, its new weights, the uploads it counted and
        the server state (optimizer moments) after it.

        Raises AlreadyExists (and changes nothing) if the round number or a token was already
        committed; StaleLeader (and changes nothing) if `fence` is given and is no longer the
        task's current lease.
        """

    @abc.abstractmethod
    def record_closed_round(self, record: RoundRecord, fence: Lease | None = None) -> None:
        """Records a round that ended without a commit (failed or abandoned).

        Raises AlreadyExists if the round was already recorded; StaleLeader as commit_round.
        """

    @abc.abstractmethod
    def acquire_lease(
        self, task_id: str, holder: str, now: float, duration_s: float
    ) -> Lease | None:
        """Takes or renews the task's lease for `holder` by the rule of server/leases.py, as
        one atomic step against every other replica. Returns the lease, or None (and changes
        nothing) while another holder's lease is live at `now`."""

    @abc.abstractmethod
    def release_lease(self, lease: Lease) -> None:
        """Ends `lease` now if it is still the task's current lease (same holder and epoch);
        otherwise changes nothing. The epoch stays, so the next holder's is higher."""

    @abc.abstractmethod
    def current_lease(self, task_id: str) -> Lease | None:
        """The task's lease row (live or expired), or None if it never had one."""

    @abc.abstractmethod
    def server_state(self, task_id: str) -> bytes:
        """The server state committed with the task's latest committed round (b"" if none)."""

    @abc.abstractmethod
    def add_assignment(self, assignment: AssignmentRecord) -> None:
        """Remembers an issued upload token (by hash), so a restart can answer for it."""

    @abc.abstractmethod
    def assignment(self, token_sha256: str) -> AssignmentRecord | None:
        """The assignment an upload token was issued for, or None."""

    @abc.abstractmethod
    def last_assignment_time(self, task_id: str, device_id: str) -> float | None:
        """When the device was last selected for the task, or None."""

    @abc.abstractmethod
    def unrecorded_rounds(self, task_id: str) -> list[UnrecordedRound]:
        """Rounds that issued assignments but were never recorded (open at a crash)."""

    @abc.abstractmethod
    def rounds(self, task_id: str) -> list[RoundRecord]:
        """Committed and failed rounds of a task, by round number."""

    @abc.abstractmethod
    def is_counted(self, token_sha256: str) -> bool:
        """Whether an upload with this token hash was counted in a committed round."""

    @abc.abstractmethod
    def prune_history(self, task_id: str, before: float) -> int:
        """Forgets what the task no longer needs from before `before` (a time on the
        coordinator's clock), so the store stays bounded however long the task runs:
        - assignments issued before `before` whose round is recorded (committed, failed or
          abandoned), and the counted-upload marks of their tokens;
        - the server state and the weights of committed rounds that finished before `before`,
          except the task's latest committed round and weights any task or newer round
          still names.
        Round records, tasks, enrollments and a task's initial weights stay. Assignments of
        rounds without a record (open, or open at a crash) stay: `unrecorded_rounds` needs
        them. The caller keeps `before` early enough for eligibility's minimum separation.
        Returns how many rows it removed. Atomic: on StoreUnavailable nothing was removed.
        """

    @abc.abstractmethod
    def enroll_device(self, device: EnrolledDevice) -> bool:
        """Records an enrolled key. Returns False, and changes nothing, if the device id was
        already enrolled in the population (enrollment is idempotent)."""

    @abc.abstractmethod
    def enrolled_device(self, device_id: str, population: str) -> EnrolledDevice | None:
        """The device's enrollment in the population, or None."""

    @abc.abstractmethod
    def enrolled_devices(self, population: str) -> int:
        """How many devices are enrolled in the population."""

    @abc.abstractmethod
    def close(self) -> None: ...
