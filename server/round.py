"""One round in progress: who was selected, who reported, and the running aggregate."""

from __future__ import annotations

import dataclasses
import enum

from server.aggregation import ClientMetricsAccumulator, UpdateAggregator
from server.store import RoundState


class AssignmentState(enum.Enum):
    ASSIGNED = "assigned"
    REPORTED = "reported"
    FAILED = "failed"


@dataclasses.dataclass
class DeviceAssignment:
    device_id: str
    token_sha256: str
    state: AssignmentState = AssignmentState.ASSIGNED
    failure: str = ""


class RoundInProgress:
    """A round between selection and commit. Lives in memory; only its commit is persisted.

    States: SELECTING (taking devices; early reports are accepted) -> REPORTING (selection
    closed) -> COMMITTED or FAILED (the coordinator then drops this object).
    """

    def __init__(
        self, task_id: str, round_number: int, aggregate: UpdateAggregator, started_at: float
    ) -> None:
        self.task_id = task_id
        self.round_number = round_number
        self.state = RoundState.SELECTING
        self.started_at = started_at
        self.reporting_deadline = float("inf")
        self.assignments: dict[str, DeviceAssignment] = {}
        self.devices: set[str] = set()
        self.aggregate = aggregate
        self.client_metrics = ClientMetricsAccumulator()
        self.broadcast_bytes = 0
        self.upload_bytes = 0

    @property
    def open(self) -> bool:
        return self.state in (RoundState.SELECTING, RoundState.REPORTING)

    @property
    def selected(self) -> int:
        return len(self.assignments)

    def count(self, state: AssignmentState) -> int:
        return sum(1 for a in self.assignments.values() if a.state is state)

    @property
    def reported(self) -> int:
        return self.count(AssignmentState.REPORTED)

    @property
    def outstanding(self) -> int:
        return self.count(AssignmentState.ASSIGNED)

    @property
    def dropped(self) -> int:
        """Failure reports, plus (once the round is over) assignments that never reported."""
        return self.count(AssignmentState.FAILED) + (0 if self.open else self.outstanding)

    def counted_tokens(self) -> list[str]:
        return [t for t, a in self.assignments.items() if a.state is AssignmentState.REPORTED]

    def assign(self, device_id: str, token_sha256: str) -> None:
        self.assignments[token_sha256] = DeviceAssignment(device_id, token_sha256)
        self.devices.add(device_id)

    def close_selection(self, now: float, reporting_deadline_s: float) -> None:
        self.state = RoundState.REPORTING
        self.reporting_deadline = now + reporting_deadline_s
