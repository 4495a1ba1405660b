"""The coordinator's listeners as an attacker on the network or at the admin port meets them:
real gRPC over real TLS on loopback."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Awaitable, Callable

import grpc
import pytest

from device_runtime import constants
from device_runtime.channel import ServerTrust, open_channel
from device_runtime.clock import RealClock
from protos import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from server.certificates import DevelopmentCa
from server.coordinator import Coordinator
from server.grpc_service import CoordinatorServer
from server.operator_access import AdminTokens, Role, bearer_metadata
from server.sqlite_store import SqliteStore
from server.transport_security import ServerTls
from tests.harness import (
    POPULATION,
    RunningCoordinator,
    loopback_certificate,
    running_coordinator,
    session_ca,
    task_config,
)
from tests.identities import check_in_over

V = constants.PROTOCOL_VERSION


def _check_in_request() -> device_pb2.CheckInRequest:
    return device_pb2.CheckInRequest(
        protocol_version=V, population=POPULATION, device_id="d", example_count=10
    )


def _register_request(model_bytes: bytes) -> admin_pb2.RegisterTaskRequest:
    return admin_pb2.RegisterTaskRequest(
        protocol_version=V,
        config=task_config(task_id="intruder").to_proto(),
        model_tflite=model_bytes,
    )


def _code_of(
    tmp_path: pathlib.Path,
    model_bytes: bytes,
    call: Callable[[RunningCoordinator], Awaitable[object]],
) -> tuple[grpc.StatusCode, str, list[str]]:
    """Runs `call` against a TLS coordinator with task t1; returns the status it failed with
    and the task ids the coordinator holds afterwards."""

    async def scenario() -> tuple[grpc.StatusCode, str, list[str]]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, task_config()
        ) as running:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(running)
            return info.value.code(), info.value.details() or "", running.coordinator.task_ids()

    return asyncio.run(scenario())


# ----- the network ------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["device", "admin"])
def test_a_plaintext_client_cannot_talk_to_a_tls_listener(tmp_path, model_bytes, port) -> None:
    async def call(running: RunningCoordinator) -> None:
        address = running.address if port == "device" else running.admin_address
        async with open_channel(address, ServerTrust(insecure=True)) as channel:
            await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(
                _check_in_request(), timeout=10
            )

    code, _, _ = _code_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("port", ["device", "admin"])
def test_a_client_trusting_another_ca_refuses_the_coordinator(tmp_path, model_bytes, port) -> None:
    other_ca = ServerTrust(root_certificates=DevelopmentCa("someone else").root_certificate)

    async def call(running: RunningCoordinator) -> None:
        address = running.address if port == "device" else running.admin_address
        async with open_channel(address, other_ca) as channel:
            await admin_pb2_grpc.AdminServiceStub(channel).ListTasks(
                admin_pb2.ListTasksRequest(protocol_version=V),
                metadata=running.admin_metadata(Role.OPERATOR),
                timeout=10,
            )

    code, _, _ = _code_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.UNAVAILABLE


def test_a_device_that_trusts_the_coordinators_ca_checks_in(tmp_path, model_bytes) -> None:
    async def scenario() -> device_pb2.CheckInResponse:
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes, task_config()) as running,
            running.device_channel() as channel,
        ):
            return await check_in_over(channel, "d")

    answer = asyncio.run(scenario())

    assert answer.assignment.task_id == "t1"


# ----- the admin listener -----------------------------------------------------------------


def test_the_admin_service_does_not_answer_on_the_device_port(tmp_path, model_bytes) -> None:
    async def call(running: RunningCoordinator) -> None:
        async with running.device_channel() as channel:
            await admin_pb2_grpc.AdminServiceStub(channel).RegisterTask(
                _register_request(model_bytes), metadata=running.admin_metadata(Role.OPERATOR)
            )

    code, _, tasks = _code_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.UNIMPLEMENTED
    assert tasks == ["t1"]


def test_the_device_service_does_not_answer_on_the_admin_port(tmp_path, model_bytes) -> None:
    async def call(running: RunningCoordinator) -> None:
        async with running.admin_channel() as channel:
            await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(
                _check_in_request(), metadata=running.admin_metadata(Role.OPERATOR)
            )

    code, _, _ = _code_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer not-a-token"),), (("authorization", "Basic b3A6cHc="),)],
    ids=["none", "wrong-token", "not-bearer"],
)
def test_admin_calls_without_a_valid_credential_are_unauthenticated(
    tmp_path, model_bytes, metadata
) -> None:
    async def call(running: RunningCoordinator) -> None:
        async with running.admin_channel() as channel:
            await admin_pb2_grpc.AdminServiceStub(channel).RegisterTask(
                _register_request(model_bytes), metadata=metadata
            )

    code, _, tasks = _code_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert tasks == ["t1"]


def test_a_viewer_may_not_register_a_task(tmp_path, model_bytes) -> None:
    async def call(running: RunningCoordinator) -> None:
        async with running.admin_channel() as channel:
            await admin_pb2_grpc.AdminServiceStub(channel).RegisterTask(
                _register_request(model_bytes), metadata=running.admin_metadata(Role.VIEWER)
            )

    code, details, tasks = _code_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.PERMISSION_DENIED and "viewer" in details
    assert tasks == ["t1"]


@pytest.mark.parametrize("method", ["PauseTask", "CancelTask"])
def test_a_viewer_may_not_stop_a_task(tmp_path, model_bytes, method) -> None:
    async def call(running: RunningCoordinator) -> None:
        async with running.admin_channel() as channel:
            request = getattr(admin_pb2, f"{method}Request")(protocol_version=V, task_id="t1")
            await getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(
                request, metadata=running.admin_metadata(Role.VIEWER)
            )

    code, _, _ = _code_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_a_viewer_reads_and_an_operator_pauses(tmp_path, model_bytes) -> None:
    async def scenario() -> tuple[list[str], str, str]:
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes, task_config()) as running,
            running.admin_channel() as channel,
        ):
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            listed = await admin.ListTasks(
                admin_pb2.ListTasksRequest(protocol_version=V),
                metadata=running.admin_metadata(Role.VIEWER),
            )
            paused = await admin.PauseTask(
                admin_pb2.PauseTaskRequest(protocol_version=V, task_id="t1"),
                metadata=running.admin_metadata(Role.OPERATOR),
            )
            return (
                [t.config.task_id for t in listed.tasks],
                paused.state,
                running.coordinator.task("t1").status,
            )

    listed, answered, held = asyncio.run(scenario())

    assert listed == ["t1"]
    assert answered == held == "paused"


def test_a_revoked_token_stops_working_on_a_running_coordinator(tmp_path, model_bytes) -> None:
    async def scenario() -> grpc.StatusCode:
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes, task_config()) as running,
            running.admin_channel() as channel,
        ):
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            request = admin_pb2.ListTasksRequest(protocol_version=V)
            await admin.ListTasks(request, metadata=running.admin_metadata(Role.VIEWER))
            tokens = running.admin_tokens
            viewer = next(e for e in tokens.entries() if e.role is Role.VIEWER)
            tokens.revoke(viewer.token_id)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.ListTasks(request, metadata=running.admin_metadata(Role.VIEWER))
            return info.value.code()

    assert asyncio.run(scenario()) is grpc.StatusCode.UNAUTHENTICATED


# ----- operator client certificates (mTLS) ------------------------------------------------


def _mtls_scenario(
    tmp_path: pathlib.Path,
    model_bytes: bytes,
    client_role: str | None,
    call: Callable[[admin_pb2_grpc.AdminServiceStub], Awaitable[object]],
) -> object:
    """A coordinator whose admin listener requires certificates from an operator CA; the
    client presents one with OU `client_role` (None: no certificate at all)."""
    operators = DevelopmentCa("operators")

    async def scenario() -> object:
        store = SqliteStore(tmp_path / "s.sqlite")
        coordinator = Coordinator(store, RealClock())
        coordinator.register_task(task_config(), model_bytes)
        issued = loopback_certificate()
        tls = ServerTls(issued.certificate_chain, issued.private_key, operators.root_certificate)
        server = CoordinatorServer(coordinator, tls=tls, admin_tokens=AdminTokens(tmp_path))
        await server.start()
        try:
            if client_role is None:
                credentials = grpc.ssl_channel_credentials(session_ca().root_certificate)
            else:
                mine = operators.issue_client("alice", client_role)
                credentials = grpc.ssl_channel_credentials(
                    session_ca().root_certificate, mine.private_key, mine.certificate_chain
                )
            assert server.admin_address is not None
            async with grpc.aio.secure_channel(server.admin_address, credentials) as channel:
                return await call(admin_pb2_grpc.AdminServiceStub(channel))
        finally:
            await server.stop(0)
            store.close()

    return asyncio.run(scenario())


def test_an_operator_certificate_is_a_credential(tmp_path, model_bytes) -> None:
    async def call(admin: admin_pb2_grpc.AdminServiceStub) -> object:
        return await admin.CancelTask(admin_pb2.CancelTaskRequest(protocol_version=V, task_id="t1"))

    status = _mtls_scenario(tmp_path, model_bytes, "operator", call)

    assert isinstance(status, admin_pb2.TaskStatus) and status.state == "cancelled"


def test_a_viewer_certificate_may_read_but_not_register(tmp_path, model_bytes) -> None:
    async def call(admin: admin_pb2_grpc.AdminServiceStub) -> object:
        listed = await admin.ListTasks(admin_pb2.ListTasksRequest(protocol_version=V))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.RegisterTask(_register_request(model_bytes))
        return len(listed.tasks), info.value.code()

    assert _mtls_scenario(tmp_path, model_bytes, "viewer", call) == (
        1,
        grpc.StatusCode.PERMISSION_DENIED,
    )


def test_without_a_client_certificate_the_admin_listener_refuses_the_connection(
    tmp_path, model_bytes
) -> None:
    async def call(admin: admin_pb2_grpc.AdminServiceStub) -> object:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.ListTasks(
                admin_pb2.ListTasksRequest(protocol_version=V),
                metadata=bearer_metadata("any"),
                timeout=10,
            )
        return info.value.code()

    assert _mtls_scenario(tmp_path, model_bytes, None, call) is grpc.StatusCode.UNAVAILABLE


# ----- --insecure -------------------------------------------------------------------------


def test_an_insecure_coordinator_serves_plaintext_clients_only(tmp_path, model_bytes) -> None:
    async def scenario() -> tuple[str, grpc.StatusCode]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, task_config(), insecure=True
        ) as running:
            async with running.device_channel() as plaintext:
                answer = await check_in_over(plaintext, "d")
            async with open_channel(
                running.address, ServerTrust(session_ca().root_certificate)
            ) as tls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await device_pb2_grpc.DeviceServiceStub(tls).CheckIn(
                        _check_in_request(), timeout=10
                    )
            return answer.assignment.task_id, info.value.code()

    assert asyncio.run(scenario()) == ("t1", grpc.StatusCode.UNAVAILABLE)
