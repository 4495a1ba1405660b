"""One round in progress: who was selected, who reported, and the running aggregate."""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Protocol

from server.aggregation import ClientMetricsAccumulator, UpdateAggregator
from server.store import RoundState


class RoundCounts(Protocol):
    """What the rules of selecting.py and reporting.py read of a round: a round in this
    process's memory, or a round shared by replicas (server/replica_ledger.py)."""

    @property
    def started_at(self) -> float: ...
    @property
    def reporting_deadline(self) -> float: ...
    @property
    def selected(self) -> int: ...
    @property
    def reported(self) -> int: ...
    @property
    def outstanding(self) -> int: ...


class AssignmentState(enum.Enum):
    ASSIGNED = "assigned"
    REPORTED = "reported"
    FAILED = "failed"


@dataclasses.dataclass
class DeviceAssignment:
    device_id: str
    token_sha256: str
    # Examples the device declared at check-in: the most its update is ever weighted with.
    declared_examples: int
    state: AssignmentState = AssignmentState.ASSIGNED
    failure: str = ""


class RoundInProgress:
    """A round between selection and commit. Lives in memory; only its outcome is persisted
    (plus the hashes of the tokens it issued, so a restarted coordinator can answer for them).
    """

    def __init__(
        self,
        task_id: str,
        round_number: int,
        aggregate: UpdateAggregator,
        started_at: float,
        base_weights_sha256: str,
        base_version: int,
    ) -> None:
        self.task_id = task_id
        self.round_number = round_number
        self.state = RoundState.SELECTING
        self.started_at = started_at
        self.reporting_started_at = float("inf")
        self.reporting_deadline = float("inf")
        # The global model this round trains from, and how many commits preceded it: with
        # overlapping rounds, a round may commit on top of a newer model (staleness).
        self.base_weights_sha256 = base_weights_sha256
        self.base_version = base_version
        self.assignments: dict[str, DeviceAssignment] = {}
        self._state_counts: collections.Counter[AssignmentState] = collections.Counter()
        self.devices: set[str] = set()
        # Slots taken per source network (server/flood_limits.py); unlimited callers uncounted.
        self.network_slots: collections.Counter[str] = collections.Counter()
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
        return self._state_counts[state]

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

    def dropout_causes(self) -> dict[str, int]:
        causes: dict[str, int] = {}
        for a in self.assignments.values():
            if a.state is AssignmentState.FAILED:
                causes[a.failure] = causes.get(a.failure, 0) + 1
        return causes

    def counted_tokens(self) -> list[str]:
        return [t for t, a in self.assignments.items() if a.state is AssignmentState.REPORTED]

    def assign(
        self, device_id: str, token_sha256: str, declared_examples: int, network: str | None = None
    ) -> None:
        self.assignments[token_sha256] = DeviceAssignment(
            device_id, token_sha256, declared_examples
        )
        self._state_counts[AssignmentState.ASSIGNED] += 1
        self.devices.add(device_id)
        if network is not None:
            self.network_slots[network] += 1

    def network_has_room(self, network: str | None, cap: int) -> bool:
        return network is None or self.network_slots[network] < cap

    def set_state(self, token_sha256: str, state: AssignmentState, failure: str = "") -> None:
        """Moves one assignment to `state` (the only way its state changes: counts stay O(1))."""
        assignment = self.assignments[token_sha256]
        self._state_counts[assignment.state] -= 1
        self._state_counts[state] += 1
        assignment.state = state
        assignment.failure = failure
