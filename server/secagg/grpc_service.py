"""gRPC (asyncio) front of secure aggregation: SecAggService over the sessions it hosts.

The coordinator `expect_session`s a round's session when it enrolls the first device (the
session is pending: only its id and tokens exist), `add_session`s the SecAggServer once
selection closed, and calls `close_stage` (or `apply`) when a stage's deadline passes. A
pending session takes AdvertiseKeys (key agreement overlaps selection and training), answers
AwaitServerMessage(after_stage = STAGE_UNSPECIFIED) with the device's full session config once
it opens, and (after_stage = ADVERTISE_KEYS) with its ShareKeysRequest once R0 closed, and
FAILED_PRECONDITION to everything else. A poll may carry the device's message of a stage,
taken first as Send takes it: one call and one round trip per stage instead of two.

Calls run one at a time per session. A call that may end the unmasking (it rebuilds the
secrets and expands the masks: O(n·m), seconds for a large vector) runs in a worker thread.
The rest is O(1), or one pass over the vector as parsing it was, and runs on the event loop:
there a thread hop costs more than the work, and waits for the GIL behind the other
coroutines. Status codes are those of protos/secagg.proto.
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
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    abort_on_error,
)
from server.secagg.server import SecAggServer, SessionEnrollment

log = logging.getLogger(__name__)
T = TypeVar("T")
# A long poll returns DEADLINE_EXCEEDED after this long; the device simply polls again.
await_server_message_s = 20.0
_terminal = (secagg_pb2.COMPLETED, secagg_pb2.ABORTED)
# What a device may wait for while its session is pending: the config, or (having advertised
# early) the ShareKeysRequest, which carries the config.
_pending_polls = (secagg_pb2.STAGE_UNSPECIFIED, secagg_pb2.ADVERTISE_KEYS)


@dataclasses.dataclass
class _HostedSession:
    enrollment: SessionEnrollment
    server_or_none: SecAggServer | None = None
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    changed: asyncio.Condition = dataclasses.field(default_factory=asyncio.Condition)

    @property
    def server(self) -> SecAggServer:
        if self.server_or_none is None:
            raise FailedPrecondition("the secure-aggregation session has not opened yet")
        return self.server_or_none


def _check_version(version: int) -> None:
    if version != constants.PROTOCOL_VERSION:
        raise FailedPrecondition(
            f"protocol version {version} is not spoken; this server speaks "
            f"{constants.PROTOCOL_VERSION}"
        )


class SecAggService(secagg_pb2_grpc.SecAggServiceServicer):
    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        """`on_change` runs on the event loop after any message or stage change was taken."""
        self._sessions: dict[bytes, _HostedSession] = {}
        self._on_change = on_change

    def expect_session(self, enrollment: SessionEnrollment) -> None:
        """Hosts a pending session: its devices may long-poll for their full config."""
        self._sessions.setdefault(enrollment.session_id, _HostedSession(enrollment))

    def add_session(self, server: SecAggServer) -> None:
        """Opens a session (pending or new); devices polling for its config are answered."""
        hosted = self._sessions.get(server.session_id)
        if hosted is None:
            hosted = _HostedSession(server.enrollment)
            self._sessions[server.session_id] = hosted
        hosted.server_or_none = server
        self._notify(hosted)

    def _notify(self, hosted: _HostedSession) -> None:
        async def wake() -> None:
            async with hosted.changed:
                hosted.changed.notify_all()

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop, so nobody is polling
        loop.create_task(wake())

    def hosts(self, session_id: bytes) -> bool:
        """Whether the session (pending, open or recently finished) is hosted here."""
        return session_id in self._sessions

    def remove_session(self, session_id: bytes) -> None:
        self._sessions.pop(session_id, None)

    def _session(self, session_id: bytes) -> _HostedSession:
        hosted = self._sessions.get(session_id)
        if hosted is None:
            raise Unauthenticated("unknown secure-aggregation session")
        return hosted

    async def _apply(
        self, hosted: _HostedSession, call: Callable[[], T], client_id: int | None = None
    ) -> T:
        """Runs `call` (a message from `client_id`, or a change with None) on the session."""
        async with hosted.lock:
            try:
                if hosted.server.unmasking_may_close(client_id):
                    return await asyncio.to_thread(call)
                return call()
            finally:
                async with hosted.changed:
                    hosted.changed.notify_all()
                if self._on_change is not None:
                    try:
                        self._on_change()
                    except Exception:  # the coordinator's reaction must not fail the RPC
                        log.exception("reacting to a secure-aggregation change failed")

    async def apply(self, session_id: bytes, action: Callable[[SecAggServer], T]) -> T:
        """Runs `action` on an open session, serialized with the devices' messages."""
        hosted = self._session(session_id)
        server = hosted.server
        return await self._apply(hosted, lambda: action(server))

    async def close_stage(
        self, session_id: bytes, stage: secagg_pb2.SecAggStage
    ) -> secagg_pb2.SecAggStage:
        """`stage`'s deadline passed: devices that stayed silent are dropped (no-op if the
        session already left `stage`)."""
        hosted = self._session(session_id)
        return await self._apply(hosted, lambda: hosted.server.close_stage(stage))

    async def _take(self, message: secagg_pb2.SecAggClientMessage) -> secagg_pb2.SecAggStage:
        """A device's message of a stage (Send, or one carried by AwaitServerMessage)."""
        hosted = self._session(message.session_id)
        if hosted.server_or_none is None:
            # On the event loop, so the session cannot open halfway through.
            hosted.enrollment.advertise_early(message)
            return secagg_pb2.ADVERTISE_KEYS
        return await self._apply(hosted, lambda: hosted.server.receive(message), message.client_id)

    @abort_on_error
    async def Send(
        self, request: secagg_pb2.SecAggClientMessage, context: grpc.aio.ServicerContext
    ) -> secagg_pb2.SecAggAck:
        return secagg_pb2.SecAggAck(stage=await self._take(request))

    @abort_on_error
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
            h.client_id,
        )
        return secagg_pb2.SecAggAck(stage=stage)

    @abort_on_error
    async def AwaitServerMessage(
        self, request: secagg_pb2.AwaitServerMessageRequest, context: grpc.aio.ServicerContext
    ) -> secagg_pb2.SecAggServerMessage:
        _check_version(request.protocol_version)
        hosted = self._session(request.session_id)
        hosted.enrollment.check_credentials(
            request.session_id, request.client_id, request.session_token
        )
        if request.HasField("message"):
            sent = request.message
            if (sent.session_id, sent.client_id) != (request.session_id, request.client_id):
                raise InvalidArgument(
                    "the message carried by a poll must be from the polling device's session "
                    "and client id"
                )
            await self._take(sent)
        if hosted.server_or_none is None and request.after_stage not in _pending_polls:
            raise FailedPrecondition("the secure-aggregation session has not opened yet")

        def ready() -> bool:
            server = hosted.server_or_none
            if server is None:
                return False
            if request.after_stage == secagg_pb2.STAGE_UNSPECIFIED:
                return True
            return server.stage != request.after_stage or server.stage in _terminal

        async with hosted.changed:
            try:
                await asyncio.wait_for(hosted.changed.wait_for(ready), await_server_message_s)
            except TimeoutError:
                stage = hosted.server_or_none.stage if hosted.server_or_none else 0
                raise DeadlineExceeded(
                    f"stage {secagg_pb2.SecAggStage.Name(stage)} is still open; poll again"
                ) from None
        server = hosted.server
        if request.after_stage == secagg_pb2.STAGE_UNSPECIFIED:
            server.check_credentials(request.session_id, request.client_id, request.session_token)
            return secagg_pb2.SecAggServerMessage(
                session_config=server.session_config(request.client_id)
            )
        return server.server_message(request.session_id, request.client_id, request.session_token)
