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


class ResourceExhausted(CoordinatorError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(CoordinatorError):
    """A client stream went idle for longer than the coordinator waits."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


# Anything else a handler raises is a fault of the coordinator (or its store), not of the
# request: the device is told to come back later, and the traceback goes to the log.
UNEXPECTED_ERROR_CODE = grpc.StatusCode.UNAVAILABLE


def status_code(error: CoordinatorError) -> grpc.StatusCode:
    return error.code


async def abort_with(name: str, error: CoordinatorError, context: grpc.aio.ServicerContext) -> None:
    log.info("%s refused: %s %s", name, status_code(error).name, error)
    await context.abort(status_code(error), str(error))


async def abort_unexpected(name: str, error: Exception, context: grpc.aio.ServicerContext) -> None:
    log.error(
        "%s failed unexpectedly; answered %s", name, UNEXPECTED_ERROR_CODE.name, exc_info=error
    )
    await context.abort(UNEXPECTED_ERROR_CODE, "the coordinator failed internally; retry later")


def abort_on_error(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wraps a unary gRPC handler: a CoordinatorError becomes its status, with its message;
    any other exception is logged and answered UNAVAILABLE.

    Every service (device, admin, secure aggregation) uses this one mapping.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except CoordinatorError as exc:
            await abort_with(method.__name__, exc, context)
        except grpc.aio.AbortError:
            raise  # the handler aborted the call itself
        except Exception as exc:
            await abort_unexpected(method.__name__, exc, context)
        raise AssertionError("unreachable: abort raises")

    return wrapper
