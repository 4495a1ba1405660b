"""grpc.health.v1 on both listeners and reflection on the admin listener, as a load balancer
and grpcurl meet them: real gRPC over TLS on loopback, no admin credential."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import admin_pb2, admin_pb2_grpc
from server.grpc_service import ADMIN_SERVICE, DEVICE_SERVICE, SECAGG_SERVICE
from tests.harness import RunningCoordinator, running_coordinator, task_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


def _run(tmp_path: pathlib.Path, model_bytes: bytes, scenario) -> object:  # type: ignore[no-untyped-def]
    async def main() -> object:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, task_config()
        ) as running:
            return await scenario(running)

    return asyncio.run(main())


def test_the_device_listener_reports_each_device_service_serving(tmp_path, model_bytes) -> None:
    async def scenario(running: RunningCoordinator) -> dict[str, int]:
        async with running.device_channel() as channel:
            return {s: await _status(channel, s) for s in ("", DEVICE_SERVICE, SECAGG_SERVICE)}

    statuses = _run(tmp_path, model_bytes, scenario)

    assert statuses == {"": SERVING, DEVICE_SERVICE: SERVING, SECAGG_SERVICE: SERVING}


def test_the_device_listener_knows_no_admin_service(tmp_path, model_bytes) -> None:
    async def scenario(running: RunningCoordinator) -> None:
        async with running.device_channel() as channel:
            await _status(channel, ADMIN_SERVICE)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        _run(tmp_path, model_bytes, scenario)

    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_the_admin_listener_answers_health_without_a_credential(tmp_path, model_bytes) -> None:
    async def scenario(running: RunningCoordinator) -> tuple[dict[str, int], grpc.StatusCode]:
        async with running.admin_channel() as channel:
            statuses = {s: await _status(channel, s) for s in ("", ADMIN_SERVICE)}
            try:
                await admin_pb2_grpc.AdminServiceStub(channel).ListTasks(
                    admin_pb2.ListTasksRequest(), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                return statuses, exc.code()
            return statuses, grpc.StatusCode.OK

    statuses, admin_call = _run(tmp_path, model_bytes, scenario)

    assert statuses == {"": SERVING, ADMIN_SERVICE: SERVING}
    assert admin_call is grpc.StatusCode.UNAUTHENTICATED  # the admin API itself stays closed


def test_a_drain_turns_every_status_not_serving_and_watchers_see_it(tmp_path, model_bytes) -> None:
    async def scenario(running: RunningCoordinator) -> tuple[list[int], list[int]]:
        async with running.device_channel() as device, running.admin_channel() as admin:
            watch = health_pb2_grpc.HealthStub(device).Watch(
                health_pb2.HealthCheckRequest(service=DEVICE_SERVICE)
            )
            seen = [(await watch.read()).status]
            await running.server.begin_drain()
            seen.append((await watch.read()).status)
            watch.cancel()
            after = [
                await _status(device, ""),
                await _status(device, SECAGG_SERVICE),
                await _status(admin, ADMIN_SERVICE),
            ]
            return seen, after

    seen, after = _run(tmp_path, model_bytes, scenario)

    assert seen == [SERVING, NOT_SERVING]
    assert after == [NOT_SERVING, NOT_SERVING, NOT_SERVING]


async def _listed_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(timeout=10)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    return sorted(s.name for s in response.list_services_response.service)


def test_reflection_on_the_admin_listener_lists_the_admin_api_without_a_credential(
    tmp_path, model_bytes
) -> None:
    async def scenario(running: RunningCoordinator) -> list[str]:
        async with running.admin_channel() as channel:
            return await _listed_services(channel)

    services = _run(tmp_path, model_bytes, scenario)

    assert ADMIN_SERVICE in services
    assert DEVICE_SERVICE not in services


def test_reflection_describes_an_admin_method_from_its_symbol(tmp_path, model_bytes) -> None:
    async def scenario(running: RunningCoordinator) -> str:
        async with running.admin_channel() as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = stub.ServerReflectionInfo(timeout=10)
            await call.write(
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=ADMIN_SERVICE)
            )
            response = await call.read()
            await call.done_writing()
            return response.WhichOneof("message_response")

    kind = _run(tmp_path, model_bytes, scenario)

    assert kind == "file_descriptor_response"


def test_the_device_listener_offers_no_reflection(tmp_path, model_bytes) -> None:
    async def scenario(running: RunningCoordinator) -> list[str]:
        async with running.device_channel() as channel:
            return await _listed_services(channel)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        _run(tmp_path, model_bytes, scenario)

    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
