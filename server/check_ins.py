"""A device's check-in answered: verified, paced, and either assigned to the selecting round
of one of its population's tasks or turned away with a reason and a retry window.

The steps a replica changes (which round selects, how an assignment is recorded, how a round
advances) stay the coordinator's; the desk is handed them as bound methods, so a subclass's
overrides apply.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping

import numpy as np

from device_runtime.clock import Clock
from device_runtime.logs import about
from protos import common_pb2, device_pb2
from server import eligibility
from server.assignments import assignment_message, token_digest
from server.check_in_pacing import CheckInPacing, rejection
from server.coordinator_settings import CoordinatorSettings, fixed_window
from server.device_identity import DeviceIdentities
from server.errors import InvalidArgument, NotFound, StoreUnavailable
from server.flood_limits import network_slot_cap
from server.protocol_version import check_protocol_version
from server.rounds import selecting
from server.rounds.round import RoundInProgress
from server.secagg.round_bridge import SecureRounds
from server.store import AssignmentRecord, Store, TaskState
from server.task_runtime import TaskRuntime

log = logging.getLogger(__name__)

# (task, round, request, device id, network, active devices of the population) -> response
Assign = Callable[
    [TaskRuntime, RoundInProgress, device_pb2.CheckInRequest, str, str | None, int],
    device_pb2.CheckInResponse,
]
# (assignment, examples the device declared, its network) -> None, or raises
# (the assignment, the examples the device declared, its network, its check-in's nonce)
RecordAssignment = Callable[[AssignmentRecord, int, str | None, bytes], None]


class CheckInDesk:
    def __init__(
        self,
        tasks: Mapping[str, TaskRuntime],
        store: Store,
        identities: DeviceIdentities,
        settings: CoordinatorSettings,
        pacing: CheckInPacing,
        jitter: np.random.Generator,
        clock: Clock,
        secure_rounds: SecureRounds,
        issued: dict[str, tuple[str, int]],
        up_to_date: Callable[[TaskRuntime], bool],
        selecting_round: Callable[[TaskRuntime], RoundInProgress | None],
        assign: Assign,
        record_assignment: RecordAssignment,
        advance: Callable[[TaskRuntime, RoundInProgress], None],
    ) -> None:
        self._tasks = tasks
        self._store = store
        self._identities = identities
        self._settings = settings
        self._pacing = pacing
        self._jitter = jitter
        self._clock = clock
        self._secure_rounds = secure_rounds
        self._issued = issued  # upload token hash -> (task, round), of this process
        # Applies a task's deadlines; False when its round logic failed the task.
        self._up_to_date = up_to_date
        # The task's round that selects now, opened if it may open one; None if none.
        self._selecting_round = selecting_round
        self._assign = assign
        # Makes an assignment durable (and, on a replica, counts it for the cluster).
        self._record_assignment = record_assignment
        self._advance = advance

    def check_in(
        self, request: device_pb2.CheckInRequest, peer: str = ""
    ) -> device_pb2.CheckInResponse:
        """As Coordinator.check_in."""
        started = time.perf_counter()  # pace steering's capacity is measured from this
        check_protocol_version(request.protocol_version)
        if request.example_count < 0:
            raise InvalidArgument(f"example_count must be >= 0, got {request.example_count}")
        device_id = self._identities.verify_check_in(request)
        tasks = [t for t in self._tasks.values() if t.config.population == request.population]
        if not tasks:
            raise NotFound(f"unknown population {request.population!r}")
        now = self._clock.now()
        # Windows are per population: a device may belong to several.
        remembered_as = f"{request.population}/{device_id}"
        wait = self._pacing.too_early(remembered_as, now)
        if wait > 0 and self._settings.enforce_retry_windows:
            # Not selected and not counted; its window stays as it was.
            window = common_pb2.RetryWindow(min_delay_s=wait, max_delay_s=2 * wait)
            return rejection(device_pb2.Rejection.TOO_EARLY, "retry window not open", window)
        network = self._identities.networks.of(peer)
        response = self._answer(request, tasks, device_id, network, now)
        self._pacing.answered(
            remembered_as, now, response.retry_window.min_delay_s, time.perf_counter() - started
        )
        return response

    def _answer(
        self,
        request: device_pb2.CheckInRequest,
        tasks: list[TaskRuntime],
        device_id: str,
        network: str | None,
        now: float,
    ) -> device_pb2.CheckInResponse:
        activity = self._pacing.activity(request.population)
        activity.record(self._identities.networks.activity_key(device_id, network), now)
        running = [t for t in tasks if t.takes_devices and self._up_to_date(t)]
        if not running:
            return self._no_running_task(tasks)
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
                    self._store.last_assignment_time(task.task_id, device_id),
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
            low, high = self._settings.store_unavailable_retry_s
            store_failure.retry_after_s = float(self._jitter.uniform(low, high))
            raise store_failure
        soonest = min(running, key=lambda t: t.next_selection_in_s(now))
        active = activity.active_devices(now)
        if len(ineligible) == len(running):
            wait = min(v.retry_after_s for v in ineligible) or self._settings.no_task_retry_s[0]
            window = self._pacing.window(soonest, active, now, not_before_s=wait)
            reason = "; ".join(v.reason for v in ineligible)
            return rejection(device_pb2.Rejection.NOT_ELIGIBLE, reason, window)
        window = self._pacing.window(soonest, active, now)
        return rejection(device_pb2.Rejection.ROUND_FULL, "round is full", window)

    def _no_running_task(self, tasks: list[TaskRuntime]) -> device_pb2.CheckInResponse:
        paused = [t.task_id for t in tasks if t.state is TaskState.PAUSED and not t.completed]
        if paused:
            return rejection(
                device_pb2.Rejection.NO_TASK,
                f"task {', '.join(paused)} paused",
                fixed_window(self._settings.paused_task_retry_s),
            )
        return rejection(
            device_pb2.Rejection.NO_TASK,
            "no running task",
            fixed_window(self._settings.no_task_retry_s),
        )

    def assign(
        self,
        task: TaskRuntime,
        round_: RoundInProgress,
        request: device_pb2.CheckInRequest,
        device_id: str,
        network: str | None,
        active: int,
    ) -> device_pb2.CheckInResponse:
        """Selects the device into the round: the assignment is recorded before the round
        (or the device) hears of it."""
        token = secrets.token_bytes(32)
        digest = token_digest(token)
        now = self._clock.now()
        secure = self._secure_rounds.aggregator(round_) is not None
        # Read and stored first: if the store fails, nothing in memory has changed.
        device_key_der = (
            self._identities.enrolled_key_der(device_id, task.config.population) if secure else b""
        )
        self._record_assignment(
            AssignmentRecord(digest, task.task_id, round_.round_number, device_id, now),
            request.example_count,
            network,
            request.nonce,
        )
        round_.assign(device_id, digest, request.example_count, network)
        enrollment = self._secure_rounds.enroll(round_, digest, device_key_der) if secure else None
        self._issued[digest] = (task.task_id, round_.round_number)
        self._advance(task, round_)
        log.debug(
            "task %s: round %d assigned a device",
            task.task_id,
            round_.round_number,
            extra=about(task.task_id, round_.round_number, device_id),
        )
        assignment = assignment_message(task, round_, token, now)
        if enrollment is not None:
            assignment.secure_aggregation.CopyFrom(enrollment)
        # After its work the device is welcome back when a later round selects, but not
        # before the task's participation spacing allows.
        not_before_s = max(task.config.min_separation_s, 0.0)
        window = self._pacing.window(task, active, now, not_before_s=not_before_s)
        return device_pb2.CheckInResponse(assignment=assignment, retry_window=window)
