"""The coordinator's logic, independent of gRPC: tasks, check-ins, downloads, uploads.

Requests record, a driver drives: the handlers here assign devices, accumulate updates and
move rounds between their in-memory states; `server.round_driver.RoundDriver` ends rounds
(commit, held-out evaluation, failure records) off the request path. A request never pays for
a commit, and one task's failure never reaches another task's devices.

Single-threaded by contract: the gRPC service calls it from one asyncio event loop, and the
round driver runs on the same loop. Time comes from an injected clock, jitter from an
injected generator, so tests drive rounds deterministically (`tick()` runs one driver pass).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import assert_never

import numpy as np

from device_runtime import constants as protocol
from device_runtime import identity
from device_runtime.clock import Clock
from device_runtime.logs import about
from device_runtime.manifest import ManifestError
from device_runtime.model_file import read_manifest
from device_runtime.secagg.parameters import fewest_clients
from protos import common_pb2, device_pb2
from server import eligibility
from server.aggregation import (
    Buffer,
    EvaluationReports,
    UpdateAggregator,
    accumulate_received,
)
from server.aggregators.presets import parse_aggregator
from server.aggregators.process import AggregationProcess
from server.config import TaskConfig
from server.device_identity import DeviceIdentities
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreUnavailable,
    Unauthenticated,
)
from server.evaluation import HeldOutEvaluator
from server.example_credit import credited_header
from server.flood_limits import RetryWindowMemory, network_slot_cap
from server.leases import Lease
from server.optimizers import deserialize_state
from server.pace_steering import PaceSteering, PaceSteeringSettings, PopulationActivity
from server.retention import Retention, RetentionSettings
from server.round_driver import RoundDriver
from server.rounds import closed, reporting, selecting
from server.rounds.round import AssignmentState, RoundInProgress
from server.secagg.round_bridge import SecureRounds
from server.store import (
    AssignmentRecord,
    RoundRecord,
    RoundState,
    Store,
    TaskRecord,
    TaskState,
)
from server.task_runtime import TaskRuntime, recent_outcomes_kept

log = logging.getLogger(__name__)

RoundObserver = Callable[[TaskRuntime, RoundRecord], None]


@dataclasses.dataclass(frozen=True)
class CoordinatorSettings:
    pace: PaceSteeringSettings = PaceSteeringSettings()
    # Devices of a population whose tasks are all done come back rarely.
    no_task_retry_s: tuple[float, float] = (600.0, 1200.0)
    # ... and sooner when a task is only paused: an operator may resume it any minute.
    paused_task_retry_s: tuple[float, float] = (60.0, 300.0)
    # A device back before its retry window opens is turned away (TOO_EARLY), not selected.
    enforce_retry_windows: bool = True
    # A device turned away because the store failed retries in this window.
    store_unavailable_retry_s: tuple[float, float] = (30.0, 60.0)
    retention: RetentionSettings = RetentionSettings()


def _window(bounds: tuple[float, float]) -> common_pb2.RetryWindow:
    return common_pb2.RetryWindow(min_delay_s=bounds[0], max_delay_s=bounds[1])


def token_digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


def dropout_seed(token: bytes) -> int:
    """The seed of an assignment's dropout masks: as unique as its random upload token, so
    devices and rounds never share masks (never 0, which means "unset" on the wire)."""
    seed = int.from_bytes(hashlib.sha256(b"overnight/dropout-seed/" + token).digest()[:8], "little")
    return seed or 1


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
        self._retry_windows = RetryWindowMemory()
        self._clock = clock
        self.settings = settings or CoordinatorSettings()
        self.evaluator = evaluator
        self._jitter = rng or np.random.default_rng()
        self._pace = PaceSteering(self.settings.pace, self._jitter)
        self._activity: dict[str, PopulationActivity] = {}
        self._tasks: dict[str, TaskRuntime] = {}
        # Tokens issued by this process: hash -> (task, round). Tokens are never stored in the
        # clear; a leaked database cannot be used to upload.
        self._issued: dict[str, tuple[str, int]] = {}
        self.observers: list[RoundObserver] = []
        self.driver = RoundDriver(self, retention=Retention(self.settings.retention))
        # Rounds of secure_aggregator() tasks run a SecAgg session (its gRPC service too);
        # a message may complete a stage, so it wakes the driver.
        self.secure_rounds = SecureRounds(on_change=self._secure_change)
        for record in store.tasks():
            self._load_task(record)

    # ----- tasks ---------------------------------------------------------------------------

    def _load_task(self, record: TaskRecord) -> TaskRuntime:
        task_id = record.config.task_id
        self._abandon_lost_rounds(task_id)
        rounds = self.store.rounds(task_id)
        committed = [r for r in rounds if r.state is RoundState.COMMITTED]
        weights_sha = committed[-1].weights_sha256 if committed else record.initial_weights_sha256
        weights_bytes = self.store.get_resource(weights_sha)
        if weights_bytes is None:
            raise RuntimeError(f"store lacks weights {weights_sha} of task {task_id}")
        optimizer = record.config.optimizer()
        state_bytes = self.store.server_state(task_id) if committed else b""
        last_metrics = committed[-1].metrics if committed else {}
        runtime = TaskRuntime(
            record=record,
            weights=np.frombuffer(weights_bytes, "<f4").astype(np.float32),
            weights_sha256=weights_sha,
            optimizer=optimizer,
            optimizer_state=(
                deserialize_state(state_bytes)
                if state_bytes
                else optimizer.initialize(record.num_parameters)
            ),
            committed_rounds=len(committed),
            next_round_number=(rounds[-1].round_number + 1) if rounds else 1,
            aggregation=AggregationProcess.for_task(
                record.config.aggregator, self.resource(record.model_sha256), last_metrics
            ),
            broadcasted_bits=last_metrics.get("broadcasted_bits", 0.0),
            aggregated_bits=last_metrics.get("aggregated_bits", 0.0),
            state=record.state,
        )
        for closed_round in rounds[-recent_outcomes_kept:]:
            runtime.remember_outcome(closed_round.round_number, closed_round.state)
        self._tasks[task_id] = runtime
        return runtime

    def _abandon_lost_rounds(self, task_id: str, fence: Lease | None = None) -> None:
        """Records the rounds that were open when a previous process died: their updates are
        gone. (A replica does this only when it takes the task's lease, server/replica_*.)"""
        now = self._clock.now()
        for lost in self.store.unrecorded_rounds(task_id):
            self.store.record_closed_round(closed.abandoned(task_id, lost, now), fence)
            log.warning(
                "task %s: round %d abandoned by a coordinator restart (%d devices selected)",
                task_id,
                lost.round_number,
                lost.selected,
                extra=about(task_id, lost.round_number),
            )

    def register_task(
        self, config: TaskConfig, model_bytes: bytes, initial_weights: bytes | None = None
    ) -> TaskRecord:
        """Validates and stores a task. Raises InvalidArgument or AlreadyExists."""
        config.validate()
        if config.task_id in self._tasks:
            raise AlreadyExists(f"task {config.task_id!r} already exists")
        fewest = fewest_clients()
        if parse_aggregator(config.aggregator).secure and config.selection_quota < fewest:
            raise InvalidArgument(
                f"task config fields 'target_reports' x 'over_selection' select "
                f"{config.selection_quota} devices, but secure_aggregator() needs at least "
                f"{fewest}: raise target_reports or over_selection"
            )
        if config.is_evaluation:
            return self._register_evaluation(config)
        try:
            manifest = read_manifest(model_bytes)
        except ManifestError as exc:
            raise InvalidArgument(f"model rejected: {exc}") from exc
        if manifest.batch_size != config.batch_size:
            raise InvalidArgument(
                f"task config field 'batch_size' is {config.batch_size} but the model was "
                f"exported with batch size {manifest.batch_size}"
            )
        if config.fedprox_mu > 0 and not manifest.fedprox:
            raise InvalidArgument(
                f"task config field 'fedprox_mu' is {config.fedprox_mu} but the model was "
                "exported without FedProx; export it with `overnight export --fedprox`"
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
            model_sha256=self.store.put_resource("model", model_bytes),
            initial_weights_sha256=self.store.put_resource("weights", initial_weights),
            num_parameters=manifest.num_parameters,
            created_at=self._clock.now(),
        )
        self.store.add_task(record)
        self._load_task(record)
        log.info(
            "registered task %s for population %s",
            config.task_id,
            config.population,
            extra=about(config.task_id),
        )
        return record

    def _register_evaluation(self, config: TaskConfig) -> TaskRecord:
        target = self._tasks.get(config.evaluates)
        if target is None or target.config.is_evaluation:
            raise InvalidArgument(
                f"task config field 'evaluates': {config.evaluates!r} is not a training task"
            )
        if config.batch_size != target.config.batch_size:
            raise InvalidArgument(
                f"task config field 'batch_size' is {config.batch_size} but task "
                f"{target.task_id!r} uses {target.config.batch_size}"
            )
        record = TaskRecord(
            config=config,
            model_sha256=target.record.model_sha256,
            initial_weights_sha256=target.weights_sha256,
            num_parameters=target.record.num_parameters,
            created_at=self._clock.now(),
        )
        self.store.add_task(record)
        self._load_task(record)
        log.info(
            "registered evaluation task %s of %s",
            config.task_id,
            config.evaluates,
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
        started = time.perf_counter()  # pace steering's capacity is measured from this
        check_protocol_version(request.protocol_version)
        if request.example_count < 0:
            raise InvalidArgument(f"example_count must be >= 0, got {request.example_count}")
        device_id = self.identities.verify_check_in(request)
        tasks = [t for t in self._tasks.values() if t.config.population == request.population]
        if not tasks:
            raise NotFound(f"unknown population {request.population!r}")
        now = self._clock.now()
        # Windows are per population: a device may belong to several.
        remembered_as = f"{request.population}/{device_id}"
        wait = self._retry_windows.too_early(remembered_as, now)
        if wait > 0 and self.settings.enforce_retry_windows:
            # Not selected and not counted; its window stays as it was.
            window = common_pb2.RetryWindow(min_delay_s=wait, max_delay_s=2 * wait)
            return self._reject(device_pb2.Rejection.TOO_EARLY, "retry window not open", window)
        network = self.identities.networks.of(peer)
        response = self._answer_check_in(request, tasks, device_id, network, now)
        self._retry_windows.remember(remembered_as, now, response.retry_window.min_delay_s)
        self._pace.capacity.observe(time.perf_counter() - started)
        return response

    def _answer_check_in(
        self,
        request: device_pb2.CheckInRequest,
        tasks: list[TaskRuntime],
        device_id: str,
        network: str | None,
        now: float,
    ) -> device_pb2.CheckInResponse:
        activity = self._activity.setdefault(
            request.population, PopulationActivity(self.settings.pace.horizon_s)
        )
        activity.record(self.identities.networks.activity_key(device_id, network), now)
        running = [t for t in tasks if t.takes_devices and self._up_to_date(t)]
        if not running:
            paused = [t.task_id for t in tasks if t.state is TaskState.PAUSED and not t.completed]
            if paused:
                return self._reject(
                    device_pb2.Rejection.NO_TASK,
                    f"task {', '.join(paused)} paused",
                    _window(self.settings.paused_task_retry_s),
                )
            return self._reject(
                device_pb2.Rejection.NO_TASK,
                "no running task",
                _window(self.settings.no_task_retry_s),
            )
        # Serve the task whose selecting round is furthest from full first.
        running.sort(
            key=lambda t: t.selecting.selected / t.config.selection_quota if t.selecting else 0.0
        )
        ineligible: list[eligibility.Ineligible] = []
        store_failure: StoreUnavailable | None = None
        for task in running:
            try:
                verdict = eligibility.check(
                    task.config,
                    request.example_count,
                    request.runtime_version,
                    self.store.last_assignment_time(task.task_id, device_id),
                    now,
                )
                if verdict is not None:
                    ineligible.append(verdict)
                    continue
                round_ = self._selecting_round(task)
                network_cap = network_slot_cap(
                    task.config.max_network_share, task.config.selection_quota
                )
                if (
                    round_ is not None
                    and selecting.takes_devices(round_, task.config)
                    and device_id not in round_.devices
                    and round_.network_has_room(network, network_cap)
                ):
                    active = activity.active_devices(now)
                    return self._assign(task, round_, request, device_id, network, active)
            except StoreUnavailable as exc:
                store_failure = exc  # this task cannot assign now; another one may
                log.error(
                    "task %s: check-in could not be served: %s",
                    task.task_id,
                    exc,
                    extra=about(task.task_id),
                )
        if store_failure is not None:
            low, high = self.settings.store_unavailable_retry_s
            store_failure.retry_after_s = float(self._jitter.uniform(low, high))
            raise store_failure
        soonest = min(running, key=lambda t: t.next_selection_in_s(now))
        active = activity.active_devices(now)
        if len(ineligible) == len(running):
            wait = min(v.retry_after_s for v in ineligible) or self.settings.no_task_retry_s[0]
            window = self._steer(soonest, active, now, not_before_s=wait)
            reason = "; ".join(v.reason for v in ineligible)
            return self._reject(device_pb2.Rejection.NOT_ELIGIBLE, reason, window)
        window = self._steer(soonest, active, now)
        return self._reject(device_pb2.Rejection.ROUND_FULL, "round is full", window)

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

    def _steer(
        self, task: TaskRuntime, active: int, now: float, not_before_s: float = 0.0
    ) -> common_pb2.RetryWindow:
        population = task.config.population
        return self._pace.window(
            active_devices=active,
            next_selection_in_s=task.next_selection_in_s(now),
            not_before_s=not_before_s,
            other_populations=[
                a.active_devices(now) for p, a in self._activity.items() if p != population
            ],
        )

    def _reject(
        self,
        reason: device_pb2.Rejection.Reason,
        message: str,
        window: common_pb2.RetryWindow,
    ) -> device_pb2.CheckInResponse:
        return device_pb2.CheckInResponse(
            rejection=device_pb2.Rejection(reason=reason, message=message), retry_window=window
        )

    def _selecting_round(self, task: TaskRuntime) -> RoundInProgress | None:
        if task.selecting is None and task.can_open_round():
            if task.config.is_evaluation:
                # Evaluate whatever the training task has committed most recently.
                aggregate: UpdateAggregator = EvaluationReports()
                base_sha = self._tasks[task.config.evaluates].weights_sha256
            else:
                aggregate = task.aggregation.start_round()
                base_sha = task.weights_sha256
            round_ = RoundInProgress(
                task.task_id,
                task.next_round_number,
                aggregate,
                self._clock.now(),
                base_weights_sha256=base_sha,
                base_version=task.committed_rounds,
            )
            task.open_rounds[round_.round_number] = round_
            task.next_round_number += 1
            log.info(
                "task %s: round %d selecting",
                task.task_id,
                round_.round_number,
                extra=about(task.task_id, round_.round_number),
            )
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
        token = secrets.token_bytes(32)
        digest = token_digest(token)
        now = self._clock.now()
        secure = self.secure_rounds.aggregator(round_) is not None
        # Read and stored first: if the store fails, nothing in memory has changed.
        device_key_der = (
            self.identities.enrolled_key_der(device_id, task.config.population) if secure else b""
        )
        self._record_assignment(
            AssignmentRecord(digest, task.task_id, round_.round_number, device_id, now),
            request.example_count,
            network,
        )
        round_.assign(device_id, digest, request.example_count, network)
        enrollment = self.secure_rounds.enroll(round_, digest, device_key_der) if secure else None
        self._issued[digest] = (task.task_id, round_.round_number)
        self.advance(task, round_)
        log.debug(
            "task %s: round %d assigned a device",
            task.task_id,
            round_.round_number,
            extra=about(task.task_id, round_.round_number, device_id),
        )
        deadline = (
            round_.reporting_deadline
            if round_.state is RoundState.REPORTING
            else round_.started_at
            + task.config.selection_deadline_s
            + task.config.reporting_deadline_s
        )
        plan = task.config.plan()
        plan.dropout_seed = dropout_seed(token)
        assignment = device_pb2.Assignment(
            task_id=task.task_id,
            round_number=round_.round_number,
            upload_token=token,
            model=common_pb2.ResourceRef(sha256=task.record.model_sha256, kind="model"),
            weights=common_pb2.ResourceRef(
                sha256=round_.base_weights_sha256,
                size_bytes=4 * task.record.num_parameters,
                kind="weights",
            ),
            plan=plan,
            report_deadline_s=max(0.0, deadline - now),
            kind=(
                device_pb2.Assignment.EVALUATION
                if task.config.is_evaluation
                else device_pb2.Assignment.TRAINING
            ),
            aggregation=round_.aggregate.client_spec(),
        )
        if enrollment is not None:
            assignment.secure_aggregation.CopyFrom(enrollment)
        # After its work the device is welcome back when a later round selects, but not
        # before the task's participation spacing allows.
        window = self._steer(task, active, now, not_before_s=max(task.config.min_separation_s, 0.0))
        return device_pb2.CheckInResponse(assignment=assignment, retry_window=window)

    def _record_assignment(
        self, record: AssignmentRecord, declared_examples: int, network: str | None
    ) -> None:
        """Makes an assignment durable before the device hears of it. (Replicas also count
        it against the round's global quota and network share, and may refuse:
        server/replica_coordinator.py.)"""
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

    def _open_assignment(self, token: bytes) -> tuple[TaskRuntime, RoundInProgress, str]:
        """The task, open round and token hash an upload or failure report is for.

        Raises Unauthenticated (unknown token), AlreadyExists (already counted),
        FailedPrecondition (round no longer open, including rounds lost in a restart).
        """
        if not token:
            raise Unauthenticated("missing upload token")
        digest = token_digest(token)
        issued = self._issued.get(digest)
        if issued is None:
            stored = self.store.assignment(digest)
            if stored is None:
                raise Unauthenticated("unknown upload token")
            issued = (stored.task_id, stored.round_number)
        task = self._tasks[issued[0]]
        round_ = task.open_rounds.get(issued[1])
        if round_ is None or not round_.open:
            if self.store.is_counted(digest):
                raise AlreadyExists("an update for this upload token was already counted")
            outcome = task.recent_outcomes.get(issued[1])
            state = outcome.value if outcome is not None else "closed"
            raise FailedPrecondition(
                f"round {issued[1]} of task {issued[0]!r} is {state} and takes no reports"
            )
        return task, round_, digest

    def _reportable(
        self, header: device_pb2.UploadHeader
    ) -> tuple[TaskRuntime, RoundInProgress, str]:
        """The open assignment a header reports for, if it may still report."""
        check_protocol_version(header.protocol_version)
        task, round_, digest = self._open_assignment(header.upload_token)
        assignment = round_.assignments[digest]
        self.identities.verify_report(
            header.device_signature,
            identity.upload_signed_bytes(header),
            assignment.device_id,
            task.config.population,
        )
        if assignment.state is AssignmentState.REPORTED:
            raise AlreadyExists("an update for this upload token was already accepted")
        if assignment.state is AssignmentState.FAILED:
            raise FailedPrecondition("this assignment was reported as failed")
        # The ticker closes the round within a tick of its deadline; nothing late gets in.
        if self._clock.now() >= round_.reporting_deadline:
            raise FailedPrecondition(
                f"round {round_.round_number} of task {task.task_id!r} passed its reporting "
                "deadline"
            )
        return task, round_, digest

    def check_upload_header(self, header: device_pb2.UploadHeader) -> int:
        """Validates a header before the payload is read; returns the payload size in bytes."""
        _, round_, _ = self._reportable(header)
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
        header = credited_header(header, task.config, round_.assignments[digest])
        # The aggregator checks the header against its encoding before it decodes.
        chunks = [payload] if isinstance(payload, bytes | memoryview) else payload
        accumulate_received(round_.aggregate, header, chunks)
        round_.client_metrics.accumulate(header.metrics)
        round_.upload_bytes += wire_bytes
        round_.set_state(digest, AssignmentState.REPORTED)
        self.advance(task, round_)
        now = self._clock.now()
        window = self._steer(task, self._active_devices(task, now), now)
        return device_pb2.UploadResponse(retry_window=window)

    def report_failure(self, report: device_pb2.FailureReport) -> device_pb2.FailureAck:
        check_protocol_version(report.protocol_version)
        if report.cause not in device_pb2.FailureReport.Cause.values():
            raise InvalidArgument(f"failure cause {report.cause} is not a FailureReport.Cause")
        task, round_, digest = self._open_assignment(report.upload_token)
        assignment = round_.assignments[digest]
        self.identities.verify_report(
            report.device_signature,
            identity.failure_signed_bytes(report),
            assignment.device_id,
            task.config.population,
        )
        if assignment.state is not AssignmentState.ASSIGNED:
            raise FailedPrecondition(f"assignment already {assignment.state.value}")
        round_.set_state(
            digest, AssignmentState.FAILED, device_pb2.FailureReport.Cause.Name(report.cause)
        )
        self.secure_rounds.device_failed(round_, digest)
        self.advance(task, round_)
        now = self._clock.now()
        window = self._steer(task, self._active_devices(task, now), now)
        return device_pb2.FailureAck(retry_window=window)

    def tracked_devices(self) -> dict[str, int]:
        """Entries this process holds in memory per device, by map. Each is bounded by an
        expiry or a capacity; the retention test and benchmark watch them."""
        return {
            "retry_windows": self._retry_windows.entries(),
            "population_activity": sum(len(a) for a in self._activity.values()),
            "issued_tokens": len(self._issued),
            **self.identities.tracked_devices(),
        }

    def _active_devices(self, task: TaskRuntime, now: float) -> int:
        activity = self._activity.get(task.config.population)
        return activity.active_devices(now) if activity else 0

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
        now = self._clock.now()
        while True:
            state = round_.state
            match state:
                case RoundState.SELECTING:
                    floor = self.secure_rounds.min_selected(round_)
                    following = selecting.next_state(round_, task.config, now, floor)
                case RoundState.REPORTING if self.secure_rounds.aggregator(round_) is not None:
                    following = self.secure_rounds.next_state(round_, task.config, now)
                case RoundState.REPORTING:
                    following = reporting.next_state(round_, task.config, now)
                case RoundState.AGGREGATING | RoundState.FAILED:
                    self.driver.wake()
                    return
                case RoundState.COMMITTED | RoundState.ABANDONED:
                    return
                case _:
                    assert_never(state)
            if following is state:
                return
            if following is RoundState.REPORTING:
                reporting.enter(round_, task.config, now)
                failed = [
                    t for t, a in round_.assignments.items() if a.state is AssignmentState.FAILED
                ]
                self.secure_rounds.selection_closed(round_, failed)
            if state is RoundState.REPORTING and following is not RoundState.FAILED:
                task.reporting_durations_s.append(now - round_.reporting_started_at)
            round_.state = following

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


def check_protocol_version(version: int) -> None:
    if version != protocol.PROTOCOL_VERSION:
        raise FailedPrecondition(
            f"protocol version {version} is not supported; this coordinator speaks "
            f"{protocol.PROTOCOL_VERSION}"
        )
