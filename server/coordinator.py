"""The coordinator's logic, independent of gRPC: tasks, rounds, uploads, commits.

Single-threaded by contract: the gRPC service calls it from one asyncio event loop, and the
deadline ticker runs on the same loop. Time comes from an injected clock, jitter from an
injected generator, so tests drive rounds deterministically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets

import numpy as np

from device_runtime import constants as protocol
from device_runtime.clock import Clock
from device_runtime.manifest import ManifestError
from device_runtime.model_file import read_manifest
from protos import common_pb2, device_pb2
from server.aggregators.process import AggregationProcess
from server.config import TaskConfig
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from server.evaluation import HeldOutEvaluator
from server.round import AssignmentState, RoundInProgress
from server.store import RoundRecord, RoundState, Store, TaskRecord

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CoordinatorSettings:
    # Retry windows (seconds) handed to devices. Pace steering proper comes later; these are
    # fixed windows with uniform jitter picked by the device.
    rejected_retry_s: tuple[float, float] = (30.0, 90.0)
    accepted_retry_s: tuple[float, float] = (60.0, 180.0)
    no_task_retry_s: tuple[float, float] = (600.0, 1200.0)


@dataclasses.dataclass
class TaskRuntime:
    record: TaskRecord
    weights: np.ndarray
    weights_sha256: str
    committed_rounds: int
    next_round_number: int
    aggregation: AggregationProcess  # the aggregator across rounds, and its state
    broadcasted_bits: float = 0.0
    aggregated_bits: float = 0.0
    current: RoundInProgress | None = None

    @property
    def config(self) -> TaskConfig:
        return self.record.config

    @property
    def completed(self) -> bool:
        return self.committed_rounds >= self.config.total_rounds


def _window(bounds: tuple[float, float]) -> common_pb2.RetryWindow:
    return common_pb2.RetryWindow(min_delay_s=bounds[0], max_delay_s=bounds[1])


def token_digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


class Coordinator:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        settings: CoordinatorSettings | None = None,
        evaluator: HeldOutEvaluator | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self.settings = settings or CoordinatorSettings()
        self._evaluator = evaluator
        self._tasks: dict[str, TaskRuntime] = {}
        # Every token issued by this process: hash -> (task, round). Tokens are never stored in
        # the clear; a leaked database cannot be used to upload.
        self._issued: dict[str, tuple[str, int]] = {}
        for record in store.tasks():
            self._load_task(record)

    # ----- tasks ---------------------------------------------------------------------------

    def _load_task(self, record: TaskRecord) -> TaskRuntime:
        rounds = self._store.rounds(record.config.task_id)
        committed = [r for r in rounds if r.state is RoundState.COMMITTED]
        weights_sha = committed[-1].weights_sha256 if committed else record.initial_weights_sha256
        weights_bytes = self._store.get_resource(weights_sha)
        if weights_bytes is None:
            raise RuntimeError(f"store lacks weights {weights_sha} of task {record.config.task_id}")
        last_metrics = committed[-1].metrics if committed else {}
        runtime = TaskRuntime(
            record=record,
            weights=np.frombuffer(weights_bytes, "<f4").astype(np.float32),
            weights_sha256=weights_sha,
            committed_rounds=len(committed),
            next_round_number=(rounds[-1].round_number + 1) if rounds else 1,
            aggregation=AggregationProcess.for_task(
                record.config.aggregator, self.resource(record.model_sha256), last_metrics
            ),
            broadcasted_bits=last_metrics.get("broadcasted_bits", 0.0),
            aggregated_bits=last_metrics.get("aggregated_bits", 0.0),
        )
        self._tasks[record.config.task_id] = runtime
        return runtime

    def register_task(
        self, config: TaskConfig, model_bytes: bytes, initial_weights: bytes | None = None
    ) -> TaskRecord:
        """Validates and stores a task. Raises InvalidArgument or AlreadyExists."""
        config.validate()
        if config.task_id in self._tasks:
            raise AlreadyExists(f"task {config.task_id!r} already exists")
        try:
            manifest = read_manifest(model_bytes)
        except ManifestError as exc:
            raise InvalidArgument(f"model rejected: {exc}") from exc
        if manifest.batch_size != config.batch_size:
            raise InvalidArgument(
                f"task config field 'batch_size' is {config.batch_size} but the model was exported "
                f"with batch size {manifest.batch_size}"
            )
        if initial_weights is None or len(initial_weights) == 0:
            from device_runtime.model_runner import TrainableModel

            initial_weights = TrainableModel(model_bytes).get_weights().astype("<f4").tobytes()
        weights = np.frombuffer(initial_weights, "<f4") if len(initial_weights) % 4 == 0 else None
        if weights is None or weights.size != manifest.num_parameters:
            raise InvalidArgument(
                f"initial weights must be {manifest.num_parameters} float32 values "
                f"({4 * manifest.num_parameters} bytes), got {len(initial_weights)} bytes"
            )
        if not np.all(np.isfinite(weights)):
            raise InvalidArgument("initial weights contain NaN or infinity")
        record = TaskRecord(
            config=config,
            model_sha256=self._store.put_resource("model", model_bytes),
            initial_weights_sha256=self._store.put_resource("weights", initial_weights),
            num_parameters=manifest.num_parameters,
            created_at=self._clock.now(),
        )
        self._store.add_task(record)
        self._load_task(record)
        log.info("registered task %s for population %s", config.task_id, config.population)
        return record

    def task(self, task_id: str) -> TaskRuntime:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise NotFound(f"unknown task {task_id!r}") from None

    def task_ids(self) -> list[str]:
        return list(self._tasks)

    def rounds(self, task_id: str) -> list[RoundRecord]:
        self.task(task_id)
        return self._store.rounds(task_id)

    # ----- check-in ------------------------------------------------------------------------

    def check_in(self, request: device_pb2.CheckInRequest) -> device_pb2.CheckInResponse:
        check_protocol_version(request.protocol_version)
        if not request.device_id:
            raise InvalidArgument("check-in needs a device_id")
        if request.example_count < 0:
            raise InvalidArgument(f"example_count must be >= 0, got {request.example_count}")
        tasks = [t for t in self._tasks.values() if t.config.population == request.population]
        if not tasks:
            raise NotFound(f"unknown population {request.population!r}")
        self.tick()
        running = [t for t in tasks if not t.completed]
        if not running:
            return self._reject(
                device_pb2.Rejection.NO_TASK, "no running task", self.settings.no_task_retry_s
            )
        if request.example_count == 0:
            return self._reject(
                device_pb2.Rejection.NOT_ELIGIBLE,
                "device has no examples",
                self.settings.no_task_retry_s,
            )
        for task in running:
            current = self._ensure_round(task)
            if current.state is not RoundState.SELECTING or request.device_id in current.devices:
                continue
            return self._assign(task, current, request.device_id)
        return self._reject(
            device_pb2.Rejection.ROUND_FULL, "round is full", self.settings.rejected_retry_s
        )

    def _reject(
        self,
        reason: device_pb2.Rejection.Reason,
        message: str,
        window: tuple[float, float],
    ) -> device_pb2.CheckInResponse:
        return device_pb2.CheckInResponse(
            rejection=device_pb2.Rejection(reason=reason, message=message),
            retry_window=_window(window),
        )

    def _ensure_round(self, task: TaskRuntime) -> RoundInProgress:
        if task.current is None or not task.current.open:
            task.current = RoundInProgress(
                task.config.task_id,
                task.next_round_number,
                task.aggregation.start_round(),
                self._clock.now(),
            )
            task.next_round_number += 1
            log.info("task %s: round %d selecting", task.config.task_id, task.current.round_number)
        return task.current

    def _assign(
        self, task: TaskRuntime, current: RoundInProgress, device_id: str
    ) -> device_pb2.CheckInResponse:
        token = secrets.token_bytes(32)
        digest = token_digest(token)
        current.assign(device_id, digest)
        self._issued[digest] = (task.config.task_id, current.round_number)
        now = self._clock.now()
        if current.selected >= task.config.selection_quota:
            current.close_selection(now, task.config.reporting_deadline_s)
        deadline = (
            current.reporting_deadline
            if current.state is RoundState.REPORTING
            else current.started_at
            + task.config.selection_deadline_s
            + task.config.reporting_deadline_s
        )
        assignment = device_pb2.Assignment(
            task_id=task.config.task_id,
            round_number=current.round_number,
            upload_token=token,
            model=common_pb2.ResourceRef(sha256=task.record.model_sha256, kind="model"),
            weights=common_pb2.ResourceRef(
                sha256=task.weights_sha256, size_bytes=4 * task.weights.size, kind="weights"
            ),
            plan=task.config.plan(),
            report_deadline_s=max(0.0, deadline - now),
            aggregation=current.aggregate.client_spec(),
        )
        return device_pb2.CheckInResponse(
            assignment=assignment, retry_window=_window(self.settings.accepted_retry_s)
        )

    # ----- download ------------------------------------------------------------------------

    def resource(self, sha256: str) -> bytes:
        data = self._store.get_resource(sha256) if sha256 else None
        if data is None:
            raise NotFound(f"no resource {sha256!r}")
        return data

    def count_broadcast(self, sha256: str, wire_bytes: int) -> None:
        """Attributes bytes that crossed the wire in a download to the rounds that use them."""
        for task in self._tasks.values():
            if task.current is not None and sha256 in (
                task.record.model_sha256,
                task.weights_sha256,
            ):
                task.current.broadcast_bytes += wire_bytes

    # ----- upload --------------------------------------------------------------------------

    def _open_assignment(self, token: bytes) -> tuple[TaskRuntime, RoundInProgress, str]:
        """The task, open round and token hash an upload or failure report is for.

        Raises Unauthenticated (unknown token), AlreadyExists (already counted),
        FailedPrecondition (round no longer open).
        """
        if not token:
            raise Unauthenticated("missing upload token")
        digest = token_digest(token)
        issued = self._issued.get(digest)
        if issued is None:
            if self._store.is_counted(digest):
                raise AlreadyExists("an update for this upload token was already counted")
            raise Unauthenticated("unknown upload token (never issued, or issued before a restart)")
        task = self._tasks[issued[0]]
        current = task.current
        if current is None or current.round_number != issued[1] or not current.open:
            if self._store.is_counted(digest):
                raise AlreadyExists("an update for this upload token was already counted")
            raise FailedPrecondition(
                f"round {issued[1]} of task {issued[0]!r} no longer takes reports"
            )
        return task, current, digest

    def check_upload_header(self, header: device_pb2.UploadHeader) -> int:
        """Validates a header before the payload is read; returns the payload size in bytes."""
        check_protocol_version(header.protocol_version)
        task, current, digest = self._open_assignment(header.upload_token)
        assignment = current.assignments[digest]
        if assignment.state is AssignmentState.REPORTED:
            raise AlreadyExists("an update for this upload token was already accepted")
        if assignment.state is AssignmentState.FAILED:
            raise FailedPrecondition("this assignment was reported as failed")
        return current.aggregate.expected_payload_bytes(header)

    def accept_upload(
        self, header: device_pb2.UploadHeader, payload: bytes, wire_bytes: int
    ) -> device_pb2.UploadResponse:
        """Adds one update to its round. Any refusal leaves the round exactly as it was."""
        self.check_upload_header(header)
        metrics = header.metrics
        if not (np.isfinite(metrics.loss) and np.isfinite(metrics.accuracy)):
            raise InvalidArgument("client metrics contain NaN or infinite values")
        task, current, digest = self._open_assignment(header.upload_token)
        current.aggregate.accumulate(header, payload)
        current.client_metrics.accumulate(metrics)
        current.upload_bytes += wire_bytes
        current.assignments[digest].state = AssignmentState.REPORTED
        log.debug(
            "task %s round %d: %d/%d reports",
            task.config.task_id,
            current.round_number,
            current.reported,
            task.config.target_reports,
        )
        self._maybe_finish(task)
        return device_pb2.UploadResponse(retry_window=_window(self.settings.accepted_retry_s))

    def report_failure(self, report: device_pb2.FailureReport) -> device_pb2.FailureAck:
        check_protocol_version(report.protocol_version)
        task, current, digest = self._open_assignment(report.upload_token)
        assignment = current.assignments[digest]
        if assignment.state is not AssignmentState.ASSIGNED:
            raise FailedPrecondition(f"assignment already {assignment.state.value}")
        assignment.state = AssignmentState.FAILED
        assignment.failure = device_pb2.FailureReport.Cause.Name(report.cause)
        self._maybe_finish(task)
        return device_pb2.FailureAck(retry_window=_window(self.settings.rejected_retry_s))

    # ----- deadlines and commit ------------------------------------------------------------

    def tick(self) -> None:
        """Applies deadlines. Called by the service's ticker and before each check-in."""
        now = self._clock.now()
        for task in self._tasks.values():
            current = task.current
            if current is None or not current.open:
                continue
            if (
                current.state is RoundState.SELECTING
                and now >= current.started_at + task.config.selection_deadline_s
                and current.selected >= task.config.effective_min_reports
            ):
                current.close_selection(now, task.config.reporting_deadline_s)
            if current.state is RoundState.REPORTING and now >= current.reporting_deadline:
                self._finish(task, current)
            else:
                self._maybe_finish(task)

    def _maybe_finish(self, task: TaskRuntime) -> None:
        current = task.current
        if current is None or not current.open:
            return
        if current.reported >= task.config.target_reports:
            self._finish(task, current)
        elif current.state is RoundState.REPORTING and current.outstanding == 0:
            # Nobody left to wait for: commit with what we have, or fail now.
            self._finish(task, current)

    def _finish(self, task: TaskRuntime, current: RoundInProgress) -> None:
        now = self._clock.now()
        if current.reported < task.config.effective_min_reports:
            current.state = RoundState.FAILED
            record = self._round_record(task, current, now, {}, "")
            self._store.record_failed_round(record)
            log.warning(
                "task %s round %d failed: %d reports, %d needed",
                task.config.task_id,
                current.round_number,
                current.reported,
                task.config.effective_min_reports,
            )
            return
        update, aggregator_metrics = current.aggregate.finalize()
        new_weights = (task.weights + task.config.server_learning_rate * update).astype(np.float32)
        weights_bytes = new_weights.astype("<f4").tobytes()
        broadcasted = task.broadcasted_bits + 8.0 * current.broadcast_bytes
        aggregated = task.aggregated_bits + 8.0 * current.upload_bytes
        metrics = current.client_metrics.finalize()
        metrics.update(
            {
                **aggregator_metrics,
                "broadcasted_bits": broadcasted,
                "aggregated_bits": aggregated,
            }
        )
        if self._evaluator is not None:
            model_bytes = self.resource(task.record.model_sha256)
            metrics.update(
                self._evaluator.evaluate(task.record.model_sha256, model_bytes, new_weights)
            )
        current.state = RoundState.COMMITTED
        record = self._round_record(
            task, current, now, metrics, hashlib.sha256(weights_bytes).hexdigest()
        )
        self._store.commit_round(record, weights_bytes, current.counted_tokens())
        task.weights = new_weights
        task.weights_sha256 = record.weights_sha256
        task.committed_rounds += 1
        task.broadcasted_bits, task.aggregated_bits = broadcasted, aggregated
        log.info(
            "task %s round %d committed: %d reports, eval accuracy %s",
            task.config.task_id,
            current.round_number,
            current.reported,
            metrics.get("eval/accuracy", "n/a"),
        )

    def _round_record(
        self,
        task: TaskRuntime,
        current: RoundInProgress,
        now: float,
        metrics: dict[str, float],
        sha: str,
    ) -> RoundRecord:
        return RoundRecord(
            task_id=task.config.task_id,
            round_number=current.round_number,
            state=current.state,
            selected=current.selected,
            reported=current.reported,
            dropped=current.dropped,
            metrics=metrics,
            started_at=current.started_at,
            finished_at=now,
            weights_sha256=sha,
        )


def check_protocol_version(version: int) -> None:
    if version != protocol.PROTOCOL_VERSION:
        raise FailedPrecondition(
            f"protocol version {version} is not supported; this coordinator speaks "
            f"{protocol.PROTOCOL_VERSION}"
        )
