"""The one way our server interceptors wrap handlers: each guarded method's handler is wrapped
once, on its first call, and the wrapped handler is reused for every later call. The open
services (health, reflection: server/health.py) pass unwrapped."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from server.health import is_open_method


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Subclasses say how to wrap one method's handler (`wrap`)."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or is_open_method(method):  # unknown (UNIMPLEMENTED) or open
            return handler
        wrapped = self.wrap(method, handler)
        self._handlers[method] = wrapped
        return wrapped
