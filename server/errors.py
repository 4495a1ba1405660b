"""Errors the coordinator raises at its boundary, and the one mapping to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from device_runtime import constants as protocol

log = logging.getLogger(__name__)
T = TypeVar("T")


class CoordinatorError(Exception):
    """Base: a request the coordinator refuses. The message is for the caller to act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(CoordinatorError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CoordinatorError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CoordinatorError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CoordinatorError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(CoordinatorError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CoordinatorError):
    """A valid credential whose role does not allow the call (admin service)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(CoordinatorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CoordinatorError):
    """The coordinator cannot serve the request now (its store failed, or it is draining).
    Nothing changed; the caller retries after `retry_after_s`, which reaches devices as the
    `retry-after-s` trailing metadata (see protos/device.proto)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_s: float = 30.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreUnavailable(Unavailable):
    """A store read or write failed for a reason outside the request (disk full, read-only
    file, I/O error, a database locked by another process). The store changed nothing."""


def status_code(error: CoordinatorError) -> grpc.StatusCode:
    return error.code


def abort_on_error(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wraps a unary gRPC handler: a CoordinatorError becomes its status, with its message.

    Every service (device, admin, secure aggregation) uses this one mapping.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except CoordinatorError as exc:
            log.info("%s refused: %s %s", method.__name__, status_code(exc).name, exc)
            if isinstance(exc, Unavailable):
                context.set_trailing_metadata(
                    ((protocol.retry_after_metadata, f"{exc.retry_after_s:g}"),)
                )
            await context.abort(status_code(exc), str(exc))
            raise AssertionError("unreachable") from None

    return wrapper
