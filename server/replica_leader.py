"""The steps a replica takes for the tasks whose lease it holds (server/replica_coordinator.py
is the rest of a replica): on taking a task, abandon the rounds an earlier leader left open and
read the task back from the store; open rounds for every replica to fill; apply their
deadlines; and once a round is closed and the replicas have handed over their partials (or
gone silent), merge them into the round the round driver commits under the lease.
"""

from __future__ import annotations

import contextlib
import logging

from device_runtime.logs import about
from server.aggregation import EvaluationReports, UpdateAggregator
from server.coordinator import Coordinator
from server.errors import AlreadyExists
from server.leases import Lease
from server.replica_ledger import ReplicaLedger
from server.replica_partials import RoundPartial, merge_into
from server.rounds.round import AssignmentState, RoundInProgress
from server.shared_rounds import SharedAssignment, SharedRound, SharedState, mirror_state
from server.store import RoundRecord, RoundState, TaskState
from server.task_leadership import TaskLeadership
from server.task_runtime import TaskRuntime

log = logging.getLogger(__name__)

REPLICA_LOST = "REPLICA_LOST"  # dropout cause of uploads whose replica never handed them over


class ReplicaLeader(Coordinator):
    """A coordinator's leader half; ReplicaCoordinator sets these up."""

    ledger: ReplicaLedger
    leadership: TaskLeadership
    replica_name: str
    _taken_over: dict[str, int]  # task -> lease epoch whose takeover is done
    _merged: set[tuple[str, int]]  # rounds this leader merged, not yet ended
    secure_task_ids: set[str]  # tasks whose rounds this leader hosts itself

    def _lead(self, task: TaskRuntime, shared: list[SharedRound]) -> TaskRuntime:
        fence = self.leadership.fence(task.task_id)
        assert fence is not None
        if self._taken_over.get(task.task_id) != fence.epoch:
            task = self._take_over(task, fence, shared)
            shared = []
        if task.state is TaskState.CANCELLED:
            self._abandon_shared(task.task_id, fence, shared)
            if task.task_id in self.secure_task_ids:  # its rounds are hosted here
                for round_ in list(task.open_rounds.values()):
                    self.abandon(task, round_)
            return task
        if task.task_id in self.secure_task_ids:
            return task  # its rounds open on check-ins here, as on one coordinator
        self.ledger.apply_deadlines(fence, task.task_id, task.config, self.now())
        unfinished = self.ledger.unfinished_rounds(task.task_id)
        # As TaskRuntime.can_open_round, over the rounds of every replica.
        live = [r for r in unfinished if r.state is not SharedState.FAILING]
        if (
            task.takes_devices
            and not any(r.state is SharedState.SELECTING for r in live)
            and len(live) < task.config.max_concurrent_rounds
            and task.committed_rounds + len(live) < task.config.total_rounds
        ):
            self._open_round(task, fence)
        return task

    def _take_over(self, task: TaskRuntime, fence: Lease, shared: list[SharedRound]) -> TaskRuntime:
        """This replica now leads the task: rounds open under an earlier leader are abandoned
        (as on a restart), and the task's model and state are read back from the store."""
        self._abandon_shared(task.task_id, fence, shared)
        super()._abandon_lost_rounds(task.task_id, fence)
        for round_ in list(task.open_rounds.values()):
            round_.state = RoundState.ABANDONED
            Coordinator.forget(self, task, round_)
        self._merged = {key for key in self._merged if key[0] != task.task_id}
        reloaded = self._load_task(task.record)
        reloaded.state = task.state
        reloaded.next_round_number = max(
            reloaded.next_round_number, self.ledger.newest_round_number(task.task_id) + 1
        )
        self._taken_over[task.task_id] = fence.epoch
        log.info(
            "task %s: %s took the lead at epoch %d",
            task.task_id,
            self.replica_name,
            fence.epoch,
            extra=about(task.task_id),
        )
        return reloaded

    def _abandon_shared(self, task_id: str, fence: Lease, shared: list[SharedRound]) -> None:
        recorded = {r.round_number: r.state for r in self.store.rounds(task_id)}
        for row in shared:
            state = recorded.get(row.round_number)
            if state is None:
                record = RoundRecord(
                    task_id=task_id,
                    round_number=row.round_number,
                    state=RoundState.ABANDONED,
                    selected=row.selected,
                    reported=0,
                    dropped=row.selected,
                    metrics={"round/dropouts/abandoned": float(row.selected)},
                    started_at=row.started_at,
                    finished_at=self.now(),
                )
                with contextlib.suppress(AlreadyExists):  # recorded by a write that "failed"
                    self.store.record_closed_round(record, fence)
                state = RoundState.ABANDONED
                log.warning(
                    "task %s: round %d abandoned by a change of leader (%d devices selected)",
                    task_id,
                    row.round_number,
                    row.selected,
                    extra=about(task_id, row.round_number),
                )
            self.ledger.finish(task_id, row.round_number, SharedState(state.value), self.now())

    def _open_round(self, task: TaskRuntime, fence: Lease) -> None:
        if task.config.is_evaluation:
            # Evaluate whatever the training task has committed most recently.
            trained = self.store.rounds(task.config.evaluates)
            committed = [r.weights_sha256 for r in trained if r.state is RoundState.COMMITTED]
            initial = self._tasks[task.config.evaluates].record.initial_weights_sha256
            base = committed[-1] if committed else initial
            seed, state = 0, {}
        else:
            aggregate = task.aggregation.start_round()
            codec = getattr(aggregate, "codec", None)
            seed, state = (codec.seed if codec is not None else 0), dict(task.aggregation.state)
            base = task.weights_sha256
        shared = SharedRound(
            task_id=task.task_id,
            round_number=task.next_round_number,
            state=SharedState.SELECTING,
            epoch=fence.epoch,
            seed=seed,
            aggregator_state=state,
            base_weights_sha256=base,
            base_version=task.committed_rounds,
            started_at=self.now(),
        )
        self.ledger.open_round(fence, shared)
        task.next_round_number += 1
        log.info(
            "task %s: round %d selecting",
            task.task_id,
            shared.round_number,
            extra=about(task.task_id, shared.round_number),
        )

    def _round_aggregator(
        self, task: TaskRuntime, shared: SharedRound, adopt: bool = False
    ) -> UpdateAggregator:
        if task.config.is_evaluation:
            return EvaluationReports()
        return task.aggregation.round_with(shared.seed, shared.aggregator_state, adopt)

    def _merge_closed(self, task: TaskRuntime, shared: list[SharedRound]) -> None:
        """The leader's step: rounds whose partials are all in (or whose replicas went
        silent) are merged, and failed ones summarized, for the round driver to end."""
        fence = self.leadership.fence(task.task_id)
        lease_s = self.leadership.lease_s
        now = self.now()
        for row in shared:
            key = (task.task_id, row.round_number)
            if key in self._merged or fence is None:
                continue
            if row.state is SharedState.FAILING:
                assignments = self.ledger.round_assignments(*key)
                round_ = self._summarized(task, row, assignments, set(), adopt=False)
                round_.state = RoundState.FAILED
            elif row.state is SharedState.MERGING or (
                row.state is SharedState.AGGREGATING
                and self.ledger.handovers_done(row, now, lease_s, 3 * lease_s)
            ):
                taken = self.ledger.take_partials(fence, *key)
                if taken is None:
                    continue
                row, handovers, assignments = taken
                counted = {t for h in handovers for t in h.tokens}
                round_ = self._summarized(task, row, assignments, counted)
                partial = RoundPartial(round_.aggregate, round_.client_metrics, 0, 0)
                for handover in handovers:
                    if handover.partial:  # empty: a restarted replica lost its uploads
                        merge_into(partial, handover.partial, self._round_aggregator(task, row))
                round_.upload_bytes = partial.upload_bytes
                round_.broadcast_bytes = partial.broadcast_bytes
                round_.state = RoundState.AGGREGATING
            else:
                continue
            task.open_rounds[row.round_number] = round_
            self._merged.add(key)
            self.driver.wake()

    def _summarized(
        self,
        task: TaskRuntime,
        row: SharedRound,
        assignments: list[SharedAssignment],
        counted: set[str],
        adopt: bool = True,
    ) -> RoundInProgress:
        """The whole round as one process would have held it: every replica's assignments,
        uploads counted only if a handed-over partial holds them."""
        round_ = RoundInProgress(
            task.task_id,
            row.round_number,
            self._round_aggregator(task, row, adopt),
            row.started_at,
            base_weights_sha256=row.base_weights_sha256,
            base_version=row.base_version,
        )
        mirror_state(round_, row)
        for a in assignments:
            round_.assign(a.device_id, a.token_sha256, a.declared_examples)
            if a.token_sha256 in counted:
                round_.set_state(a.token_sha256, AssignmentState.REPORTED)
            elif a.state == AssignmentState.REPORTED.value:
                round_.set_state(a.token_sha256, AssignmentState.FAILED, REPLICA_LOST)
            elif a.state == AssignmentState.FAILED.value:
                round_.set_state(a.token_sha256, AssignmentState.FAILED, a.failure)
        return round_
