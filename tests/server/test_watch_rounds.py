"""AdminService.WatchRounds over real gRPC and TLS: rounds arrive as they are recorded."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import numpy as np
import pytest

from device_runtime import constants
from protos import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2
from server.coordinator import Coordinator
from server.operator_access import Role
from tests.harness import running_coordinator, task_config
from tests.identities import check_in, sign_header

VERSION = constants.PROTOCOL_VERSION


def _report(coordinator: Coordinator, device: str) -> None:
    """One device checks in and uploads a zero update (in process; the driver commits)."""
    token = check_in(coordinator, device).assignment.upload_token
    n = coordinator.task("t1").record.num_parameters
    payload = np.zeros(n, "<f4").tobytes()
    header = device_pb2.UploadHeader(
        protocol_version=VERSION,
        upload_token=token,
        example_count=10,
        num_elements=n,
        encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        metrics=common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=10, num_batches=2),
    )
    coordinator.accept_upload(sign_header(header), payload, len(payload))


def _watch(channel: grpc.aio.Channel, metadata: object, task_id: str = "t1", after: int = 0):  # type: ignore[no-untyped-def]
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    request = admin_pb2.WatchRoundsRequest(
        protocol_version=VERSION, task_id=task_id, after_round=after
    )
    return stub.WatchRounds(request, metadata=metadata)


def test_sends_history_then_each_round_as_it_commits_then_ends(
    tmp_path: pathlib.Path, model_bytes
) -> None:
    config = task_config(total_rounds=2, target_reports=1, over_selection=1.0, min_reports=1)

    async def scenario() -> list[admin_pb2.RoundSummary]:
        async with running_coordinator(str(tmp_path / "s.sqlite"), model_bytes, config) as running:
            _report(running.coordinator, "d1")
            await running.settled()
            async with running.admin_channel() as channel:
                stream = _watch(channel, running.admin_metadata(Role.VIEWER))
                first = await stream.read()
                _report(running.coordinator, "d2")  # round 2 commits while the stream waits
                received = [first]
                while (summary := await stream.read()) is not grpc.aio.EOF:
                    received.append(summary)
                return received

    received = asyncio.run(scenario())

    assert [(r.round_number, r.state) for r in received] == [(1, "committed"), (2, "committed")]
    assert received[1].metrics["client_work/train/num_examples"] == 10


def test_after_round_skips_what_the_caller_has(tmp_path: pathlib.Path, model_bytes) -> None:
    config = task_config(total_rounds=2, target_reports=1, over_selection=1.0, min_reports=1)

    async def scenario() -> list[int]:
        async with running_coordinator(str(tmp_path / "s.sqlite"), model_bytes, config) as running:
            for device in ("d1", "d2"):
                _report(running.coordinator, device)
                await running.settled()
            async with running.admin_channel() as channel:
                stream = _watch(channel, running.admin_metadata(), after=1)
                return [r.round_number async for r in stream]

    assert asyncio.run(scenario()) == [2]


def test_cancelling_a_task_without_rounds_ends_its_streams(
    tmp_path: pathlib.Path, model_bytes
) -> None:
    async def scenario() -> grpc.StatusCode:
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes) as running,
            running.admin_channel() as channel,
        ):
            stream = _watch(channel, running.admin_metadata())
            await stream.wait_for_connection()
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            await stub.CancelTask(
                admin_pb2.CancelTaskRequest(protocol_version=VERSION, task_id="t1"),
                metadata=running.admin_metadata(),
            )
            assert [r async for r in stream] == []
            return await stream.code()

    assert asyncio.run(scenario()) is grpc.StatusCode.OK


def test_an_unknown_task_is_not_found(tmp_path: pathlib.Path, model_bytes) -> None:
    async def scenario() -> grpc.StatusCode:
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes) as running,
            running.admin_channel() as channel,
        ):
            stream = _watch(channel, running.admin_metadata(), task_id="nope")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stream.read()
            return refused.value.code()

    assert asyncio.run(scenario()) is grpc.StatusCode.NOT_FOUND


def test_a_stopping_coordinator_ends_open_streams_unavailable(
    tmp_path: pathlib.Path, model_bytes
) -> None:
    async def scenario() -> grpc.StatusCode:
        async with running_coordinator(str(tmp_path / "s.sqlite"), model_bytes) as running:
            channel = running.admin_channel()
            stream = _watch(channel, running.admin_metadata())
            await stream.wait_for_connection()
            await running.server.stop(5.0)
            code = await stream.code()
            await channel.close()
            return code

    assert asyncio.run(scenario()) is grpc.StatusCode.UNAVAILABLE
