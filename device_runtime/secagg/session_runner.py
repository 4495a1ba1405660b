"""Runs one secure-aggregation session for a device over gRPC (SecAggService).

The device sends each stage's message with its long poll for the next server message (one
call, one round trip; the masked input streams on its own call); a DEADLINE_EXCEEDED poll is
simply repeated, without the message it already delivered, until `session_timeout_s`. In a
coordinator round the device advertises its keys to the pending session with its poll for the
session to open and R0 to close (`await_share_keys_request`), and goes on from SHARE_KEYS.
Sharing and masking run in a worker thread, off the event loop. A server Abort, or a server
message this device refuses (it then tells the server it aborts), ends the run with
SecAggAborted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
import numpy as np

from device_runtime import constants
from device_runtime.identity import DeviceKey
from device_runtime.secagg import masking
from device_runtime.secagg.client import EarlyAdvertisement, SecAggClient
from device_runtime.secagg.errors import SecAggAborted
from device_runtime.transport import TransportError
from protos import secagg_pb2, secagg_pb2_grpc

session_timeout_s = 600.0


async def _poll(
    stub: secagg_pb2_grpc.SecAggServiceStub,
    config: secagg_pb2.SecAggSessionConfig,
    after: secagg_pb2.SecAggStage,
    sending: secagg_pb2.SecAggClientMessage | None = None,
) -> secagg_pb2.SecAggServerMessage:
    """Long-polls for the server message of the stage after `after`, first sending this
    device's `sending` in the same call. A poll the server ended DEADLINE_EXCEEDED had taken
    the message, so it is polled again without it. Raises TransportError."""
    request = secagg_pb2.AwaitServerMessageRequest(
        protocol_version=constants.PROTOCOL_VERSION,
        session_id=config.session_id,
        client_id=config.client_id,
        session_token=config.session_token,
        after_stage=after,
        message=sending,
    )
    give_up = time.monotonic() + session_timeout_s
    while True:
        try:
            return await stub.AwaitServerMessage(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() < give_up:
                request.ClearField("message")
                continue
            raise TransportError(exc.code(), exc.details() or "") from exc


async def _poll_pending(
    channel: grpc.aio.Channel,
    enrollment: secagg_pb2.SecAggSessionConfig,
    after: secagg_pb2.SecAggStage,
    sending: secagg_pb2.SecAggClientMessage | None = None,
) -> secagg_pb2.SecAggServerMessage:
    """Long-polls a session the device was enrolled in before it opened. Raises
    TransportError, or SecAggAborted when the server aborted the session."""
    stub = secagg_pb2_grpc.SecAggServiceStub(channel)
    message = await _poll(stub, enrollment, after, sending)
    if message.WhichOneof("message") == "abort":
        raise SecAggAborted(f"server aborted: {message.abort.reason}")
    return message


async def await_session_config(
    channel: grpc.aio.Channel, enrollment: secagg_pb2.SecAggSessionConfig
) -> secagg_pb2.SecAggSessionConfig:
    """The complete config of a session the device was enrolled in before it opened (see
    "Enrollment in a round" in protos/secagg.proto). Raises TransportError, or SecAggAborted
    when the server answers with a config for another device."""
    message = await _poll_pending(channel, enrollment, secagg_pb2.STAGE_UNSPECIFIED)
    return _checked_config(message.session_config, enrollment)


async def await_share_keys_request(
    channel: grpc.aio.Channel,
    enrollment: secagg_pb2.SecAggSessionConfig,
    advertisement: EarlyAdvertisement | None = None,
) -> secagg_pb2.ShareKeysRequest:
    """For a device that advertised early: its ShareKeysRequest, once the session opened and
    R0 closed, with the complete session config in it. `advertisement`: not sent yet, so it
    goes with the poll (None: sent before, alone with Send). Raises as `await_session_config`,
    and TransportError when the advertisement is refused (e.g. FAILED_PRECONDITION once R0
    closed without this device)."""
    sending = advertisement.message if advertisement is not None else None
    message = await _poll_pending(channel, enrollment, secagg_pb2.ADVERTISE_KEYS, sending)
    if message.WhichOneof("message") != "share_keys_request":
        raise SecAggAborted("the server answered the key advertisement with another stage")
    _checked_config(message.share_keys_request.session_config, enrollment)
    return message.share_keys_request


def _checked_config(
    config: secagg_pb2.SecAggSessionConfig, enrollment: secagg_pb2.SecAggSessionConfig
) -> secagg_pb2.SecAggSessionConfig:
    if (config.session_id, config.client_id, config.session_token) != (
        enrollment.session_id,
        enrollment.client_id,
        enrollment.session_token,
    ) or (config.modulus_bits, config.vector_length) != (
        enrollment.modulus_bits,
        enrollment.vector_length,
    ):
        raise SecAggAborted("the session config does not match this device's enrollment")
    return config


class SecAggSessionRunner:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        config: secagg_pb2.SecAggSessionConfig,
        device_key: DeviceKey | None = None,
        advertised: EarlyAdvertisement | None = None,
    ) -> None:
        """`advertised`: sent with `advertise_early`; the runner then starts at `share_keys`."""
        self._stub = secagg_pb2_grpc.SecAggServiceStub(channel)
        self.client = SecAggClient(config, device_key, advertised)
        self._config = config
        self.sent_bytes = advertised.message.ByteSize() if advertised is not None else 0
        # Polled for with this device's shares (share_keys), before the input was ready.
        self._masked_input_request: secagg_pb2.MaskedInputRequest | None = None

    async def _send(self, message: secagg_pb2.SecAggClientMessage) -> None:
        self.sent_bytes += message.ByteSize()
        try:
            await self._stub.Send(message, timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc

    async def _await(
        self,
        after: secagg_pb2.SecAggStage,
        sending: secagg_pb2.SecAggClientMessage | None = None,
    ) -> secagg_pb2.SecAggServerMessage:
        """The server message of the stage after `after`; `sending` (this device's message of
        `after`) goes in the same call."""
        if sending is not None:
            self.sent_bytes += sending.ByteSize()
        message = await _poll(self._stub, self._config, after, sending)
        if message.WhichOneof("message") == "abort":
            self.client.server_aborted(message.abort.reason)
            raise SecAggAborted(f"server aborted: {message.abort.reason}")
        return message

    async def _refuse(self, exc: SecAggAborted) -> NoReturn:
        await self._send(self.client.abort_message())
        raise exc

    async def _send_masked_input(self, masked: np.ndarray) -> None:
        payload = masking.to_bytes(masked)
        header = secagg_pb2.MaskedInputHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            session_id=self._config.session_id,
            client_id=self._config.client_id,
            session_token=self._config.session_token,
            vector_length=masked.size,
        )
        chunks = [secagg_pb2.MaskedInputChunk(header=header)]
        for start in range(0, len(payload), constants.chunk_size_bytes):
            data = payload[start : start + constants.chunk_size_bytes]
            chunks.append(secagg_pb2.MaskedInputChunk(data=data))
        self.sent_bytes += sum(c.ByteSize() for c in chunks)

        async def stream() -> AsyncIterator[secagg_pb2.MaskedInputChunk]:
            for chunk in chunks:
                yield chunk

        try:
            await self._stub.SendMaskedInput(stream(), timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc

    async def advertise_and_share_keys(self) -> None:
        """R0 and R1; may run before the input is ready (e.g. while training)."""
        message = self.client.envelope()
        message.advertise_keys.CopyFrom(self.client.advertise_keys())
        request = (await self._await(secagg_pb2.ADVERTISE_KEYS, message)).share_keys_request
        await self.share_keys(request)

    async def share_keys(self, request: secagg_pb2.ShareKeysRequest | None = None) -> None:
        """R1, once this device's keys are advertised; `request` if already polled for. The
        shares go with the poll for the masked-input request, kept for `send_masked_input`:
        so this returns once R1 closed."""
        if request is None:
            request = (await self._await(secagg_pb2.ADVERTISE_KEYS)).share_keys_request
        try:
            shares = await asyncio.to_thread(self.client.share_keys, request)
        except SecAggAborted as exc:
            await self._refuse(exc)
        message = self.client.envelope()
        message.share_keys.CopyFrom(shares)
        self._masked_input_request = (
            await self._await(secagg_pb2.SHARE_KEYS, message)
        ).masked_input_request

    async def contribute(self, quantized: np.ndarray) -> secagg_pb2.SessionResult:
        """R2 and R3: send the masked input, help unmask, return the session's result."""
        await self.send_masked_input(quantized)
        return await self.unmask()

    async def send_masked_input(self, quantized: np.ndarray) -> None:
        """R2: masks the input and sends it."""
        request = self._masked_input_request
        if request is None:
            request = (await self._await(secagg_pb2.SHARE_KEYS)).masked_input_request
        try:
            masked = await asyncio.to_thread(self.client.masked_input, request, quantized)
        except SecAggAborted as exc:
            await self._refuse(exc)
        await self._send_masked_input(masked)

    async def unmask(self) -> secagg_pb2.SessionResult:
        """R3: reveals the shares the server asks for; returns the session's result."""
        await self.reveal_shares()
        return (await self._await(secagg_pb2.UNMASKING)).result

    async def reveal_shares(self) -> None:
        """R3 without waiting for the session's end: this device's part is done once its
        shares are taken (the session completes, or aborts, without it)."""
        request = await self._await(secagg_pb2.MASKED_INPUT_COLLECTION)
        try:
            response = self.client.unmasking_response(request.unmasking_request)
        except SecAggAborted as exc:
            await self._refuse(exc)
        message = self.client.envelope()
        message.unmasking_response.CopyFrom(response)
        await self._send(message)
