"""The device's side of the wire protocol: gRPC (asyncio) calls to the coordinator.

The client holds the device's key (device_runtime/identity.py): it enrolls it, and signs every
check-in, upload header and failure report with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import numpy as np

from device_runtime import constants, identity
from device_runtime.aggregation.client import EncodedUpload
from device_runtime.channel import ServerTrust, open_channel
from protos import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger(__name__)


class TransportError(RuntimeError):
    """A call to the coordinator failed; `code` is the gRPC status code."""

    def __init__(
        self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        # From an UNAVAILABLE answer's `retry-after-s` trailing metadata: when to come back.
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> TransportError:
        retry_after_s = None
        for key, value in exc.trailing_metadata() or ():
            if key == constants.retry_after_metadata:
                # A malformed hint is no hint: the device's own backoff applies.
                with contextlib.suppress(ValueError):
                    retry_after_s = min(float(value), constants.unreachable_backoff_max_s)
        return cls(exc.code(), exc.details() or "", retry_after_s)


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", constants.max_message_bytes),
        ("grpc.max_receive_message_length", constants.max_message_bytes),
    ]


@dataclasses.dataclass
class TransferCounters:
    downloaded_bytes: int = 0
    uploaded_bytes: int = 0


class CoordinatorClient:
    """Talks to one coordinator over one channel. Methods raise TransportError on failure.

    Opens its own channel to `target` under `trust` (TLS against the system trust store by
    default), unless it is given a `channel` to share (see `device_runtime.channel`).
    `key`: the device's key (default: a fresh one, for tests and one-off tools).
    `wall_clock`: Unix time, to which the offset learned at enrollment is added."""

    def __init__(
        self,
        target: str,
        trust: ServerTrust | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        key: identity.DeviceKey | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._channel = channel or open_channel(target, trust or ServerTrust(), channel_options())
        self._stub = device_pb2_grpc.DeviceServiceStub(self._channel)
        self.counters = TransferCounters()
        self.key = key or identity.DeviceKey.generate()
        self._wall_clock = wall_clock
        self._clock_offset_s = 0.0  # coordinator clock minus ours, learned at enrollment

    @property
    def device_id(self) -> str:
        return self.key.device_id

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel, shared with the SecAggService calls of secure rounds."""
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    async def enroll(
        self, population: str, secret: bytes = b"", attestation_chain: Sequence[bytes] = ()
    ) -> device_pb2.EnrollResponse:
        """Enrolls this client's key with the population (idempotent), and learns the
        coordinator's clock."""
        request = device_pb2.EnrollRequest(
            protocol_version=constants.PROTOCOL_VERSION,
            population=population,
            public_key=self.key.public_key_der,
            enrollment_secret=secret,
            attestation_chain=list(attestation_chain),
        )
        request.signature = self.key.sign(identity.enroll_signed_bytes(request))
        try:
            response = await self._stub.Enroll(request, timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError.from_rpc(exc) from exc
        self._clock_offset_s = response.server_time_s - self._wall_clock()
        return response

    def signed_check_in(self, population: str, example_count: int) -> device_pb2.CheckInRequest:
        request = device_pb2.CheckInRequest(
            protocol_version=constants.PROTOCOL_VERSION,
            population=population,
            runtime_version=constants.RUNTIME_VERSION,
            example_count=example_count,
        )
        identity.sign_check_in(self.key, request, self._wall_clock() + self._clock_offset_s)
        return request

    async def check_in(self, population: str, example_count: int) -> device_pb2.CheckInResponse:
        request = self.signed_check_in(population, example_count)
        try:
            return await self._stub.CheckIn(request, timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError.from_rpc(exc) from exc

    async def download(self, ref: common_pb2.ResourceRef) -> bytes:
        """Downloads a resource in chunks and checks it against its hash.

        A download that breaks off UNAVAILABLE after its first chunk (its coordinator went
        away) starts again, on the next coordinator, `failover_attempts` times in all: gRPC
        replays a call only until its first answer arrives (device_runtime/channel.py)."""
        request = device_pb2.DownloadRequest(
            protocol_version=constants.PROTOCOL_VERSION, sha256=ref.sha256
        )
        for attempts_left in reversed(range(constants.failover_attempts)):
            parts: list[bytes] = []
            try:
                async for chunk in self._stub.Download(request, timeout=constants.rpc_timeout_s):
                    parts.append(chunk.data)
                    self.counters.downloaded_bytes += len(chunk.data)
                break
            except grpc.aio.AioRpcError as exc:
                broken_off = bool(parts) and exc.code() is grpc.StatusCode.UNAVAILABLE
                if not broken_off or not attempts_left:
                    raise TransportError(exc.code(), exc.details() or "") from exc
                log.info("download of %s broke off (%s); starting again", ref.sha256, exc.details())
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise TransportError(
                grpc.StatusCode.DATA_LOSS, f"resource {ref.sha256} arrived corrupted"
            )
        return data

    async def upload(
        self,
        token: bytes,
        update: np.ndarray | EncodedUpload,
        example_count: int,
        metrics: common_pb2.ClientMetrics,
    ) -> device_pb2.UploadResponse:
        """Uploads a raw float32 delta, or an update the aggregator's client half encoded."""
        if isinstance(update, np.ndarray):
            update = EncodedUpload(
                np.ascontiguousarray(update, dtype="<f4").tobytes(),
                constants.UPDATE_ENCODING_FLOAT32_DELTA,
                int(update.size),
            )
        payload = update.payload
        header = device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            example_count=example_count,
            num_elements=update.num_elements,
            encoding=update.encoding,
            metrics=metrics,
        )
        header.device_signature = self.key.sign(identity.upload_signed_bytes(header))

        async def chunks() -> AsyncIterator[device_pb2.UploadChunk]:
            yield device_pb2.UploadChunk(header=header)
            for start in range(0, len(payload), constants.chunk_size_bytes):
                yield device_pb2.UploadChunk(
                    data=payload[start : start + constants.chunk_size_bytes]
                )

        try:
            response = await self._stub.UploadUpdate(chunks(), timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc
        self.counters.uploaded_bytes += len(payload)
        return response

    async def report_evaluation(
        self, token: bytes, example_count: int, metrics: common_pb2.ClientMetrics
    ) -> device_pb2.UploadResponse:
        """Federated evaluation: the report is the header's metrics; there is no payload."""
        return await self._report_without_payload(
            token, example_count, metrics, constants.REPORT_ENCODING_EVALUATION, 0
        )

    async def report_secure_update(
        self, token: bytes, example_count: int, num_elements: int, metrics: common_pb2.ClientMetrics
    ) -> device_pb2.UploadResponse:
        """A secure round: the update went masked through SecAggService; this reports the
        training metrics (accepted once the masked input is in the session's sum)."""
        return await self._report_without_payload(
            token, example_count, metrics, constants.UPDATE_ENCODING_SECURE_SUM, num_elements
        )

    async def _report_without_payload(
        self,
        token: bytes,
        example_count: int,
        metrics: common_pb2.ClientMetrics,
        encoding: str,
        num_elements: int,
    ) -> device_pb2.UploadResponse:
        header = device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            example_count=example_count,
            num_elements=num_elements,
            encoding=encoding,
            metrics=metrics,
        )
        header.device_signature = self.key.sign(identity.upload_signed_bytes(header))

        async def chunks() -> AsyncIterator[device_pb2.UploadChunk]:
            yield device_pb2.UploadChunk(header=header)

        try:
            return await self._stub.UploadUpdate(chunks(), timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc

    async def report_failure(
        self, token: bytes, cause: device_pb2.FailureReport.Cause, message: str
    ) -> device_pb2.FailureAck:
        request = device_pb2.FailureReport(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            cause=cause,
            message=message,
        )
        request.device_signature = self.key.sign(identity.failure_signed_bytes(request))
        try:
            return await self._stub.ReportFailure(request, timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc
