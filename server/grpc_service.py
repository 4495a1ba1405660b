"""gRPC (asyncio) front of the coordinator: the device and admin services.

All CoordinatorErrors become gRPC statuses through `server.errors.abort_on_error`, the one
mapping every service (SecAggService too) uses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc

from device_runtime import constants as protocol
from protos import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc, secagg_pb2_grpc
from server.config import TaskConfig
from server.coordinator import Coordinator, TaskRuntime, check_protocol_version
from server.errors import (
    CoordinatorError,
    InvalidArgument,
    ResourceExhausted,
    abort_on_error,
    status_code,
)
from server.rounds.round import RoundInProgress
from server.store import RoundRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

tick_interval_s = 0.25
# The admin service takes whole models in one message; devices never send anything this big.
admin_max_message_bytes = 256 << 20


def data_chunk_wire_bytes(size: int) -> int:
    """Serialized size of an UploadChunk carrying `size` payload bytes (tag, length varint,
    bytes): what ByteSize() returns, without protobuf walking a 1 MiB field per chunk
    (0.15 ms each, ~1 ms per CNN-sized upload)."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


class DeviceService(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, coordinator: Coordinator, max_concurrent_uploads: int = 2) -> None:
        self._coordinator = coordinator
        self._upload_slots = asyncio.Semaphore(max_concurrent_uploads)

    @abort_on_error
    async def CheckIn(
        self, request: device_pb2.CheckInRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.CheckInResponse:
        return self._coordinator.check_in(request)

    async def Download(
        self, request: device_pb2.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[device_pb2.DataChunk]:
        # Streaming handler: errors are mapped inline (the decorator wraps unary calls).
        try:
            check_protocol_version(request.protocol_version)
            data = self._coordinator.resource(request.sha256)
        except CoordinatorError as exc:
            await context.abort(status_code(exc), str(exc))
            return
        sent = 0
        for start in range(0, max(len(data), 1), protocol.chunk_size_bytes):
            chunk = device_pb2.DataChunk(
                data=data[start : start + protocol.chunk_size_bytes],
                offset=start,
                total_size=len(data),
            )
            sent += chunk.ByteSize()
            yield chunk
        self._coordinator.count_broadcast(request.sha256, sent)

    @abort_on_error
    async def UploadUpdate(
        self,
        request_iterator: AsyncIterator[device_pb2.UploadChunk],
        context: grpc.aio.ServicerContext,
    ) -> device_pb2.UploadResponse:
        # At most `max_concurrent_uploads` payloads are staged at once; further streams wait
        # unread, and HTTP/2 flow control holds their senders back. Memory stays
        # O(model * max_concurrent_uploads) however many devices upload together. Decoding
        # runs on the one event-loop thread, so more slots add buffering, not throughput;
        # a slow sender holds its slot at most for its RPC deadline.
        async with self._upload_slots:
            return await self._receive_upload(request_iterator)

    async def _receive_upload(
        self, request_iterator: AsyncIterator[device_pb2.UploadChunk]
    ) -> device_pb2.UploadResponse:
        header: device_pb2.UploadHeader | None = None
        staging = memoryview(bytearray())
        received = wire_bytes = 0
        async for chunk in request_iterator:
            if header is None:
                if chunk.WhichOneof("part") != "header":
                    raise InvalidArgument("an upload must start with an UploadHeader")
                wire_bytes += chunk.ByteSize()
                header = chunk.header
                staging = memoryview(bytearray(self._coordinator.check_upload_header(header)))
                continue
            if chunk.WhichOneof("part") != "data":
                raise InvalidArgument("an upload has exactly one header, first")
            data = chunk.data
            if len(data) > protocol.max_upload_chunk_bytes:
                raise ResourceExhausted(
                    f"upload chunk of {len(data)} bytes exceeds the "
                    f"{protocol.max_upload_chunk_bytes}-byte limit; send smaller chunks"
                )
            if received + len(data) > len(staging):
                raise ResourceExhausted(
                    f"payload exceeds the {len(staging)} bytes the header announced"
                )
            wire_bytes += data_chunk_wire_bytes(len(data))
            staging[received : received + len(data)] = data
            received += len(data)
        if header is None:
            raise InvalidArgument("empty upload stream")
        return self._coordinator.accept_upload(header, staging[:received], wire_bytes)

    @abort_on_error
    async def ReportFailure(
        self, request: device_pb2.FailureReport, context: grpc.aio.ServicerContext
    ) -> device_pb2.FailureAck:
        return self._coordinator.report_failure(request)


def round_summary(record: RoundRecord | RoundInProgress) -> admin_pb2.RoundSummary:
    summary = admin_pb2.RoundSummary(
        round_number=record.round_number,
        state=record.state.value,
        selected=record.selected,
        reported=record.reported,
        dropped=record.dropped,
        started_at=record.started_at,
    )
    if isinstance(record, RoundRecord):  # a closed round also has metrics and an end
        summary.metrics.update(record.metrics)
        summary.finished_at = record.finished_at
    return summary


def task_status(task: TaskRuntime) -> admin_pb2.TaskStatus:
    status = admin_pb2.TaskStatus(
        config=task.config.to_proto(),
        state="completed" if task.completed else "running",
        committed_rounds=task.committed_rounds,
        model_sha256=task.record.model_sha256,
        num_parameters=task.record.num_parameters,
    )
    if task.current is not None:
        status.current_round.CopyFrom(round_summary(task.current))
    return status


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    @abort_on_error
    async def RegisterTask(
        self, request: admin_pb2.RegisterTaskRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RegisterTaskResponse:
        check_protocol_version(request.protocol_version)
        config = TaskConfig.from_proto(request.config)
        record = self._coordinator.register_task(
            config, request.model_tflite, request.initial_weights or None
        )
        return admin_pb2.RegisterTaskResponse(
            task_id=config.task_id,
            model_sha256=record.model_sha256,
            num_parameters=record.num_parameters,
        )

    @abort_on_error
    async def GetTaskStatus(
        self, request: admin_pb2.GetTaskStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.TaskStatus:
        check_protocol_version(request.protocol_version)
        return task_status(self._coordinator.task(request.task_id))

    @abort_on_error
    async def ListTasks(
        self, request: admin_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListTasksResponse:
        check_protocol_version(request.protocol_version)
        return admin_pb2.ListTasksResponse(
            tasks=[task_status(t) for t in self._coordinator.tasks()]
        )

    @abort_on_error
    async def ListRounds(
        self, request: admin_pb2.ListRoundsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRoundsResponse:
        check_protocol_version(request.protocol_version)
        rounds = self._coordinator.rounds(request.task_id)
        return admin_pb2.ListRoundsResponse(rounds=[round_summary(r) for r in rounds])


class CoordinatorServer:
    """The gRPC server plus the deadline ticker, on the current event loop."""

    def __init__(
        self,
        coordinator: Coordinator,
        address: str = "127.0.0.1:0",
        max_concurrent_uploads: int = 2,
        extra_options: list[tuple[str, int]] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", admin_max_message_bytes),
                ("grpc.max_send_message_length", protocol.max_message_bytes),
                *(extra_options or []),
            ]
        )
        device_pb2_grpc.add_DeviceServiceServicer_to_server(
            DeviceService(coordinator, max_concurrent_uploads), self._server
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(coordinator), self._server)
        secagg_pb2_grpc.add_SecAggServiceServicer_to_server(
            coordinator.secure_rounds.service, self._server
        )
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._server.start()
        self._ticker = asyncio.create_task(self._tick_forever())
        log.info("coordinator listening on %s", self.address)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(tick_interval_s)
            try:
                self.coordinator.tick()
            except Exception:  # a failing tick must not kill the server; it is logged
                log.exception("deadline tick failed")

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        await self._server.stop(grace_s)

    async def wait(self) -> None:
        await self._server.wait_for_termination()
