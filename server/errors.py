"""Errors the coordinator raises at its boundary, and the one mapping to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

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


class StaleLeader(FailedPrecondition):
    """A commit fenced by a task lease that is no longer the task's current one: another
    replica took the task over (server/leases.py). The store changed nothing."""


class Unauthenticated(CoordinatorError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CoordinatorError):
    """A valid credential that does not allow the call: an operator role (admin service), an
    enrollment credential the verifier refuses, or a device key the upload token is not bound to."""

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


class HostedElsewhere(Unavailable):
    """A secure task's call reached a replica that does not host the task's secure rounds;
    the replica's gRPC layer forwards it to the host at `address`
    (server/replica_forwarding.py). Should it reach a device unforwarded, it is UNAVAILABLE:
    the device retries."""

    def __init__(self, task_id: str, address: str) -> None:
        super().__init__(
            f"task {task_id!r}: its secure rounds are hosted by the replica at {address}; retry",
            retry_after_s=1.0,
        )
        self.address = address


class StoreUnavailable(Unavailable):
    """A store read or write failed for a reason outside the request (disk full, read-only
    file, I/O error, a database locked by another process). The store changed nothing."""


class DeadlineExceeded(CoordinatorError):
    """A client stream went idle for longer than the coordinator waits."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


# Anything else a handler raises is a fault of the coordinator (or its store), not of the
# request: the device is told to come back later, and the traceback goes to the log.
UNEXPECTED_ERROR_CODE = grpc.StatusCode.UNAVAILABLE


def status_code(error: CoordinatorError) -> grpc.StatusCode:
    return error.code


def refuse(name: str, error: CoordinatorError, context: grpc.aio.ServicerContext) -> None:
    """Sets the status a refused call ends with; the handler then returns (see below)."""
    log.info("%s refused: %s %s", name, status_code(error).name, error)
    if isinstance(error, Unavailable):
        context.set_trailing_metadata(
            ((protocol.retry_after_metadata, f"{error.retry_after_s:g}"),)
        )
    context.set_code(status_code(error))
    context.set_details(str(error))


def answer_unexpected(name: str, error: Exception, context: grpc.aio.ServicerContext) -> None:
    log.error(
        "%s failed unexpectedly; answered %s", name, UNEXPECTED_ERROR_CODE.name, exc_info=error
    )
    context.set_code(UNEXPECTED_ERROR_CODE)
    context.set_details("the coordinator failed internally; retry later")


# Why handlers set the status and return instead of calling `context.abort`: abort raises
# AbortError, which gRPC keeps on the call, and its traceback holds the handler's frames and
# context: a reference cycle that keeps the call (and its HTTP/2 stream) alive until Python's
# cyclic garbage collector runs. Refused client-streaming calls then stayed counted against
# the connection's grpc.max_concurrent_streams: after 64 of them every later call on that
# connection was refused (UNAVAILABLE "RST_STREAM with error code 7", or INTERNAL at an
# asyncio client). A returned status frees the call at once.


def abort_on_error(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wraps a unary or client-streaming gRPC handler: a CoordinatorError becomes its status,
    with its message; any other exception is logged and answered UNAVAILABLE.

    Every service (device, admin, secure aggregation) uses this one mapping.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except CoordinatorError as exc:
            refuse(method.__name__, exc, context)
        except grpc.aio.AbortError:
            raise  # the handler aborted the call itself
        except Exception as exc:
            answer_unexpected(method.__name__, exc, context)
        # gRPC sends the status set on the context; no response message goes out.
        return cast(T, None)

    return wrapper
