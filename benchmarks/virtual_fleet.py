"""A fleet of phones on a virtual clock against the real in-process coordinator.

A discrete-event simulation: the coordinator is real (SQLite store, ECDSA enrollment and
signed check-ins, uploads of zero deltas through the real aggregation path, its round
driver passes through `tick`); only time, training and the phones' availability are
simulated. A phone checks in, and when selected trains for a virtual while, uploads, and
sleeps the delay it drew from its check-in's retry window (as device_runtime does); when
rejected it draws its next check-in from the window it was given. Phones are either always
available, or available for one session every few days (charging, idle, on Wi-Fi), as a
large population is.

Used by benchmarks/retention_year.py, benchmarks/round_cost.py and tests that check round
cadence and bounded state on the virtual clock. Wall-clock figures (check-in handling,
commit latency) are recorded for the benchmarks; tests use only virtual time.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import pathlib
import time

import numpy as np

from device_runtime import constants, identity
from protos import common_pb2, device_pb2
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.device_identity import DeviceIdentities
from server.enrollment.config import EnrollmentPolicy
from server.errors import CoordinatorError
from server.sqlite_store import SqliteStore
from server.store import RoundRecord
from server.task_runtime import TaskRuntime

POPULATION = "digits"
SECRET = b"virtual-fleet-enrollment-secret"
DAY_S = 24 * 3600.0


class VirtualClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:  # unused: the simulation moves time
        self.time += seconds


@dataclasses.dataclass(frozen=True)
class FleetSettings:
    phones: int
    train_s: tuple[float, float] = (0.5, 1.5)  # virtual training and upload, per assignment
    first_check_in_s: float = 1.0  # phones first check in uniformly within this
    # None: always available. Else each phone has one session of `session_s` every
    # `mean_days_between_sessions` days on average (and at least one day apart).
    mean_days_between_sessions: float | None = None
    session_s: float = 3600.0
    seed: int = 0


@dataclasses.dataclass
class Phone:
    index: int
    key: identity.DeviceKey
    enrolled: bool = False
    session_ends: float = float("inf")
    next_session: float = 0.0


@dataclasses.dataclass(frozen=True)
class RoundCost:
    """Wall-clock cost attributed to one closed round (benchmarks only)."""

    record: RoundRecord
    check_ins: int
    check_in_s: float  # total handling CPU time of the check-ins served while it was open
    commit_s: float | None


class VirtualFleet:
    def __init__(
        self,
        model_bytes: bytes,
        task: TaskConfig,
        data_dir: pathlib.Path,
        fleet: FleetSettings,
        settings: CoordinatorSettings | None = None,
        keep_rounds: int | None = None,
    ) -> None:
        """`keep_rounds`: how many of the latest rounds' costs to keep (None: all); a long
        run keeps few, so that its own memory stays flat."""
        self.clock = VirtualClock()
        self.fleet = fleet
        self.rng = np.random.default_rng(fleet.seed)
        self.store_path = data_dir / "coordinator.sqlite"
        store = SqliteStore(self.store_path)
        identities = DeviceIdentities(store, self.clock, EnrollmentPolicy.shared_secret(SECRET))
        self.coordinator = Coordinator(
            store,
            self.clock,
            settings,
            rng=np.random.default_rng(fleet.seed),
            identities=identities,
        )
        self.coordinator.register_task(task, model_bytes)
        self.task_id = task.task_id
        self.num_parameters = self.coordinator.task(task.task_id).record.num_parameters
        self._payload = np.zeros(self.num_parameters, "<f4").tobytes()
        self.rounds: collections.deque[RoundCost] = collections.deque(maxlen=keep_rounds)
        self.closed_rounds = 0
        self.check_ins = 0
        self.uploads = 0
        self._check_ins_open = 0
        self._check_in_s_open = 0.0
        self._commits: list[float] = []
        self.coordinator.observers.append(self._round_closed)
        self.coordinator.driver.commit_observers.append(self._commits.append)
        self._events: list[tuple[float, int, int, bytes]] = []
        self._order = itertools.count()
        self._after_work: dict[bytes, float] = {}  # token -> the delay its phone drew
        self._phones: list[Phone] = []
        for index in range(fleet.phones):
            phone = Phone(index, identity.DeviceKey.from_seed(f"phone-{index}".encode()))
            self._phones.append(phone)
            first = float(self.rng.uniform(0.0, fleet.first_check_in_s))
            if fleet.mean_days_between_sessions is not None:
                phone.next_session = self.clock.time + first
                self._start_session(phone)
            self._at(first, phone, b"")

    # ----- phones --------------------------------------------------------------------------

    def _at(self, delay_s: float, phone: Phone, token: bytes) -> None:
        when = self.clock.time + max(0.0, delay_s)
        heapq.heappush(self._events, (when, next(self._order), phone.index, token))

    def _start_session(self, phone: Phone) -> None:
        mean_days = self.fleet.mean_days_between_sessions
        assert mean_days is not None
        phone.session_ends = phone.next_session + self.fleet.session_s
        gap_days = 1.0 + float(self.rng.exponential(max(mean_days - 1.0, 0.0)))
        phone.next_session += gap_days * DAY_S

    def _come_back(self, phone: Phone, delay_s: float) -> None:
        """Checks in again after `delay_s`, or at the next session if this one is over."""
        when = self.clock.time + delay_s
        while when > phone.session_ends:
            when = max(when, phone.next_session)
            self._start_session(phone)
        self._at(when - self.clock.time, phone, b"")

    def _enroll(self, phone: Phone) -> None:
        request = device_pb2.EnrollRequest(
            protocol_version=constants.PROTOCOL_VERSION,
            population=POPULATION,
            public_key=phone.key.public_key_der,
            enrollment_secret=SECRET,
        )
        request.signature = phone.key.sign(identity.enroll_signed_bytes(request))
        self.coordinator.identities.enroll(request)
        phone.enrolled = True

    def _check_in(self, phone: Phone) -> None:
        if not phone.enrolled:
            try:
                self._enroll(phone)
            except CoordinatorError:
                self._come_back(phone, 60.0)
                return
        request = device_pb2.CheckInRequest(
            protocol_version=constants.PROTOCOL_VERSION,
            population=POPULATION,
            runtime_version=constants.RUNTIME_VERSION,
            example_count=40,
        )
        identity.sign_check_in(phone.key, request, self.clock.now())
        # CPU time of this thread, not wall time: on a shared machine other processes'
        # load would otherwise read as the coordinator's cost.
        started = time.thread_time()
        try:
            response = self.coordinator.check_in(request)
        except CoordinatorError as exc:
            self._come_back(phone, float(getattr(exc, "retry_after_s", 60.0)))
            return
        finally:
            self._check_in_s_open += time.thread_time() - started
            self._check_ins_open += 1
            self.check_ins += 1
        window = response.retry_window
        delay = float(
            self.rng.uniform(window.min_delay_s, max(window.min_delay_s, window.max_delay_s))
        )
        if response.WhichOneof("outcome") == "assignment":
            train_s = float(self.rng.uniform(*self.fleet.train_s))
            self._after_work[response.assignment.upload_token] = delay
            self._at(train_s, phone, response.assignment.upload_token)
        else:
            self._come_back(phone, delay)

    def _upload(self, phone: Phone, token: bytes, delay_s: float) -> None:
        header = device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            example_count=40,
            num_elements=self.num_parameters,
            encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
            metrics=common_pb2.ClientMetrics(
                loss=1.0, accuracy=0.5, num_examples=40, num_batches=5
            ),
        )
        header.device_signature = phone.key.sign(identity.upload_signed_bytes(header))
        try:
            self.coordinator.accept_upload(header, self._payload, len(self._payload))
            self.uploads += 1
        except CoordinatorError:
            pass  # the round closed while it trained
        # The round driver, woken by a report that completes its round, ends it at once.
        self.coordinator.tick()
        self._come_back(phone, delay_s)

    def _round_closed(self, task: TaskRuntime, record: RoundRecord) -> None:
        commit_s = self._commits.pop() if self._commits else None
        self._commits.clear()
        self.rounds.append(RoundCost(record, self._check_ins_open, self._check_in_s_open, commit_s))
        self._check_ins_open = 0
        self._check_in_s_open = 0.0
        self.closed_rounds += 1

    # ----- the run -------------------------------------------------------------------------

    def step(self) -> bool:
        """Handles the next event; False when none is left."""
        if not self._events:
            return False
        when, _, index, token = heapq.heappop(self._events)
        self.clock.time = max(self.clock.time, when)
        self.coordinator.tick()
        phone = self._phones[index]
        if token:
            # A phone sleeps the delay it drew from its check-in's window after the work,
            # as device_runtime does.
            self._upload(phone, token, self._after_work.pop(token))
        else:
            self._check_in(phone)
        return True

    def run_until(self, end: float) -> None:
        while self._events and self._events[0][0] <= end and self.step():
            pass
        self.clock.time = max(self.clock.time, end)
        self.coordinator.tick()

    def run_rounds(self, rounds: int, max_virtual_s: float = 30 * DAY_S) -> None:
        end = self.clock.time + max_virtual_s
        while self.closed_rounds < rounds and self.clock.time < end and self.step():
            pass

    def close(self) -> None:
        self.coordinator.store.close()
