"""gRPC (asyncio) front of secure aggregation: SecAggService over the sessions it hosts.

The coordinator creates a SecAggServer per round, `add_session`s it here, hands each selected
device its `session_config`, and calls `close_stage` when a stage's deadline passes. Message
handling that may close a stage runs in a worker thread (unmasking a large vector takes
seconds), one call at a time per session. Status codes are those of protos/secagg.proto.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc

from device_runtime import constants
from device_runtime.secagg import masking
from device_runtime.secagg.errors import SecAggError
from protos import secagg_pb2, secagg_pb2_grpc
from server.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from server.grpc_service import _abort_on_error
from server.secagg.server import SecAggServer

log = logging.getLogger(__name__)
T = TypeVar("T")
# A long poll returns DEADLINE_EXCEEDED after this long; the device simply polls again.
await_server_message_s = 20.0
_terminal = (secagg_pb2.COMPLETED, secagg_pb2.ABORTED)


@dataclasses.dataclass
class _HostedSession:
    server: SecAggServer
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    changed: asyncio.Condition = dataclasses.field(default_factory=asyncio.Condition)


def _check_version(version: int) -> None:
    if version != constants.PROTOCOL_VERSION:
        raise FailedPrecondition(
            f"protocol version {version} is not spoken; this server speaks "
            f"{constants.PROTOCOL_VERSION}"
        )


class SecAggService(secagg_pb2_grpc.SecAggServiceServicer):
    def __init__(self) -> None:
        self._sessions: dict[bytes, _HostedSession] = {}

    def add_session(self, server: SecAggServer) -> None:
        self._sessions[server.session_id] = _HostedSession(server)

    def remove_session(self, session_id: bytes) -> None:
        self._sessions.pop(session_id, None)

    def _session(self, session_id: bytes) -> _HostedSession:
        hosted = self._sessions.get(session_id)
        if hosted is None:
            raise Unauthenticated("unknown secure-aggregation session")
        return hosted

    async def _apply(self, hosted: _HostedSession, call: Callable[[], T]) -> T:
        async with hosted.lock:
            try:
                return await asyncio.to_thread(call)
            finally:
                async with hosted.changed:
                    hosted.changed.notify_all()

    async def close_stage(self, session_id: bytes) -> secagg_pb2.SecAggStage:
        """The current stage's deadline passed: devices that stayed silent are dropped."""
        hosted = self._session(session_id)
        return await self._apply(hosted, hosted.server.close_stage)

    @_abort_on_error
    async def Send(
        self, request: secagg_pb2.SecAggClientMessage, context: grpc.aio.ServicerContext
    ) -> secagg_pb2.SecAggAck:
        hosted = self._session(request.session_id)
        stage = await self._apply(hosted, lambda: hosted.server.receive(request))
        return secagg_pb2.SecAggAck(stage=stage)

    @_abort_on_error
    async def SendMaskedInput(
        self,
        request_iterator: AsyncIterator[secagg_pb2.MaskedInputChunk],
        context: grpc.aio.ServicerContext,
    ) -> secagg_pb2.SecAggAck:
        header: secagg_pb2.MaskedInputHeader | None = None
        parts: list[bytes] = []
        received = 0
        async for chunk in request_iterator:
            if header is None:
                if chunk.WhichOneof("part") != "header":
                    raise InvalidArgument("a masked input must start with a MaskedInputHeader")
                header = chunk.header
                _check_version(header.protocol_version)
                hosted = self._session(header.session_id)
                if header.vector_length != hosted.server.vector_length:
                    raise InvalidArgument(
                        f"the session sums {hosted.server.vector_length} elements, "
                        f"the header announces {header.vector_length}"
                    )
                continue
            if chunk.WhichOneof("part") != "data":
                raise InvalidArgument("a masked input has exactly one header, first")
            received += len(chunk.data)
            if received > 4 * header.vector_length:
                raise ResourceExhausted("masked input exceeds the size its header announced")
            parts.append(chunk.data)
        if header is None:
            raise InvalidArgument("empty masked-input stream")
        hosted = self._session(header.session_id)
        try:
            vector = masking.from_bytes(
                b"".join(parts), header.vector_length, hosted.server.modulus_bits
            )
        except SecAggError as exc:
            raise InvalidArgument(str(exc)) from exc
        h = header
        stage = await self._apply(
            hosted,
            lambda: hosted.server.receive_masked_input(
                h.session_id, h.client_id, h.session_token, vector
            ),
        )
        return secagg_pb2.SecAggAck(stage=stage)

    @_abort_on_error
    async def AwaitServerMessage(
        self, request: secagg_pb2.AwaitServerMessageRequest, context: grpc.aio.ServicerContext
    ) -> secagg_pb2.SecAggServerMessage:
        _check_version(request.protocol_version)
        hosted = self._session(request.session_id)
        server = hosted.server
        server.check_credentials(request.session_id, request.client_id, request.session_token)

        def ready() -> bool:
            return server.stage != request.after_stage or server.stage in _terminal

        async with hosted.changed:
            try:
                await asyncio.wait_for(hosted.changed.wait_for(ready), await_server_message_s)
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"stage {secagg_pb2.SecAggStage.Name(server.stage)} is still open; poll again",
                )
        return server.server_message(request.session_id, request.client_id, request.session_token)
