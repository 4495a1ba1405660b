"""A real coordinator on loopback for tests: SQLite store, gRPC server over TLS, injected clock.

Every test coordinator speaks TLS with a certificate from a throwaway CA, and its admin
service sits on its own listener behind operator tokens, as in production.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import tempfile
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from device_runtime.channel import ServerTrust, open_channel
from device_runtime.clock import Clock, RealClock
from device_runtime.transport import channel_options
from protos import admin_pb2_grpc
from server import limits
from server.certificates import DevelopmentCa, IssuedCertificate
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.grpc_service import CoordinatorServer, admin_max_message_bytes
from server.operator_access import AdminTokens, Role, bearer_metadata
from server.sqlite_store import SqliteStore
from server.transport_security import ServerTls
from tests.identities import make_coordinator

POPULATION = "digits"


def task_config(**overrides: object) -> TaskConfig:
    values: dict[str, object] = dict(
        task_id="t1",
        population=POPULATION,
        total_rounds=3,
        target_reports=2,
        over_selection=1.5,
        min_reports=1,
        selection_deadline_s=10.0,
        reporting_deadline_s=20.0,
        epochs=1,
        batch_size=8,
    )
    values.update(overrides)
    return TaskConfig(**values).validate()  # type: ignore[arg-type]


@functools.cache
def session_ca() -> DevelopmentCa:
    """One throwaway CA for the whole test session (making one costs a few milliseconds)."""
    return DevelopmentCa("Overnight test CA")


@functools.cache
def loopback_certificate() -> IssuedCertificate:
    return session_ca().issue_server()


def loopback_tls() -> ServerTls:
    issued = loopback_certificate()
    return ServerTls(issued.certificate_chain, issued.private_key)


def loopback_trust() -> ServerTrust:
    return ServerTrust(root_certificates=session_ca().root_certificate)


@dataclasses.dataclass
class RunningCoordinator:
    coordinator: Coordinator
    server: CoordinatorServer
    store: SqliteStore
    trust: ServerTrust  # what a device or operator needs to verify this coordinator
    tokens: dict[Role, str]  # an admin token per role
    admin_tokens: AdminTokens  # the hashed tokens the admin listener checks

    @property
    def address(self) -> str:
        return self.server.address

    async def settled(self) -> None:
        """Waits until the round driver has ended every round the reports so far completed."""
        await self.coordinator.driver.settled()

    @property
    def admin_address(self) -> str:
        assert self.server.admin_address is not None
        return self.server.admin_address

    def device_channel(self) -> grpc.aio.Channel:
        return open_channel(self.address, self.trust, channel_options())

    def admin_channel(self) -> grpc.aio.Channel:
        return open_channel(
            self.admin_address,
            self.trust,
            [("grpc.max_send_message_length", admin_max_message_bytes)],
        )

    def admin_metadata(self, role: Role = Role.OPERATOR) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.tokens[role])


class RoutedChannel:
    """One object that looks like a channel to stubs and raw calls, and sends each method to
    the listener that serves it: AdminService to the admin listener with an operator token,
    everything else to the device listener. For tests that call every RPC alike (fuzzing)."""

    def __init__(self, running: RunningCoordinator) -> None:
        self._device = running.device_channel()
        self._admin = running.admin_channel()
        self._metadata = running.admin_metadata(Role.OPERATOR)

    def _route(self, kind: str, method: str, kwargs: dict[str, Any]) -> Any:
        if not method.startswith("/overnight.v1.AdminService/"):
            return getattr(self._device, kind)(method, **kwargs)
        call = getattr(self._admin, kind)(method, **kwargs)
        return functools.partial(call, metadata=self._metadata)

    def unary_unary(self, method: str, **kwargs: Any) -> Any:
        return self._route("unary_unary", method, kwargs)

    def unary_stream(self, method: str, **kwargs: Any) -> Any:
        return self._route("unary_stream", method, kwargs)

    def stream_unary(self, method: str, **kwargs: Any) -> Any:
        return self._route("stream_unary", method, kwargs)

    async def __aenter__(self) -> RoutedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._device.close()
        await self._admin.close()


class OperatorAdminStub:
    """An AdminService stub whose calls carry an operator token: for tests about what the
    admin service does, not about who may call it."""

    def __init__(self, running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        self._stub = admin_pb2_grpc.AdminServiceStub(channel)
        self._metadata = running.admin_metadata(Role.OPERATOR)

    def __getattr__(self, name: str) -> object:
        method = getattr(self._stub, name)
        return functools.partial(method, metadata=self._metadata)


@contextlib.asynccontextmanager
async def running_coordinator(
    store_path: str,
    model_bytes: bytes | None = None,
    config: TaskConfig | None = None,
    clock: Clock | None = None,
    settings: CoordinatorSettings | None = None,
    insecure: bool = False,
    upload_idle_timeout_s: float = limits.upload_idle_timeout_s,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    admin_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> AsyncIterator[RunningCoordinator]:
    """`insecure`: plaintext listeners, for the tests about what plaintext does."""
    store = SqliteStore(store_path)
    coordinator = make_coordinator(store, clock or RealClock(), settings)
    if model_bytes is not None:
        coordinator.register_task(config or task_config(), model_bytes)
    with tempfile.TemporaryDirectory(prefix="admin-tokens-") as token_dir:
        admin_tokens = AdminTokens(pathlib.Path(token_dir))
        tokens = {role: admin_tokens.create(role)[1] for role in Role}
        server = CoordinatorServer(
            coordinator,
            "127.0.0.1:0",
            tls=None if insecure else loopback_tls(),
            admin_tokens=admin_tokens,
            interceptors=interceptors,
            admin_interceptors=admin_interceptors,
            upload_idle_timeout_s=upload_idle_timeout_s,
        )
        await server.start()
        trust = ServerTrust(insecure=True) if insecure else loopback_trust()
        try:
            yield RunningCoordinator(coordinator, server, store, trust, tokens, admin_tokens)
        finally:
            await server.stop(0)
            store.close()
