"""A replica's device-facing services when a secure task's call reaches a replica that does
not host the task's secure rounds: the call is forwarded, over gRPC on the internal channel, to
the replica that hosts them (docs/scaling.md, "Secure aggregation on replicas"; how, in
server/replica_forwarder.py).

- What is forwarded: a check-in the replica would have answered from a secure task's round
  (the host answers the whole check-in), an upload or failure report whose token belongs to
  a secure task, and every SecAggService call for a session this replica does not host.
  The coordinator decides (it raises HostedElsewhere); this layer only relays.
- A call that carries a valid forwarding assertion is never forwarded again: if leadership
  moved meanwhile, the replica answers UNAVAILABLE and the device retries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from device_runtime.channel import system_root_certificates
from protos import device_pb2, secagg_pb2, secagg_pb2_grpc
from server.errors import HostedElsewhere, Unavailable, abort_on_error
from server.grpc_service import DeviceService, UploadPart
from server.replica_coordinator import ReplicaCoordinator
from server.replica_forwarder import (
    CHECK_IN,
    REPORT_FAILURE,
    SECAGG_AWAIT,
    SECAGG_SEND,
    SECAGG_SEND_MASKED_INPUT,
    UPLOAD_UPDATE,
    Forwarder,
    forwarded_poll_margin_s,
)
from server.secagg.grpc_service import SecAggService, await_server_message_s

T = TypeVar("T")


def _not_hosted_here() -> Unavailable:
    return Unavailable(
        "this replica does not host the task's secure rounds now (its leadership moved); retry",
        retry_after_s=1.0,
    )


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


def _upload_part_bytes(part: UploadPart) -> bytes:
    if isinstance(part, device_pb2.UploadChunk):
        return part.SerializeToString()
    return device_pb2.UploadChunk(data=bytes(part)).SerializeToString()


class ForwardingDeviceService(DeviceService):
    """DeviceService of a replica: calls the coordinator refers to a secure task's host
    (HostedElsewhere) are relayed there."""

    def __init__(self, coordinator: Any, max_concurrent_uploads: int, forwarder: Forwarder) -> None:
        super().__init__(coordinator, max_concurrent_uploads)
        self._forwarder = forwarder

    @abort_on_error
    async def CheckIn(
        self, request: device_pb2.CheckInRequest, context: grpc.aio.ServicerContext
    ) -> device_pb2.CheckInResponse:
        asserted = self._forwarder.asserted_peer(context, CHECK_IN)
        try:
            peer = context.peer() if asserted is None else asserted
            return self._coordinator.check_in(request, peer)
        except HostedElsewhere as exc:
            if asserted is not None:
                raise _not_hosted_here() from None
            address = exc.address
        return await self._forwarder.unary(
            address, CHECK_IN, request, device_pb2.CheckInResponse, context
        )

    @abort_on_error
    async def UploadUpdate(
        self,
        request_iterator: AsyncIterator[UploadPart],
        context: grpc.aio.ServicerContext,
    ) -> device_pb2.UploadResponse:
        asserted = self._forwarder.asserted_peer(context, UPLOAD_UPDATE)
        parts = aiter(request_iterator)
        first = await anext(parts, None)
        if isinstance(first, device_pb2.UploadChunk) and first.WhichOneof("part") == "header":
            try:
                self._coordinator.check_upload_header(first.header)
            except HostedElsewhere as exc:
                if asserted is not None:
                    raise _not_hosted_here() from None
                return await self._forwarder.stream(
                    exc.address,
                    UPLOAD_UPDATE,
                    _prepend(first, parts),
                    _upload_part_bytes,
                    device_pb2.UploadResponse,
                    context,
                )
        chunks = parts if first is None else _prepend(first, parts)
        return await super().UploadUpdate(chunks, context)

    @abort_on_error
    async def ReportFailure(
        self, request: device_pb2.FailureReport, context: grpc.aio.ServicerContext
    ) -> device_pb2.FailureAck:
        asserted = self._forwarder.asserted_peer(context, REPORT_FAILURE)
        try:
            return self._coordinator.report_failure(request)
        except HostedElsewhere as exc:
            if asserted is not None:
                raise _not_hosted_here() from None
            address = exc.address
        return await self._forwarder.unary(
            address, REPORT_FAILURE, request, device_pb2.FailureAck, context
        )


class ForwardingSecAggService(secagg_pb2_grpc.SecAggServiceServicer):
    """SecAggService of a replica: sessions hosted here are served by `local`; a session
    another replica hosts is relayed there. `host_of(session_id)` is the host's address,
    None to answer here (hosted here, or unknown to every replica: `local` refuses it as a
    single coordinator would), or raises Unavailable (its task has no live host now)."""

    def __init__(
        self,
        local: SecAggService,
        host_of: Callable[[bytes], str | None],
        forwarder: Forwarder,
    ) -> None:
        self._local = local
        self._host_of = host_of
        self._forwarder = forwarder

    def _route(
        self, session_id: bytes, context: grpc.aio.ServicerContext, method: str
    ) -> str | None:
        if self._forwarder.asserted_peer(context, method) is not None:
            return None  # forwarded once already: answered here, whatever that is
        if self._local.hosts(session_id):
            return None
        return self._host_of(session_id)

    @abort_on_error
    async def Send(
        self, request: secagg_pb2.SecAggClientMessage, context: grpc.aio.ServicerContext
    ) -> secagg_pb2.SecAggAck:
        address = self._route(request.session_id, context, SECAGG_SEND)
        if address is None:
            return await self._local.Send(request, context)
        return await self._forwarder.unary(
            address, SECAGG_SEND, request, secagg_pb2.SecAggAck, context
        )

    @abort_on_error
    async def SendMaskedInput(
        self,
        request_iterator: AsyncIterator[secagg_pb2.MaskedInputChunk],
        context: grpc.aio.ServicerContext,
    ) -> secagg_pb2.SecAggAck:
        chunks = aiter(request_iterator)
        first = await anext(chunks, None)
        if first is None:
            return await self._local.SendMaskedInput(chunks, context)
        address = None
        if first.WhichOneof("part") == "header":
            address = self._route(first.header.session_id, context, SECAGG_SEND_MASKED_INPUT)
        if address is None:
            return await self._local.SendMaskedInput(_prepend(first, chunks), context)
        return await self._forwarder.stream(
            address,
            SECAGG_SEND_MASKED_INPUT,
            _prepend(first, chunks),
            secagg_pb2.MaskedInputChunk.SerializeToString,
            secagg_pb2.SecAggAck,
            context,
        )

    @abort_on_error
    async def AwaitServerMessage(
        self, request: secagg_pb2.AwaitServerMessageRequest, context: grpc.aio.ServicerContext
    ) -> secagg_pb2.SecAggServerMessage:
        address = self._route(request.session_id, context, SECAGG_AWAIT)
        if address is None:
            return await self._local.AwaitServerMessage(request, context)
        return await self._forwarder.unary(
            address,
            SECAGG_AWAIT,
            request,
            secagg_pb2.SecAggServerMessage,
            context,
            timeout_s=await_server_message_s + forwarded_poll_margin_s,
        )


@dataclasses.dataclass
class ReplicaFront:
    """What a replica's device listener serves (`overnight serve --replica`)."""

    coordinator: ReplicaCoordinator
    device_service: ForwardingDeviceService
    secagg_service: ForwardingSecAggService
    forwarder: Forwarder

    @classmethod
    def build(
        cls,
        coordinator: ReplicaCoordinator,
        max_concurrent_uploads: int,
        tls: bool,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
    ) -> ReplicaFront:
        """`tls` False: plaintext between replicas too (`--insecure`). Raises
        StoreUnavailable (the forwarding secret is read from the store)."""
        credentials = (
            grpc.ssl_channel_credentials(root_certificates or system_root_certificates())
            if tls
            else None
        )
        forwarder = Forwarder(coordinator.routes.forwarding_secret(), credentials, server_name)
        return cls(
            coordinator,
            ForwardingDeviceService(coordinator, max_concurrent_uploads, forwarder),
            ForwardingSecAggService(
                coordinator.secure_rounds.service, coordinator.secure_host_of_session, forwarder
            ),
            forwarder,
        )

    def publish(self, address: str) -> None:
        """The address other replicas forward to, from the next heartbeat on."""
        self.coordinator.address = address
        self.coordinator.forwarded_calls = lambda: self.forwarder.forwarded

    async def close(self) -> None:
        await self.forwarder.close()
