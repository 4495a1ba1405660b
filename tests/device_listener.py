"""More device listeners on one running coordinator: several addresses, one state.

This is how a device sees coordinator replicas: another address that answers for the same
rounds. Stopping a listener is a replica dying under its devices. (Replicas that share a
PostgreSQL store are the coordinator's business; the device side only needs the addresses.)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from device_runtime import constants
from server import limits
from server.coordinator import Coordinator
from server.grpc_service import DeviceService, add_device_service, server_options
from server.request_guard import RequestGuard
from tests.harness import loopback_tls


class DeviceListener:
    """DeviceService of `coordinator` on its own gRPC server (TLS with the loopback
    certificate), without the round driver: the coordinator's own server drives its rounds."""

    def __init__(
        self,
        coordinator: Coordinator,
        address: str = "127.0.0.1:0",
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._server = grpc.aio.server(
            interceptors=[*interceptors, RequestGuard(limits.upload_idle_timeout_s)],
            options=server_options(constants.max_message_bytes),
        )
        add_device_service(DeviceService(coordinator), self._server)
        port = self._server.add_secure_port(address, loopback_tls().device_credentials())
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = f"{address.rsplit(':', 1)[0]}:{port}"

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        """Closes every connection at once, cancelling calls in flight: a replica dying."""
        await self._server.stop(None)


@contextlib.asynccontextmanager
async def device_listener(
    coordinator: Coordinator,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    address: str = "127.0.0.1:0",
) -> AsyncIterator[DeviceListener]:
    listener = DeviceListener(coordinator, address, interceptors)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class CallLog(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The device methods a listener was called for, in order."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        self.methods.append(details.method.rsplit("/", 1)[-1])  # type: ignore[attr-defined]
        return await continuation(details)


class FirstUploadAnswerLost(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The coordinator records the first upload, then the call ends UNAVAILABLE without its
    answer: a coordinator that died between recording an update and answering it. Share one
    instance between listeners; `uploads` counts the upload calls that reached any of them."""

    def __init__(self) -> None:
        self.uploads = 0

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or not method.endswith("/UploadUpdate"):
            return handler
        record = handler.stream_unary

        async def lose_the_first_answer(
            requests: object, context: grpc.aio.ServicerContext
        ) -> object:
            self.uploads += 1
            response = await record(requests, context)
            if self.uploads == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "gone before answering")
            return response

        return grpc.stream_unary_rpc_method_handler(
            lose_the_first_answer,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class FirstDownloadBrokenOff(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The first download sends its first chunk, then the call ends UNAVAILABLE: a coordinator
    that died mid-stream. Share one instance between listeners; `downloads` counts the
    download calls that reached any of them."""

    def __init__(self) -> None:
        self.downloads = 0

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or not method.endswith("/Download"):
            return handler
        stream = handler.unary_stream

        async def break_off_the_first(
            request: object, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[object]:
            self.downloads += 1
            broken = self.downloads == 1
            async for chunk in stream(request, context):
                yield chunk
                if broken:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "gone mid-stream")

        return grpc.unary_stream_rpc_method_handler(
            break_off_the_first,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
