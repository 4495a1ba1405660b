"""The soak's in-process driver: the coordinator's own objects on one event loop, no network.

Devices call the Coordinator (check-in, reports, failures) directly and hand their SecAgg
messages to SecAggService.apply, the call its RPC handlers make, so every message is
serialized on the session's lock and followed by the coordinator's tick, as in `serve`.
Within a stage the messages arrive in seeded bursts: a burst's messages all wait for the
session before the first is taken, so a stage close decided at the tick after one of them
queues behind the others, deterministically (the interleaving behind issue 12, item 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

import numpy as np

from device_runtime import constants
from device_runtime.aggregation.norms import clip_l2
from device_runtime.secagg.client import SecAggClient
from device_runtime.secagg.errors import SecAggAborted
from device_runtime.secagg.secure_upload import secure_mean_encoding
from protos import common_pb2, device_pb2, secagg_pb2
from server.coordinator import Coordinator
from server.errors import CoordinatorError
from server.secagg.round_aggregator import SecureSumRoundAggregator
from server.secagg.server import SecAggServer
from server.store import RoundState
from tests.fakes import FakeClock
from tests.identities import check_in, device_key, sign_failure, sign_header
from tests.secagg.soak import (
    SELECTION_DEADLINE_S,
    SESSION_STAGES,
    STOP_POINTS,
    DevicePlan,
    DeviceRecord,
    RoundOutcome,
    judge_round,
    stage_deadline,
)

MAX_BURST = 4


@dataclasses.dataclass
class _Device:
    record: DeviceRecord
    assignment: device_pb2.Assignment
    name: str  # its enrolled key's name (tests/identities.py)
    secagg: SecAggClient | None = None
    stopped: bool = False


@dataclasses.dataclass
class _Arrival:
    device: _Device
    action: Callable[[SecAggServer], object]
    taken: Callable[[], None]
    masked_input: bool = False


async def _quiesce() -> None:
    """Until every task the service and coordinator started (stage closes, wake-ups) is done."""
    while others := asyncio.all_tasks() - {asyncio.current_task()}:
        await asyncio.wait(others)


class InProcessSoakDriver:
    def __init__(self, coordinator: Coordinator, clock: FakeClock) -> None:
        self._coordinator = coordinator
        self._clock = clock
        self._round_index = 0

    async def run_round(self, plans: list[DevicePlan], seed: int) -> RoundOutcome:
        coordinator, task = self._coordinator, self._coordinator.task("t1")
        rng = np.random.default_rng(seed)
        self._round_index += 1
        closed_before = len(coordinator.rounds("t1"))
        weights_before = task.weights.copy()
        devices = [self._check_in(plan, i) for i, plan in enumerate(plans)]
        round_ = task.open_rounds[devices[0].assignment.round_number]
        aggregate = round_.aggregate
        assert isinstance(aggregate, SecureSumRoundAggregator)
        if round_.state is RoundState.SELECTING:
            self._clock.advance(SELECTION_DEADLINE_S)  # selection closes at its deadline
            coordinator.tick()
        session = aggregate.session
        assert session is not None, aggregate.open_failure
        await _quiesce()
        started = round_.reporting_started_at
        for stage, arrivals in enumerate(
            (self._advertise, self._share_keys, self._masked_inputs, self._unmask)
        ):
            await self._arrive(session, arrivals(session, devices, rng), rng)
            if session.stage == SESSION_STAGES[stage]:
                # Everyone who will speak at this stage has: its deadline passes.
                self._clock.time = max(self._clock.time, stage_deadline(started, session.stage))
                coordinator.tick()
                await _quiesce()
        coordinator.tick()
        assert len(coordinator.rounds("t1")) == closed_before + 1, "the round did not close"
        records = [d.record for d in devices]
        return judge_round(
            session, records, coordinator.rounds("t1")[-1], weights_before, task.weights
        )

    def _check_in(self, plan: DevicePlan, index: int) -> _Device:
        name = f"r{self._round_index}-d{index}"
        response = check_in(
            self._coordinator,
            name,
            example_count=40,
            runtime_version=constants.RUNTIME_VERSION,
        )
        assert response.HasField("assignment"), response.rejection.message
        record = DeviceRecord(plan, client_id=response.assignment.secure_aggregation.client_id)
        return _Device(record, response.assignment, name)

    def _stops(self, device: _Device, stage: int) -> bool:
        """The device stops here if its plan says so (telling the coordinator, or not)."""
        if device.stopped or device.record.plan.stop_at != stage:
            return device.stopped
        device.stopped = True
        if device.record.plan.tells and stage < 3:  # after its masked input it has reported
            self._fail(device, f"scripted stop {STOP_POINTS[stage]}")
        return True

    def _fail(self, device: _Device, message: str) -> None:
        device.stopped = True
        with contextlib.suppress(CoordinatorError):  # refused once the round is over
            self._coordinator.report_failure(
                sign_failure(
                    device_pb2.FailureReport(
                        protocol_version=constants.PROTOCOL_VERSION,
                        upload_token=device.assignment.upload_token,
                        cause=device_pb2.FailureReport.SECURE_AGGREGATION_ERROR,
                        message=message,
                    )
                )
            )

    def _request(
        self, session: SecAggServer, device: _Device
    ) -> secagg_pb2.SecAggServerMessage | None:
        """The device's next server message; None once it is out of the session."""
        assert device.secagg is not None
        e = device.secagg.envelope()
        try:
            message = session.server_message(e.session_id, e.client_id, e.session_token)
        except CoordinatorError:
            device.stopped = True  # dropped out: the server sends it nothing more
            return None
        if message.WhichOneof("message") == "abort":
            device.secagg.server_aborted(message.abort.reason)
            device.stopped = True
            return None
        return message

    def _advertise(
        self, session: SecAggServer, devices: list[_Device], rng: np.random.Generator
    ) -> list[_Arrival]:
        arrivals = []
        for device in devices:
            if self._stops(device, 0):
                continue
            config = session.session_config(device.record.client_id)
            # Signs its advertised keys with its enrolled key, and checks its neighbours'.
            device.secagg = client = SecAggClient(config, device_key(device.name))
            message = client.envelope()
            message.advertise_keys.CopyFrom(client.advertise_keys())
            arrivals.append(self._message(device, message, "advertised"))
        return arrivals

    def _share_keys(
        self, session: SecAggServer, devices: list[_Device], rng: np.random.Generator
    ) -> list[_Arrival]:
        arrivals = []
        for device in devices:
            request = None if device.stopped else self._request(session, device)
            if request is None or self._stops(device, 1):
                continue
            assert device.secagg is not None
            message = device.secagg.envelope()
            try:
                message.share_keys.CopyFrom(device.secagg.share_keys(request.share_keys_request))
            except SecAggAborted:
                arrivals.append(self._refusal(device))
                continue
            arrivals.append(self._message(device, message, "shared"))
        return arrivals

    def _masked_inputs(
        self, session: SecAggServer, devices: list[_Device], rng: np.random.Generator
    ) -> list[_Arrival]:
        arrivals = []
        for device in devices:
            request = None if device.stopped else self._request(session, device)
            if request is None or self._stops(device, 2):
                continue
            assert device.secagg is not None
            plan, config = device.record.plan, session.session_config(device.record.client_id)
            encoding = secure_mean_encoding(device.assignment.aggregation, config)
            clipped, _ = clip_l2(plan.delta, encoding.clip)
            quantized = encoding.encode(clipped, float(plan.example_count), rng)
            try:
                masked = device.secagg.masked_input(request.masked_input_request, quantized)
            except SecAggAborted:
                arrivals.append(self._refusal(device))
                continue
            e = device.secagg.envelope()

            def send(
                s: SecAggServer, e: secagg_pb2.SecAggClientMessage = e, m: np.ndarray = masked
            ) -> object:
                return s.receive_masked_input(e.session_id, e.client_id, e.session_token, m)

            arrivals.append(_Arrival(device, send, self._reported(device), masked_input=True))
        return arrivals

    def _reported(self, device: _Device) -> Callable[[], None]:
        """The masked input is in the sum: the device reports its metrics, as the runtime."""

        def report() -> None:
            device.record.masked = True
            plan = device.record.plan
            header = device_pb2.UploadHeader(
                protocol_version=constants.PROTOCOL_VERSION,
                upload_token=device.assignment.upload_token,
                example_count=plan.example_count,
                num_elements=plan.delta.size,
                encoding=constants.UPDATE_ENCODING_SECURE_SUM,
                metrics=common_pb2.ClientMetrics(
                    loss=1.0, accuracy=0.5, num_examples=plan.example_count, num_batches=1
                ),
            )
            try:
                self._coordinator.accept_upload(sign_header(header), b"", 0)
            except CoordinatorError:
                return  # the round already failed (a burst's close aborted the session)
            device.record.reported = True

        return report

    def _unmask(
        self, session: SecAggServer, devices: list[_Device], rng: np.random.Generator
    ) -> list[_Arrival]:
        arrivals = []
        for device in devices:
            request = None if device.stopped else self._request(session, device)
            if request is None or self._stops(device, 3):
                continue
            assert device.secagg is not None
            message = device.secagg.envelope()
            try:
                response = device.secagg.unmasking_response(request.unmasking_request)
            except SecAggAborted:
                arrivals.append(self._refusal(device))
                continue
            message.unmasking_response.CopyFrom(response)
            arrivals.append(self._message(device, message, "unmasked"))
        return arrivals

    def _message(
        self, device: _Device, message: secagg_pb2.SecAggClientMessage, flag: str
    ) -> _Arrival:
        return _Arrival(
            device,
            lambda s: s.receive(message),
            lambda: setattr(device.record, flag, True),
        )

    def _refusal(self, device: _Device) -> _Arrival:
        """The device refuses what the server sent: it tells the server it aborts."""
        assert device.secagg is not None
        device.stopped = True
        message = device.secagg.abort_message()
        return _Arrival(device, lambda s: s.receive(message), lambda: None)

    async def _arrive(
        self, session: SecAggServer, arrivals: list[_Arrival], rng: np.random.Generator
    ) -> None:
        service = self._coordinator.secure_rounds.service
        order = [arrivals[i] for i in rng.permutation(len(arrivals))]
        while order:
            size = int(rng.integers(1, MAX_BURST + 1))
            burst, order = order[:size], order[size:]
            taken = [
                asyncio.ensure_future(service.apply(session.session_id, a.action)) for a in burst
            ]
            results = await asyncio.gather(*taken, return_exceptions=True)
            for arrival, result in zip(burst, results, strict=True):
                if isinstance(result, CoordinatorError):
                    # Refused (a masked input after the stage closed at the round's
                    # target): the device fails, as device_runtime's would.
                    arrival.device.record.refused = arrival.masked_input
                    self._fail(arrival.device, str(result))
                elif isinstance(result, BaseException):
                    raise result
                else:
                    arrival.taken()
        await _quiesce()
