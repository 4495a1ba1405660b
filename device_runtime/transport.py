"""The device's side of the wire protocol: gRPC (asyncio) calls to the coordinator."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator

import grpc
import numpy as np

from device_runtime import constants
from protos import common_pb2, device_pb2, device_pb2_grpc


class TransportError(RuntimeError):
    """A call to the coordinator failed; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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
    """Talks to one coordinator over one channel. Methods raise TransportError on failure."""

    def __init__(self, target: str, channel: grpc.aio.Channel | None = None) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target, options=channel_options())
        self._stub = device_pb2_grpc.DeviceServiceStub(self._channel)
        self.counters = TransferCounters()

    async def close(self) -> None:
        await self._channel.close()

    async def check_in(
        self, population: str, device_id: str, example_count: int
    ) -> device_pb2.CheckInResponse:
        request = device_pb2.CheckInRequest(
            protocol_version=constants.PROTOCOL_VERSION,
            population=population,
            device_id=device_id,
            runtime_version=constants.RUNTIME_VERSION,
            example_count=example_count,
        )
        try:
            return await self._stub.CheckIn(request, timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc

    async def download(self, ref: common_pb2.ResourceRef) -> bytes:
        """Downloads a resource in chunks and checks it against its hash."""
        request = device_pb2.DownloadRequest(
            protocol_version=constants.PROTOCOL_VERSION, sha256=ref.sha256
        )
        parts: list[bytes] = []
        try:
            async for chunk in self._stub.Download(request, timeout=constants.rpc_timeout_s):
                parts.append(chunk.data)
                self.counters.downloaded_bytes += len(chunk.data)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise TransportError(
                grpc.StatusCode.DATA_LOSS, f"resource {ref.sha256} arrived corrupted"
            )
        return data

    async def upload(
        self,
        token: bytes,
        delta: np.ndarray,
        example_count: int,
        metrics: common_pb2.ClientMetrics,
    ) -> device_pb2.UploadResponse:
        payload = np.ascontiguousarray(delta, dtype="<f4").tobytes()
        header = device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            example_count=example_count,
            num_elements=int(delta.size),
            encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
            metrics=metrics,
        )

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
        header = device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            example_count=example_count,
            num_elements=0,
            encoding=constants.REPORT_ENCODING_EVALUATION,
            metrics=metrics,
        )

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
        try:
            return await self._stub.ReportFailure(request, timeout=constants.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise TransportError(exc.code(), exc.details() or "") from exc
