"""Errors the coordinator raises at its boundary, and the one mapping to gRPC status codes."""

from __future__ import annotations

import grpc


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


def status_code(error: CoordinatorError) -> grpc.StatusCode:
    return error.code
