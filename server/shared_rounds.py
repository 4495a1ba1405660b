"""A round as every replica sees it (server/replica_ledger.py keeps it in PostgreSQL): its
global counts, its state, and the rules that move it, which are a single coordinator's own
(server/rounds/selecting.py, reporting.py) applied to the counts of all replicas.

    selecting ─▶ reporting ─▶ aggregating ─▶ merging ─▶ committed
         └───────────┴──────▶ failing ─────────────────▶ failed
    any non-terminal state ─▶ abandoned (a new leader takes the task)

`aggregating`: closed to reports; each replica hands over its partial aggregate. `merging`:
the leader took the partials (a handover after that is refused, so a slow replica's uploads
count as dropouts, never twice). `failing`: too few reports; the leader records it failed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from server.config import TaskConfig
from server.rounds import reporting, selecting
from server.rounds.round import RoundInProgress
from server.store import RoundState


class SharedState(enum.Enum):
    SELECTING = "selecting"
    REPORTING = "reporting"
    AGGREGATING = "aggregating"
    MERGING = "merging"
    FAILING = "failing"
    COMMITTED = "committed"
    FAILED = "failed"
    ABANDONED = "abandoned"

    @property
    def open(self) -> bool:
        return self in (SharedState.SELECTING, SharedState.REPORTING)

    @property
    def terminal(self) -> bool:
        return self in (SharedState.COMMITTED, SharedState.FAILED, SharedState.ABANDONED)


TERMINAL_STATES = tuple(s.value for s in SharedState if s.terminal)
# The columns of `shared_rounds`, in the order SharedRound.from_row reads them.
ROUND_COLUMNS = (
    "task_id, round_number, state, epoch, seed, aggregator_state, base_weights_sha256, "
    "base_version, started_at, reporting_started_at, reporting_deadline, closed_at, selected, "
    "reported, failed"
)


@dataclasses.dataclass(frozen=True)
class SharedRound:
    task_id: str
    round_number: int
    state: SharedState
    epoch: int  # the lease epoch of the leader that opened it
    seed: int  # the aggregator's shared seed (rotations, codecs): every replica's is the same
    aggregator_state: dict[str, float]
    base_weights_sha256: str
    base_version: int
    started_at: float
    reporting_started_at: float = float("inf")
    reporting_deadline: float = float("inf")
    closed_at: float = float("inf")
    selected: int = 0
    reported: int = 0
    failed: int = 0

    @property
    def outstanding(self) -> int:
        return self.selected - self.reported - self.failed

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> SharedRound:
        inf = float("inf")
        return cls(
            task_id=row[0],
            round_number=row[1],
            state=SharedState(row[2]),
            epoch=row[3],
            seed=int(row[4]),
            aggregator_state=json.loads(row[5]),
            base_weights_sha256=row[6],
            base_version=row[7],
            started_at=row[8],
            reporting_started_at=inf if row[9] is None else row[9],
            reporting_deadline=inf if row[10] is None else row[10],
            closed_at=inf if row[11] is None else row[11],
            selected=row[12],
            reported=row[13],
            failed=row[14],
        )


@dataclasses.dataclass(frozen=True)
class SharedAssignment:
    token_sha256: str
    task_id: str
    round_number: int
    device_id: str
    declared_examples: int
    state: str  # "assigned", "reported", "failed" (server.rounds.round.AssignmentState)
    reported_by: str | None
    failure: str


@dataclasses.dataclass(frozen=True)
class Handover:
    replica: str
    tokens: list[str]
    partial: bytes


@dataclasses.dataclass(frozen=True)
class ReplicaRow:
    name: str
    host: str
    pid: int
    started_at: float
    seen_at: float
    check_ins: int
    uploads: int
    address: str = ""  # where other replicas reach it (forwarding of secure tasks' calls)
    forwarded: int = 0  # calls it forwarded to the host of a secure task


def next_state(
    shared: SharedRound, config: TaskConfig, now: float, min_selected: int = 0
) -> SharedRound:
    """The round after its rules have seen `now` and its counts (as Coordinator.advance)."""
    while True:
        match shared.state:
            case SharedState.SELECTING:
                following = selecting.next_state(shared, config, now, min_selected)
            case SharedState.REPORTING:
                following = reporting.next_state(shared, config, now)
            case _:
                return shared
        match following:
            case RoundState.SELECTING:
                return shared
            case RoundState.REPORTING if shared.state is SharedState.REPORTING:
                return shared
            case RoundState.REPORTING:
                shared = dataclasses.replace(
                    shared,
                    state=SharedState.REPORTING,
                    reporting_started_at=now,
                    reporting_deadline=now + config.reporting_deadline_s,
                )
            case RoundState.AGGREGATING:
                return dataclasses.replace(shared, state=SharedState.AGGREGATING, closed_at=now)
            case _:
                return dataclasses.replace(shared, state=SharedState.FAILING, closed_at=now)


def mirror_state(round_: RoundInProgress, shared: SharedRound) -> None:
    """Brings a replica's in-memory copy of a round up to the shared round's state."""
    match shared.state:
        case SharedState.SELECTING:
            round_.state = RoundState.SELECTING
        case SharedState.REPORTING:
            round_.state = RoundState.REPORTING
        case _:
            pass  # closed: the next replication pass hands the mirror over
    round_.reporting_started_at = shared.reporting_started_at
    round_.reporting_deadline = shared.reporting_deadline
