"""gRPC (asyncio) front of the coordinator: the device and admin services.

All CoordinatorErrors become gRPC statuses through `server.errors.abort_on_error`, the one
mapping every service (SecAggService too) uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import grpc

from device_runtime import constants as protocol
from protos import (
    admin_pb2,
    admin_pb2_grpc,
    device_pb2,
    device_pb2_grpc,
    secagg_pb2,
    secagg_pb2_grpc,
)
from server import limits
from server.aggregation import Buffer
from server.config import TaskConfig
from server.coordinator import Coordinator, TaskRuntime, check_protocol_version
from server.drain import DrainGate
from server.errors import (
    CoordinatorError,
    InvalidArgument,
    ResourceExhausted,
    abort_on_error,
    refuse,
)
from server.health import ListenerHealth, enable_reflection
from server.operator_access import AdminTokens, OperatorAuthentication
from server.replica_status import cluster_status
from server.request_guard import RequestGuard
from server.round_feed import RoundFeed
from server.rounds.round import RoundInProgress
from server.store import RoundRecord, TaskState
from server.transport_security import ServerTls
from server.upload_slots import UploadSlots

log = logging.getLogger(__name__)
T = TypeVar("T")

DEVICE_SERVICE = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name
SECAGG_SERVICE = secagg_pb2.DESCRIPTOR.services_by_name["SecAggService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
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


def _upload_header(first: UploadPart | None) -> tuple[device_pb2.UploadHeader, int]:
    """The header an upload stream must start with, and its wire size."""
    if first is None:
        raise InvalidArgument("empty upload stream")
    if not isinstance(first, device_pb2.UploadChunk) or first.WhichOneof("part") != "header":
        raise InvalidArgument("an upload must start with an UploadHeader")
    return first.header, first.ByteSize()


async def _receive_payload(
    parts: AsyncIterator[UploadPart], expected: int
) -> tuple[list[Buffer], int]:
    """Collects the payload a header announced, as received (large data chunks stay views
    into gRPC's message bytes: see PayloadChunks), and its wire size."""
    payload = PayloadChunks()
    wire_bytes = 0
    async for part in parts:
        if isinstance(part, device_pb2.UploadChunk):
            if part.WhichOneof("part") != "data":
                raise InvalidArgument("an upload has exactly one header, first")
            data: Buffer = part.data
        else:
            data = part
        if len(data) > protocol.max_upload_chunk_bytes:
            raise ResourceExhausted(
                f"upload chunk of {len(data)} bytes exceeds the "
                f"{protocol.max_upload_chunk_bytes}-byte limit; send smaller chunks"
            )
        if payload.size + len(data) > expected:
            raise ResourceExhausted(f"payload exceeds the {expected} bytes the header announced")
        wire_bytes += data_chunk_wire_bytes(len(data))
        payload.add(data)
    return payload.finish(), wire_bytes


class DeviceService(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, coordinator: Coordinator, max_concurrent_uploads: int = 2) -> None:
        self._coordinator = coordinator
        self.upload_slots = UploadSlots(max_concurrent_uploads)

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
        # Streaming handler: errors are mapped inline (the decorator wraps the others).
        try:
            check_protocol_version(request.protocol_version)
            data = self._coordinator.resource(request.sha256)
        except CoordinatorError as exc:
            refuse("Download", exc, context)
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
        # The header is read and checked before the upload takes a slot: a stream without a
        # valid upload token holds nothing. At most `max_concurrent_uploads` payloads are
        # then held at once; further streams wait unread, and HTTP/2 flow control holds their
        # senders back. Memory stays O(model * max_concurrent_uploads) however many devices
        # upload together. A stream that goes idle is cancelled by the request guard
        # (server/request_guard.py), which frees its slot.
        #
        # The update is added on the event loop, straight from the received chunks (numpy,
        # ~1 ms for a 6.65 MB update). A worker thread measured slower: each numpy call
        # returning to Python waits for the GIL the busy loop holds (up to the 5 ms switch
        # interval).
        parts = aiter(request_iterator)
        header, header_bytes = _upload_header(await anext(parts, None))
        expected = self._coordinator.check_upload_header(header)
        async with self.upload_slots:
            chunks, payload_bytes = await _receive_payload(parts, expected)
            return self._coordinator.accept_upload(header, chunks, header_bytes + payload_bytes)

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
        state=task.status,
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
        self.round_feed = RoundFeed(coordinator)

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
    async def GetCluster(
        self, request: admin_pb2.GetClusterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Cluster:
        check_protocol_version(request.protocol_version)
        return cluster_status(self._coordinator)

    @abort_on_error
    async def ListRounds(
        self, request: admin_pb2.ListRoundsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRoundsResponse:
        check_protocol_version(request.protocol_version)
        rounds = self._coordinator.rounds(request.task_id)
        return admin_pb2.ListRoundsResponse(rounds=[round_summary(r) for r in rounds])

    @abort_on_error
    async def PauseTask(
        self, request: admin_pb2.PauseTaskRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.TaskStatus:
        check_protocol_version(request.protocol_version)
        return task_status(self._coordinator.control_task(request.task_id, TaskState.PAUSED))

    @abort_on_error
    async def ResumeTask(
        self, request: admin_pb2.ResumeTaskRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.TaskStatus:
        check_protocol_version(request.protocol_version)
        return task_status(self._coordinator.control_task(request.task_id, TaskState.RUNNING))

    @abort_on_error
    async def CancelTask(
        self, request: admin_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.TaskStatus:
        check_protocol_version(request.protocol_version)
        task = self._coordinator.control_task(request.task_id, TaskState.CANCELLED)
        self.round_feed.task_changed(request.task_id)  # a task without open rounds ends too
        return task_status(task)

    async def DownloadWeights(
        self, request: admin_pb2.DownloadWeightsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.WeightsChunk]:
        # Streaming: the request guard maps a CoordinatorError raised here to its status.
        check_protocol_version(request.protocol_version)
        task = self._coordinator.task(request.task_id)
        committed, sha256 = task.committed_rounds, task.weights_sha256
        data = self._coordinator.resource(sha256)
        for start in range(0, max(len(data), 1), protocol.chunk_size_bytes):
            yield admin_pb2.WeightsChunk(
                committed_rounds=committed,
                sha256=sha256,
                data=data[start : start + protocol.chunk_size_bytes],
                offset=start,
                total_size=len(data),
            )

    async def WatchRounds(
        self, request: admin_pb2.WatchRoundsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.RoundSummary]:
        # Streaming: the request guard maps a CoordinatorError raised here to its status.
        check_protocol_version(request.protocol_version)
        self._coordinator.task(request.task_id)  # NOT_FOUND before the stream opens
        # Headers at once: the caller knows the watch is established before any round closes.
        await context.send_initial_metadata(())
        async for record in self.round_feed.closed_rounds(request.task_id, request.after_round):
            yield round_summary(record)


def freeze_startup_heap() -> None:
    """Takes what start-up allocated (modules, gRPC, tasks and their models) out of the cyclic
    garbage collector's passes: it lives as long as the process, and full collections walking
    it paused the event loop for up to 182 ms with 10,000 emulated phones. For a serving
    process's entry point, once start-up is done; not for processes that run other work."""
    gc.collect()
    gc.freeze()


def _listen(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> str:
    """Binds `address` (TLS unless `credentials` is None) and returns host:port as bound."""
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return f"{address.rsplit(':', 1)[0]}:{port}"


def server_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    """Channel arguments of every coordinator listener (server/limits.py)."""
    return [
        # Per-method limits are enforced by the request guard; this is the largest of them.
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", protocol.max_message_bytes),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams_per_connection),
        ("grpc.keepalive_time_ms", limits.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", limits.keepalive_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", limits.min_client_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", limits.max_ping_strikes),
    ]


class CoordinatorServer:
    """The device listener, the admin listener and the round driver, on the current loop.

    Devices (DeviceService, SecAggService) and operators (AdminService) never share a port:
    the admin service answers only on `admin_address`, and only to an operator credential
    checked against `admin_tokens` (see server.operator_access). Without `admin_tokens` there
    is no admin listener at all. `tls` None means plaintext on both listeners (`--insecure`),
    which is logged as a warning at start. Both listeners carry grpc.health.v1 and the admin
    listener server reflection (server/health.py).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        address: str = "127.0.0.1:0",
        max_concurrent_uploads: int = 2,
        extra_options: list[tuple[str, int]] | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        *,
        tls: ServerTls | None,
        admin_address: str = "127.0.0.1:0",
        admin_tokens: AdminTokens | None = None,
        upload_idle_timeout_s: float = limits.upload_idle_timeout_s,
        admin_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        device_service: DeviceService | None = None,
        secagg_service: secagg_pb2_grpc.SecAggServiceServicer | None = None,
    ) -> None:
        """`device_service`, `secagg_service`: a replica's, which forward a secure task's
        calls to its host (server/replica_forwarding.py); by default the coordinator's own."""
        self.coordinator = coordinator
        self.tls = tls
        self.drain_gate = DrainGate()  # check-ins refused and calls counted for a drain
        self._server = grpc.aio.server(
            # The guard is innermost: it sees each method's own handler (request_guard.py).
            interceptors=[*interceptors, self.drain_gate, RequestGuard(upload_idle_timeout_s)],
            options=[*server_options(protocol.max_message_bytes), *(extra_options or [])],
        )
        self.device_service = device_service or DeviceService(coordinator, max_concurrent_uploads)
        add_device_service(self.device_service, self._server)
        secagg_pb2_grpc.add_SecAggServiceServicer_to_server(
            secagg_service or coordinator.secure_rounds.service, self._server
        )
        self._health = [ListenerHealth(self._server, (DEVICE_SERVICE, SECAGG_SERVICE))]
        self.address = _listen(
            self._server, address, tls.device_credentials() if tls is not None else None
        )
        self.port = int(self.address.rsplit(":", 1)[1])
        self._admin: grpc.aio.Server | None = None
        self.admin_service: AdminService | None = None
        self.admin_address: str | None = None
        if admin_tokens is not None:
            self._admin = grpc.aio.server(
                interceptors=[
                    *admin_interceptors,  # outermost: they see refused credentials too
                    OperatorAuthentication(
                        admin_tokens, tls is not None and tls.operator_ca is not None
                    ),
                    RequestGuard(upload_idle_timeout_s),  # innermost, as on the device port
                ],
                options=server_options(admin_max_message_bytes),
            )
            self.admin_service = AdminService(coordinator)
            admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin_service, self._admin)
            self._health.append(ListenerHealth(self._admin, (ADMIN_SERVICE,)))
            enable_reflection(self._admin, (ADMIN_SERVICE,))
            self.admin_address = _listen(
                self._admin, admin_address, tls.admin_credentials() if tls is not None else None
            )
        self._driver: asyncio.Task[None] | None = None

    @property
    def _servers(self) -> list[grpc.aio.Server]:
        return [self._server] + ([self._admin] if self._admin is not None else [])

    async def start(self) -> None:
        """Starts both listeners and the round driver. The coordinator was built on an open
        store with its tasks loaded, so health reports SERVING from here on."""
        for health in self._health:
            await health.not_yet_serving()
        for server in self._servers:
            await server.start()
        self._driver = asyncio.create_task(self.coordinator.driver.run())
        for health in self._health:
            await health.serving()
        if self.tls is None:
            log.warning(
                "plaintext listeners (--insecure): anyone on the network path can read and "
                "change every message, including admin tokens"
            )
        log.info(
            "coordinator listening on %s (devices), %s (admin); %s",
            self.address,
            self.admin_address or "no admin listener",
            "TLS" if self.tls is not None else "PLAINTEXT",
        )

    async def begin_drain(self) -> None:
        """From now on check-ins are rejected with a retry window and health reports
        NOT_SERVING on both listeners (server/drain.py)."""
        self.drain_gate.close()
        for health in self._health:
            await health.draining()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self.admin_service is not None:
            self.admin_service.round_feed.close()  # WatchRounds streams end UNAVAILABLE
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        await asyncio.gather(*(server.stop(grace_s) for server in self._servers))

    async def wait(self) -> None:
        await self._server.wait_for_termination()
