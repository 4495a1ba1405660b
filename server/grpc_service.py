"""gRPC (asyncio) front of the coordinator: the device and admin services.

All CoordinatorErrors become gRPC statuses through `server.errors.abort_on_error`, the one
mapping every service (SecAggService too) uses.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import grpc

from device_runtime import constants as protocol
from protos import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc, secagg_pb2_grpc
from server.aggregation import Buffer
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
DEVICE_SERVICE = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name
# The admin service takes whole models in one message; devices never send anything this big.
admin_max_message_bytes = 256 << 20


def data_chunk_wire_bytes(size: int) -> int:
    """Serialized size of an UploadChunk carrying `size` payload bytes (tag, length varint,
    bytes): what ByteSize() returns, without protobuf walking a 1 MiB field per chunk
    (0.15 ms each, ~1 ms per CNN-sized upload)."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


# What the UploadUpdate handler iterates: see `parse_upload_chunk`.
UploadPart = device_pb2.UploadChunk | memoryview


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    """The base-128 varint at `raw[at:]` and the offset after it (-1, -1 if malformed)."""
    value = shift = 0
    while at < len(raw) and shift < 64:
        byte = raw[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    return -1, -1


_DATA_TAG = (2 << 3) | 2  # UploadChunk.data: field 2, length-delimited


def parse_upload_chunk(raw: bytes) -> UploadPart:
    """UploadUpdate's request deserializer. A chunk that is exactly one `data` field (what
    devices send) becomes a view of its payload inside the received bytes: no protobuf
    message, no copy. Anything else (the header, or unusual encodings) is parsed by protobuf
    as usual, so the handler sees the same content either way."""
    if raw[:1] == bytes((_DATA_TAG,)):
        length, start = _varint(raw, 1)
        if start > 0 and start + length == len(raw):
            return memoryview(raw)[start:]
    return device_pb2.UploadChunk.FromString(raw)


class PayloadChunks:
    """One upload's payload as received. Chunks of at least `min_kept_bytes` are kept as they
    arrived (views into gRPC's message bytes, no copy); runs of smaller ones are copied
    together, so a sender of tiny chunks cannot make the list outgrow the payload."""

    min_kept_bytes = 64 << 10

    def __init__(self) -> None:
        self.size = 0
        self._parts: list[Buffer] = []
        self._small = bytearray()

    def add(self, data: Buffer) -> None:
        if len(data) >= self.min_kept_bytes:
            self._close_small_run()
            self._parts.append(data)
        else:
            self._small += data
        self.size += len(data)

    def finish(self) -> list[Buffer]:
        self._close_small_run()
        return self._parts

    def _close_small_run(self) -> None:
        if self._small:
            self._parts.append(memoryview(self._small))
            self._small = bytearray()


def add_device_service(service: DeviceService, server: grpc.aio.Server) -> None:
    """Registers the device service, with UploadUpdate reading chunks by `parse_upload_chunk`
    (the generated registration parses every chunk into a message, copying each payload)."""
    upload = grpc.stream_unary_rpc_method_handler(
        service.UploadUpdate,
        request_deserializer=parse_upload_chunk,
        response_serializer=device_pb2.UploadResponse.SerializeToString,
    )
    # Handlers are looked up in the order they were added: this one shadows the generated
    # UploadUpdate handler, which is registered next for the other methods.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(DEVICE_SERVICE, {"UploadUpdate": upload}),)
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(service, server)


class DeviceService(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, coordinator: Coordinator, max_concurrent_uploads: int = 2) -> None:
        self._coordinator = coordinator
        self._upload_slots = asyncio.Semaphore(max_concurrent_uploads)

    @abort_on_error
    async def Enroll(
        self, request: device_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.EnrollResponse:
        check_protocol_version(request.protocol_version)
        return self._coordinator.identities.enroll(request, context.peer())

    @abort_on_error
    async def CheckIn(
        self, request: device_pb2.CheckInRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.CheckInResponse:
        return self._coordinator.check_in(request, context.peer())

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
        request_iterator: AsyncIterator[UploadPart],
        context: grpc.aio.ServicerContext,
    ) -> device_pb2.UploadResponse:
        # At most `max_concurrent_uploads` payloads are held at once; further streams wait
        # unread, and HTTP/2 flow control holds their senders back. Memory stays
        # O(model * max_concurrent_uploads) however many devices upload together.
        #
        # The update is added on the event loop, straight from the received chunks (numpy,
        # ~1 ms for a 6.65 MB update). A worker thread measured slower: each numpy call
        # returning to Python waits for the GIL the busy loop holds (up to the 5 ms switch
        # interval). A slow sender holds its slot at most for its RPC deadline.
        async with self._upload_slots:
            header, chunks, wire_bytes = await self._receive_upload(request_iterator)
            return self._coordinator.accept_upload(header, chunks, wire_bytes)

    async def _receive_upload(
        self, request_iterator: AsyncIterator[UploadPart]
    ) -> tuple[device_pb2.UploadHeader, list[Buffer], int]:
        """Reads and checks the header, then collects the payload it announces, as received
        (large data chunks stay views into gRPC's message bytes: see PayloadChunks)."""
        header: device_pb2.UploadHeader | None = None
        payload = PayloadChunks()
        expected = wire_bytes = 0
        async for part in request_iterator:
            if isinstance(part, device_pb2.UploadChunk):
                kind = part.WhichOneof("part")
                if kind == "header" and header is None:
                    wire_bytes += part.ByteSize()
                    header = part.header
                    expected = self._coordinator.check_upload_header(header)
                    continue
                if kind != "data":
                    raise InvalidArgument(
                        "an upload has exactly one header, first"
                        if header is not None
                        else "an upload must start with an UploadHeader"
                    )
                data: Buffer = part.data
            else:
                data = part
            if header is None:
                raise InvalidArgument("an upload must start with an UploadHeader")
            if len(data) > protocol.max_upload_chunk_bytes:
                raise ResourceExhausted(
                    f"upload chunk of {len(data)} bytes exceeds the "
                    f"{protocol.max_upload_chunk_bytes}-byte limit; send smaller chunks"
                )
            if payload.size + len(data) > expected:
                raise ResourceExhausted(
                    f"payload exceeds the {expected} bytes the header announced"
                )
            wire_bytes += data_chunk_wire_bytes(len(data))
            payload.add(data)
        if header is None:
            raise InvalidArgument("empty upload stream")
        return header, payload.finish(), wire_bytes

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


def freeze_startup_heap() -> None:
    """Takes what start-up allocated (modules, gRPC, tasks and their models) out of the cyclic
    garbage collector's passes: it lives as long as the process, and full collections walking
    it paused the event loop for up to 182 ms with 10,000 emulated phones. For a serving
    process's entry point, once start-up is done; not for processes that run other work."""
    gc.collect()
    gc.freeze()


class CoordinatorServer:
    """The gRPC server plus the deadline ticker, on the current event loop."""

    def __init__(
        self,
        coordinator: Coordinator,
        address: str = "127.0.0.1:0",
        max_concurrent_uploads: int = 2,
        extra_options: list[tuple[str, int]] | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.coordinator = coordinator
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", admin_max_message_bytes),
                ("grpc.max_send_message_length", protocol.max_message_bytes),
                *(extra_options or []),
            ],
        )
        add_device_service(DeviceService(coordinator, max_concurrent_uploads), self._server)
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
