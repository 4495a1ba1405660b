"""A task as the coordinator holds it in memory: the global model, optimizer state, open rounds."""

from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import assert_never

import numpy as np

from server.aggregators.process import AggregationProcess
from server.config import TaskConfig
from server.optimizers import ServerOptimizer, State
from server.pace_steering import RoundDemand
from server.rounds.round import RoundInProgress
from server.store import RoundState, TaskRecord, TaskState

# Before any round of a task has been measured, pace steering expects reporting to take at
# least this fraction of the reporting deadline (see TaskRuntime._expected_reporting_s). Zero:
# a guess of a quarter of the deadline sent a small population away for 15 s of a 60 s
# deadline while its first rounds took 1.5 s, and those rounds closed short of their quota.
unmeasured_reporting_fraction = 0.0
# Outcomes of this many latest rounds are kept in memory (TaskRuntime.recent_outcomes).
recent_outcomes_kept = 64


@dataclasses.dataclass
class TaskRuntime:
    record: TaskRecord
    weights: np.ndarray
    weights_sha256: str
    optimizer: ServerOptimizer
    optimizer_state: State
    committed_rounds: int
    next_round_number: int
    aggregation: AggregationProcess  # the aggregator across rounds, and its state
    broadcasted_bits: float = 0.0
    aggregated_bits: float = 0.0
    open_rounds: dict[int, RoundInProgress] = dataclasses.field(default_factory=dict)
    # Recent time from the end of selection to the close of a round, for pace steering
    # (record_reporting), and their median, kept so that no check-in recomputes it.
    reporting_durations_s: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=20)
    )
    median_reporting_s: float | None = None
    last_round: RoundInProgress | None = None
    # Why the task stopped, if its round logic raised (a defect): it takes no more devices.
    fault: str = ""
    # After a failed store write, the round driver leaves the task alone until this time,
    # with a backoff of `store_retry_s` that doubles while writes keep failing.
    store_retry_at: float = float("-inf")
    store_retry_s: float = 0.0
    state: TaskState = TaskState.RUNNING  # the operator's decision, as stored
    # How the latest rounds ended, so a late report learns it without a scan of the store.
    recent_outcomes: collections.OrderedDict[int, RoundState] = dataclasses.field(
        default_factory=collections.OrderedDict
    )

    def remember_outcome(self, round_number: int, state: RoundState) -> None:
        self.recent_outcomes[round_number] = state
        while len(self.recent_outcomes) > recent_outcomes_kept:
            self.recent_outcomes.popitem(last=False)

    @property
    def config(self) -> TaskConfig:
        return self.record.config

    @property
    def task_id(self) -> str:
        return self.record.config.task_id

    @property
    def completed(self) -> bool:
        return self.committed_rounds >= self.config.total_rounds

    @property
    def takes_devices(self) -> bool:
        """Whether check-ins may be assigned to this task: running by the operator's decision,
        not done, and not stopped by a fault in its round logic."""
        match self.state:
            case TaskState.RUNNING:
                return not self.completed and not self.fault
            case TaskState.PAUSED | TaskState.CANCELLED:
                return False
            case _:
                assert_never(self.state)

    @property
    def status(self) -> str:
        """What the admin API and `overnight status` show."""
        if self.state is TaskState.CANCELLED:
            return "cancelled"
        if self.fault:
            return f"failed: {self.fault}"
        if self.completed:
            return "completed"
        return self.state.value

    @property
    def selecting(self) -> RoundInProgress | None:
        for round_ in self.open_rounds.values():
            if round_.state is RoundState.SELECTING:
                return round_
        return None

    @property
    def current(self) -> RoundInProgress | None:
        """The newest open round, else the last closed one (for status displays)."""
        if self.open_rounds:
            return self.open_rounds[max(self.open_rounds)]
        return self.last_round

    def can_open_round(self) -> bool:
        # A failed round waiting for the driver to record it holds no place: it changes no
        # weights, so the next round need not wait for its record.
        live = sum(r.state is not RoundState.FAILED for r in self.open_rounds.values())
        return (
            not self.completed
            and self.selecting is None
            and live < self.config.max_concurrent_rounds
            and self.committed_rounds + live < self.config.total_rounds
        )

    def next_selection_in_s(self, now: float) -> float:
        """Estimated seconds until this task selects devices again (0 if it does now)."""
        if self.completed:
            return float("inf")
        if self.selecting is not None or self.can_open_round():
            return 0.0
        ends = [
            r.reporting_started_at + self._expected_reporting_s(now - r.reporting_started_at)
            for r in self.open_rounds.values()
            if r.state is RoundState.REPORTING
        ]
        return max(0.0, min(ends) - now) if ends else 0.0

    def record_reporting(self, reported_s: float) -> None:
        """A round closed after reporting for `reported_s`."""
        self.reporting_durations_s.append(reported_s)
        self.median_reporting_s = statistics.median(self.reporting_durations_s)

    def round_demand(self) -> RoundDemand | None:
        """What this task's rounds take, for pace steering: its selection quota per median
        recent reporting time; None before a round closed."""
        if self.median_reporting_s is None:
            return None
        return RoundDemand(self.config.selection_quota, self.median_reporting_s)

    def _expected_reporting_s(self, elapsed_s: float) -> float:
        """How long a round that has been reporting for `elapsed_s` will report in all.

        From the task's recent rounds once one has closed. Before that, a guess that errs
        early: twice the time elapsed. A device told to come
        back too early only checks in again; one told too late (e.g. at the deadline, when a
        small population's round is done in seconds) holds back the next round.
        """
        deadline = self.config.reporting_deadline_s
        if self.median_reporting_s is not None:
            return min(deadline, self.median_reporting_s)
        return min(deadline, max(unmeasured_reporting_fraction * deadline, 2.0 * elapsed_s))
