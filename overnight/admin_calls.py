"""The admin channel the Python API holds, and the one error its calls raise."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import grpc

from protos import admin_pb2_grpc

T = TypeVar("T")


class AdminError(RuntimeError):
    """The coordinator refused an admin call. `code` is the gRPC status (each method's codes
    are listed in protos/admin.proto); the message is the coordinator's reason."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.code = code


@dataclasses.dataclass
class AdminConnection:
    channel: grpc.Channel
    stub: admin_pb2_grpc.AdminServiceStub
    metadata: tuple[tuple[str, str], ...]

    def call(self, method: str, request: object) -> T:  # type: ignore[type-var]
        """A unary admin call with the caller's credential. Raises AdminError."""
        rpc: Callable[..., T] = getattr(self.stub, method)
        try:
            return rpc(request, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise AdminError(method, exc.code(), exc.details() or "") from None
