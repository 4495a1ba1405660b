"""The soak's gRPC driver: a real coordinator on loopback, each device its own coroutine.

The coordinator runs as `overnight serve` does (SQLite store, gRPC, SecAggService, its
deadline ticker) on a fake clock. Each device checks in with CoordinatorClient, waits for its
session config with the runtime's `await_session_config`, then speaks SecAggService's RPCs
with its SecAggClient, long-polling between stages as device_runtime's session runner does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
import numpy as np

from device_runtime import constants
from device_runtime.aggregation.norms import clip_l2
from device_runtime.channel import ServerTrust
from device_runtime.secagg.client import SecAggClient
from device_runtime.secagg.errors import SecAggAborted
from device_runtime.secagg.secure_upload import secure_mean_encoding
from device_runtime.secagg.session_runner import await_session_config
from device_runtime.transport import CoordinatorClient, TransportError
from protos import common_pb2, device_pb2, secagg_pb2, secagg_pb2_grpc
from server.coordinator import Coordinator
from server.secagg.round_aggregator import SecureSumRoundAggregator
from server.secagg.server import SecAggServer
from server.store import RoundState
from tests.fakes import FakeClock
from tests.harness import POPULATION
from tests.identities import ENROLLMENT_SECRET, device_key
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

log = logging.getLogger(__name__)


class _Progress:
    """Devices tell the driver when they are done with a stage; the driver waits for all."""

    def __init__(self, records: list[DeviceRecord]) -> None:
        self.records = records
        self.changed = asyncio.Condition()

    async def done(self, record: DeviceRecord, stages: int) -> None:
        record.stages_done = max(record.stages_done, stages)
        async with self.changed:
            self.changed.notify_all()

    async def all_done(self, stages: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: all(r.stages_done >= stages for r in self.records))


async def _until(condition: Callable[[], bool]) -> None:
    """Event loop turns until `condition` holds (server-side changes run in worker threads)."""
    while not condition():
        await asyncio.sleep(0.002)


class _ScriptedDevice:
    def __init__(
        self,
        client: CoordinatorClient,
        assignment: device_pb2.Assignment,
        record: DeviceRecord,
        progress: _Progress,
        rng: np.random.Generator,
    ) -> None:
        self._coordinator = client
        self._stub = secagg_pb2_grpc.SecAggServiceStub(client.channel)
        self._assignment = assignment
        self._record = record
        self._progress = progress
        self._rng = rng
        self._secagg: SecAggClient | None = None

    async def run(self) -> None:
        try:
            await self._run()
        except (SecAggAborted, TransportError) as exc:
            log.info("device %d stops: %s", self._record.client_id, exc)
        finally:
            await self._progress.done(self._record, len(SESSION_STAGES))

    async def _stop_here(self, stage: int) -> bool:
        plan = self._record.plan
        if plan.stop_at != stage:
            return False
        if plan.tells and stage < 3:  # after its masked input, its report is in: no failure
            await self._coordinator.report_failure(
                self._assignment.upload_token,
                device_pb2.FailureReport.INTERRUPTED,
                f"scripted stop {STOP_POINTS[stage]}",
            )
        return True

    async def _send(self, build: Callable[[secagg_pb2.SecAggClientMessage], None]) -> None:
        assert self._secagg is not None
        message = self._secagg.envelope()
        build(message)
        try:
            await self._stub.Send(message, timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc

    async def _await(self, after: secagg_pb2.SecAggStage) -> secagg_pb2.SecAggServerMessage:
        assert self._secagg is not None
        e = self._secagg.envelope()
        request = secagg_pb2.AwaitServerMessageRequest(
            protocol_version=constants.PROTOCOL_VERSION,
            session_id=e.session_id,
            client_id=e.client_id,
            session_token=e.session_token,
            after_stage=after,
        )
        while True:
            try:
                message = await self._stub.AwaitServerMessage(request)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the long poll ran out while the driver waited for others
                raise TransportError(exc.code(), exc.details() or "") from exc
            if message.WhichOneof("message") == "abort":
                raise SecAggAborted(message.abort.reason)
            return message

    async def _refuse(self, exc: SecAggAborted) -> NoReturn:
        assert self._secagg is not None
        abort = self._secagg.abort_message()
        await self._send(lambda m: m.abort.CopyFrom(abort.abort))
        raise exc

    async def _run(self) -> None:
        record, enrollment = self._record, self._assignment.secure_aggregation
        record.client_id = enrollment.client_id
        if await self._stop_here(0):
            return
        config = await await_session_config(self._coordinator.channel, enrollment)
        self._secagg = secagg = SecAggClient(config, self._coordinator.key)
        await self._send(lambda m: m.advertise_keys.CopyFrom(secagg.advertise_keys()))
        record.advertised = True
        await self._progress.done(record, 1)

        request = await self._await(secagg_pb2.ADVERTISE_KEYS)
        if await self._stop_here(1):
            return
        try:
            shares = secagg.share_keys(request.share_keys_request)
        except SecAggAborted as exc:
            await self._refuse(exc)
        await self._send(lambda m: m.share_keys.CopyFrom(shares))
        record.shared = True
        await self._progress.done(record, 2)

        request = await self._await(secagg_pb2.SHARE_KEYS)
        if await self._stop_here(2):
            return
        await self._contribute(config, request)
        await self._progress.done(record, 3)

        request = await self._await(secagg_pb2.MASKED_INPUT_COLLECTION)
        if await self._stop_here(3):
            return
        try:
            response = secagg.unmasking_response(request.unmasking_request)
        except SecAggAborted as exc:
            await self._refuse(exc)
        await self._send(lambda m: m.unmasking_response.CopyFrom(response))
        record.unmasked = True
        await self._progress.done(record, 4)
        await self._await(secagg_pb2.UNMASKING)

    async def _contribute(
        self, config: secagg_pb2.SecAggSessionConfig, request: secagg_pb2.SecAggServerMessage
    ) -> None:
        """Masked input, then the metrics report, as device_runtime.runtime does them."""
        assert self._secagg is not None
        plan, token = self._record.plan, self._assignment.upload_token
        encoding = secure_mean_encoding(self._assignment.aggregation, config)
        clipped, _ = clip_l2(plan.delta, encoding.clip)
        quantized = encoding.encode(clipped, float(plan.example_count), self._rng)
        try:
            masked = self._secagg.masked_input(request.masked_input_request, quantized)
        except SecAggAborted as exc:
            await self._refuse(exc)
        header = secagg_pb2.MaskedInputHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            session_id=config.session_id,
            client_id=config.client_id,
            session_token=config.session_token,
            vector_length=masked.size,
        )

        async def chunks() -> AsyncIterator[secagg_pb2.MaskedInputChunk]:
            yield secagg_pb2.MaskedInputChunk(header=header)
            yield secagg_pb2.MaskedInputChunk(data=masked.astype("<u4").tobytes())

        try:
            await self._stub.SendMaskedInput(chunks(), timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            # Too late (the stage closed at the round's target): the device reports failure.
            self._record.refused = True
            await self._coordinator.report_failure(
                token, device_pb2.FailureReport.SECURE_AGGREGATION_ERROR, exc.details() or ""
            )
            raise TransportError(exc.code(), exc.details() or "") from exc
        self._record.masked = True
        metrics = common_pb2.ClientMetrics(
            loss=1.0, accuracy=0.5, num_examples=plan.example_count, num_batches=1
        )
        await self._coordinator.report_secure_update(
            token, plan.example_count, plan.delta.size, metrics
        )
        self._record.reported = True


class GrpcSoakDriver:
    """Devices and coordinator talk over gRPC on loopback; each device runs on its own."""

    def __init__(
        self, coordinator: Coordinator, clock: FakeClock, address: str, trust: ServerTrust
    ) -> None:
        self._coordinator = coordinator
        self._clock = clock
        self._address = address
        self._trust = trust
        self._round_index = 0

    async def run_round(self, plans: list[DevicePlan], seed: int) -> RoundOutcome:
        coordinator, task = self._coordinator, self._coordinator.task("t1")
        self._round_index += 1
        records = [DeviceRecord(plan) for plan in plans]
        progress = _Progress(records)
        clients = [
            CoordinatorClient(
                self._address, self._trust, key=device_key(f"r{self._round_index}-d{i}")
            )
            for i in range(len(plans))
        ]
        closed_before = len(coordinator.rounds("t1"))
        weights_before = task.weights.copy()
        try:
            assignments = []
            for client in clients:
                await client.enroll(POPULATION, ENROLLMENT_SECRET)
                response = await client.check_in(POPULATION, 40)
                assert response.HasField("assignment"), response.rejection.message
                assignments.append(response.assignment)
            round_ = task.open_rounds[assignments[0].round_number]
            aggregate = round_.aggregate
            assert isinstance(aggregate, SecureSumRoundAggregator)
            if round_.state is RoundState.SELECTING:
                # Fewer devices than the quota: selection closes at its deadline.
                self._clock.advance(SELECTION_DEADLINE_S)
                coordinator.tick()
            session = aggregate.session
            assert session is not None, aggregate.open_failure
            rngs = np.random.default_rng(seed).spawn(len(plans))
            devices = [
                _ScriptedDevice(client, assignment, record, progress, rng)
                for client, assignment, record, rng in zip(
                    clients, assignments, records, rngs, strict=True
                )
            ]
            running = [asyncio.ensure_future(d.run()) for d in devices]
            await self._drive(session, round_.reporting_started_at, progress)
            await _until(lambda: len(coordinator.rounds("t1")) > closed_before)
            await asyncio.gather(*running)
        finally:
            for client in clients:
                await client.close()
        return judge_round(
            session, records, coordinator.rounds("t1")[-1], weights_before, task.weights
        )

    async def _drive(self, session: SecAggServer, started: float, progress: _Progress) -> None:
        for index, stage in enumerate(SESSION_STAGES):
            await progress.all_done(index + 1)
            if session.stage == stage:
                # Everyone who will speak at this stage has: its deadline passes.
                self._clock.time = max(self._clock.time, stage_deadline(started, stage))
                self._coordinator.tick()
                await _until(lambda: session.stage != stage)  # noqa: B023
