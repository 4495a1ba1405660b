"""Errors the coordinator raises at its boundary, and the one mapping to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

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
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(CoordinatorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


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
            await context.abort(status_code(exc), str(exc))
            raise AssertionError("unreachable") from None

    return wrapper
