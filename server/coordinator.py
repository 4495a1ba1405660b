"""The coordinator's logic, independent of gRPC: tasks, check-ins, downloads, uploads.

Requests record, a driver drives: the handlers here assign devices, accumulate updates and
move rounds between their in-memory states; `server.round_driver.RoundDriver` ends rounds
(commit, held-out evaluation, failure records) off the request path. A request never pays for
a commit, and one task's failure never reaches another task's devices.

Single-threaded by contract: the gRPC service calls it from one asyncio event loop, and the
round driver runs on the same loop. Time comes from an injected clock, jitter from an
injected generator, so tests drive rounds deterministically (`tick()` runs one driver pass).

Each concept has its module; this class holds the state they share and the steps a replica
overrides (server/replica_coordinator.py): task_registration and task_loading (a task in, and
back after a restart), check_ins, check_in_pacing and assignments (a device's check-in),
reports (uploads and failure reports), round_progress (an open round's states in memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from device_runtime.clock import Clock
from device_runtime.logs import about
from protos import common_pb2, device_pb2
from server.aggregation import Buffer
from server.assignments import dropout_seed, token_digest
from server.check_in_pacing import CheckInPacing, rejection
from server.check_ins import CheckInDesk
from server.config import TaskConfig
from server.coordinator_settings import CoordinatorSettings
from server.device_identity import DeviceIdentities
from server.errors import AlreadyExists, FailedPrecondition, NotFound, StoreUnavailable
from server.evaluation import HeldOutEvaluator
from server.leases import Lease
from server.protocol_version import check_protocol_version
from server.reports import (
    Opened,
    add_upload,
    check_failure_report,
    check_upload,
    open_assignment,
    record_failure,
)
from server.retention import Retention
from server.round_driver import RoundDriver
from server.round_progress import advance_round, open_round
from server.rounds import closed
from server.rounds.round import RoundInProgress
from server.secagg.round_bridge import SecureRounds
from server.store import AssignmentRecord, RoundRecord, RoundState, Store, TaskRecord, TaskState
from server.task_loading import abandon_lost_rounds, load_task
from server.task_registration import new_task_record
from server.task_runtime import TaskRuntime

# Importable from here as before: callers and replicas name them through this module.
__all__ = [
    "Coordinator",
    "CoordinatorSettings",
    "RoundObserver",
    "TaskRuntime",
    "check_protocol_version",
    "dropout_seed",
    "token_digest",
]

log = logging.getLogger(__name__)

RoundObserver = Callable[[TaskRuntime, RoundRecord], None]


class Coordinator:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        settings: CoordinatorSettings | None = None,
        evaluator: HeldOutEvaluator | None = None,
        rng: np.random.Generator | None = None,
        identities: DeviceIdentities | None = None,
    ) -> None:
        self.store = store
        # Enrollment and the signature checks of every device message; without a policy no
        # population takes enrollments.
        self.identities = identities or DeviceIdentities(store, clock)
        self._clock = clock
        self.settings = settings or CoordinatorSettings()
        self.evaluator = evaluator
        self._jitter = rng or np.random.default_rng()
        self._pacing = CheckInPacing(self.settings.pace, self._jitter)
        self._tasks: dict[str, TaskRuntime] = {}
        # Tokens issued by this process: hash -> (task, round). Tokens are never stored in the
        # clear; a leaked database cannot be used to upload.
        self._issued: dict[str, tuple[str, int]] = {}
        self.observers: list[RoundObserver] = []
        self.driver = RoundDriver(self, retention=Retention(self.settings.retention))
        # Rounds of secure_aggregator() tasks run a SecAgg session (its gRPC service too);
        # a message may complete a stage, so it wakes the driver.
        self.secure_rounds = SecureRounds(on_change=self._secure_change)
        self._check_ins = CheckInDesk(
            self._tasks,
            store,
            self.identities,
            self.settings,
            self._pacing,
            self._jitter,
            clock,
            self.secure_rounds,
            self._issued,
            # The coordinator's steps, as bound methods: a replica's overrides apply.
            up_to_date=self._up_to_date,
            selecting_round=self._selecting_round,
            assign=self._assign,
            record_assignment=self._record_assignment,
            advance=self.advance,
        )
        for record in store.tasks():
            self._load_task(record)

    # ----- tasks ---------------------------------------------------------------------------

    def _load_task(self, record: TaskRecord) -> TaskRuntime:
        self._abandon_lost_rounds(record.config.task_id)
        runtime = load_task(self.store, record, self.resource)
        self._tasks[record.config.task_id] = runtime
        return runtime

    def _abandon_lost_rounds(self, task_id: str, fence: Lease | None = None) -> None:
        """Records the rounds that were open when a previous process died: their updates are
        gone. (A replica does this only when it takes the task's lease, server/replica_*.)"""
        abandon_lost_rounds(self.store, self._clock.now(), task_id, fence)

    def register_task(
        self, config: TaskConfig, model_bytes: bytes, initial_weights: bytes | None = None
    ) -> TaskRecord:
        """Validates and stores a task. Raises InvalidArgument or AlreadyExists."""
        record = new_task_record(
            config, model_bytes, initial_weights, self._tasks, self.store, self._clock
        )
        self.store.add_task(record)
        self._load_task(record)
        if config.is_evaluation:
            log.info(
                "registered evaluation task %s of %s",
                config.task_id,
                config.evaluates,
                extra=about(config.task_id),
            )
        else:
            log.info(
                "registered task %s for population %s",
                config.task_id,
                config.population,
                extra=about(config.task_id),
            )
        return record

    def task(self, task_id: str) -> TaskRuntime:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise NotFound(f"unknown task {task_id!r}") from None

    def tasks(self) -> list[TaskRuntime]:
        return list(self._tasks.values())

    def task_ids(self) -> list[str]:
        return list(self._tasks)

    def rounds(self, task_id: str) -> list[RoundRecord]:
        self.task(task_id)
        return self.store.rounds(task_id)

    def control_task(self, task_id: str, target: TaskState) -> TaskRuntime:
        """An operator pauses, resumes or cancels a task. Asking for the state a task is in
        changes nothing. A paused task takes no devices; its open rounds go on to their
        deadlines (reports from devices already training still count). Cancelling abandons
        the open rounds at once and is final.

        Raises NotFound (unknown task), FailedPrecondition (cancelled or completed task).
        """
        task = self.task(task_id)
        if task.state is target:
            return task
        if task.state is TaskState.CANCELLED or task.completed:
            raise FailedPrecondition(
                f"task {task_id!r} is {task.status}; its state can no longer change"
            )
        self.store.set_task_state(task_id, target)
        task.state = target
        if target is TaskState.CANCELLED:
            for round_ in list(task.open_rounds.values()):
                self.abandon(task, round_)
        log.warning("task %s: %s by an operator", task_id, target.value, extra=about(task_id))
        return task

    # ----- check-in ------------------------------------------------------------------------

    def check_in(
        self, request: device_pb2.CheckInRequest, peer: str = ""
    ) -> device_pb2.CheckInResponse:
        """`peer` is the gRPC peer address (for the network limits); "" for in-process callers."""
        return self._check_ins.check_in(request, peer)

    def _up_to_date(self, task: TaskRuntime) -> bool:
        """Applies the task's deadlines before a check-in looks at its rounds (in memory only;
        the driver ends rounds). A task whose round logic raises is failed here, and the
        check-in goes on with the population's other tasks."""
        try:
            for round_ in list(task.open_rounds.values()):
                self.advance(task, round_)
            _ = task.config.selection_quota  # a config that cannot select fails its task
        except Exception as exc:
            log.exception(
                "task %s failed: its round logic raised", task.task_id, extra=about(task.task_id)
            )
            self.fail_task(task, f"{type(exc).__name__}: {exc}")
            return False
        return True

    # _steer and _reject: a replica answers with these too (server/replica_coordinator.py).

    def _steer(
        self, task: TaskRuntime, active: int, now: float, not_before_s: float = 0.0
    ) -> common_pb2.RetryWindow:
        return self._pacing.window(task, active, now, not_before_s)

    def _reject(
        self,
        reason: device_pb2.Rejection.Reason,
        message: str,
        window: common_pb2.RetryWindow,
    ) -> device_pb2.CheckInResponse:
        return rejection(reason, message, window)

    def _selecting_round(self, task: TaskRuntime) -> RoundInProgress | None:
        if task.selecting is None and task.can_open_round():
            # An evaluation task evaluates whatever its training task committed most recently.
            trained = self._tasks[task.config.evaluates] if task.config.is_evaluation else task
            open_round(task, trained.weights_sha256, self._clock.now())
        return task.selecting

    def _assign(
        self,
        task: TaskRuntime,
        round_: RoundInProgress,
        request: device_pb2.CheckInRequest,
        device_id: str,
        network: str | None,
        active: int,
    ) -> device_pb2.CheckInResponse:
        return self._check_ins.assign(task, round_, request, device_id, network, active)

    def _record_assignment(
        self,
        record: AssignmentRecord,
        declared_examples: int,
        network: str | None,
        check_in_nonce: bytes,
    ) -> None:
        """Makes an assignment durable before the device hears of it. (Replicas also count
        it against the round's global quota and network share, and refuse a check-in
        another replica already assigned: server/replica_coordinator.py. One process needs
        no such check: its own nonce memory refused the replay before selection.)"""
        self.store.add_assignment(record)

    # ----- download ------------------------------------------------------------------------

    def resource(self, sha256: str) -> bytes:
        data = self.store.get_resource(sha256) if sha256 else None
        if data is None:
            raise NotFound(f"no resource {sha256!r}")
        return data

    def count_broadcast(self, sha256: str, wire_bytes: int) -> None:
        """Attributes bytes that crossed the wire in a download to the round that uses them."""
        for task in self._tasks.values():
            users = [
                r
                for r in task.open_rounds.values()
                if sha256 in (task.record.model_sha256, r.base_weights_sha256)
            ]
            if users:
                max(users, key=lambda r: r.round_number).broadcast_bytes += wire_bytes

    # ----- upload --------------------------------------------------------------------------

    def _open_assignment(self, token: bytes) -> Opened:
        """The task, open round and token hash an upload or failure report is for (raises as
        server.reports.open_assignment)."""
        return open_assignment(token, self._issued, self._tasks, self.store)

    def _reportable(self, header: device_pb2.UploadHeader, checked_again: bool = False) -> Opened:
        """The open assignment a header reports for, if it may still report."""
        check_protocol_version(header.protocol_version)
        opened = self._open_assignment(header.upload_token)
        check_upload(header, opened, self.identities, self._clock.now(), checked_again)
        return opened

    def check_upload_header(self, header: device_pb2.UploadHeader) -> int:
        """Validates a header before the payload is read (accept_upload checks it again);
        returns the payload size in bytes."""
        _, round_, _ = self._reportable(header, checked_again=True)
        return round_.aggregate.expected_payload_bytes(header)

    def accept_upload(
        self,
        header: device_pb2.UploadHeader,
        payload: Buffer | Sequence[Buffer],
        wire_bytes: int,
    ) -> device_pb2.UploadResponse:
        """Adds one update (the payload, or the chunks it arrived in) to its round. Any
        refusal leaves the round exactly as it was."""
        task, round_, digest = self._reportable(header)
        add_upload((task, round_, digest), header, payload, wire_bytes)
        self.advance(task, round_)
        now = self._clock.now()
        window = self._steer(task, self._active_devices(task, now), now)
        return device_pb2.UploadResponse(retry_window=window)

    def report_failure(self, report: device_pb2.FailureReport) -> device_pb2.FailureAck:
        check_failure_report(report)
        task, round_, digest = self._open_assignment(report.upload_token)
        record_failure(report, (task, round_, digest), self.identities)
        self.secure_rounds.device_failed(round_, digest)
        self.advance(task, round_)
        now = self._clock.now()
        window = self._steer(task, self._active_devices(task, now), now)
        return device_pb2.FailureAck(retry_window=window)

    def tracked_devices(self) -> dict[str, int]:
        """Entries this process holds in memory per device, by map. Each is bounded by an
        expiry or a capacity; the retention test and benchmark watch them."""
        return {
            **self._pacing.tracked_devices(),
            "issued_tokens": len(self._issued),
            **self.identities.tracked_devices(),
        }

    def _active_devices(self, task: TaskRuntime, now: float) -> int:
        return self._pacing.active_devices(task.config.population, now)

    # ----- the round state machine ---------------------------------------------------------

    def now(self) -> float:
        return self._clock.now()

    def tick(self) -> None:
        """One round-driver pass, inline: applies deadlines and ends the rounds that are done
        (commit or failure record). The server runs the driver's loop instead."""
        self.driver.drive()

    def _secure_change(self) -> None:
        self.driver.wake()

    def advance(self, task: TaskRuntime, round_: RoundInProgress) -> None:
        """Moves an open round through as many states as its situation allows, up to
        AGGREGATING or FAILED, where the driver takes over. In memory only, O(1)."""
        if advance_round(task, round_, self._clock.now(), self.secure_rounds):
            self.driver.wake()

    def forget(self, task: TaskRuntime, round_: RoundInProgress) -> None:
        """Drops a round that ended (its outcome is durable) from memory."""
        self.secure_rounds.round_closed(round_)
        task.open_rounds.pop(round_.round_number, None)
        task.last_round = round_
        task.remember_outcome(round_.round_number, round_.state)
        for digest in round_.assignments:
            self._issued.pop(digest, None)

    def fail_task(self, task: TaskRuntime, reason: str) -> None:
        """Stops a task whose round logic raised: it takes no more devices, and its open
        rounds are abandoned (recorded when the store allows). Other tasks are untouched."""
        task.fault = reason
        for round_ in list(task.open_rounds.values()):
            try:
                self.abandon(task, round_)
            except (StoreUnavailable, AlreadyExists) as exc:
                number = round_.round_number
                log.error(
                    "task %s: round %d not recorded: %s",
                    task.task_id,
                    number,
                    exc,
                    extra=about(task.task_id, number),
                )
                round_.state = RoundState.ABANDONED
                self.forget(task, round_)

    def abandon(self, task: TaskRuntime, round_: RoundInProgress) -> RoundRecord:
        """Records an open round abandoned (an operator's cancel, a failed task, a drain),
        then drops it from memory. Raises StoreUnavailable or AlreadyExists, changing nothing,
        when the record cannot be written."""
        record = closed.summarize(round_, RoundState.ABANDONED, self._clock.now())
        self.store.record_closed_round(record)
        round_.state = RoundState.ABANDONED
        self.forget(task, round_)
        self.notify(task, record)
        return record

    def fence(self, task_id: str) -> Lease | None:
        """The lease a commit of this task carries (replicas); None: one coordinator, no fence."""
        return None

    def step_down(self, task: TaskRuntime) -> None:
        """Another coordinator leads the task now (a commit was refused as StaleLeader): its
        rounds open here are dropped from memory, unrecorded; the new leader records them."""
        for round_ in list(task.open_rounds.values()):
            round_.state = RoundState.ABANDONED
            self.forget(task, round_)

    def notify(self, task: TaskRuntime, record: RoundRecord) -> None:
        for observer in self.observers:
            try:
                observer(task, record)
            except Exception:  # an observer (e.g. TensorBoard) must not break a commit
                log.exception("round observer failed")
