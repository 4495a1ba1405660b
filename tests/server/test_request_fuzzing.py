"""10,000 seeded malformed requests across every RPC over real gRPC on loopback: only
documented status codes (never UNKNOWN or INTERNAL), the server alive, and a round that still
commits afterwards. benchmarks/fuzz_requests.py runs longer."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import numpy as np

from device_runtime import constants
from protos import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc
from tests.harness import (
    POPULATION,
    RoutedChannel,
    RunningCoordinator,
    running_coordinator,
    task_config,
)
from tests.identities import (
    check_in_over,
    device_key,
    enroll_request,
    sign_failure,
    sign_header,
    signed_check_in,
)
from tests.request_fuzzer import RequestFuzzer, Rpc, fuzz, rpcs

V = constants.PROTOCOL_VERSION
FUZZ_SEED = 20261126
REQUESTS = 10_000


async def _token(channel: grpc.aio.Channel, population: str, device_id: str) -> bytes:
    return (await check_in_over(channel, device_id, population)).assignment.upload_token


async def fuzzed_rpcs(
    channel: grpc.aio.Channel,
    running: RunningCoordinator,
    model_bytes: bytes,
    tokens: list[bytes],
    device: str,
) -> list[Rpc]:
    """Every RPC with valid seeds: `tokens` of devices that checked in, and the signed
    enrollment and check-in of `device` (enrolled here, its check-in fresh)."""
    enroll = enroll_request(device_key(device))
    enrolled = await device_pb2_grpc.DeviceServiceStub(channel).Enroll(enroll)
    task = running.coordinator.task("t1")
    return rpcs(
        POPULATION,
        "t1",
        tokens,
        task.record.model_sha256,
        model_bytes,
        task.record.num_parameters,
        enroll=enroll,
        check_in=signed_check_in(device, enrolled.server_time_s),
        sign_header=sign_header,
        sign_failure=sign_failure,
    )


async def _a_round_commits(
    channel: RoutedChannel, running: RunningCoordinator, model_bytes: bytes
) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    config = task_config(
        task_id="after-fuzz", population="after", target_reports=2, over_selection=1.0
    )
    registered = await admin.RegisterTask(
        admin_pb2.RegisterTaskRequest(
            protocol_version=V, config=config.to_proto(), model_tflite=model_bytes
        )
    )
    n = registered.num_parameters
    for device_id in ("a", "b"):
        header = sign_header(
            device_pb2.UploadHeader(
                protocol_version=V,
                upload_token=await _token(channel, "after", device_id),
                example_count=5,
                num_elements=n,
                encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
                metrics=common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=5),
            )
        )
        chunks = [
            device_pb2.UploadChunk(header=header),
            device_pb2.UploadChunk(data=np.zeros(n, "<f4").tobytes()),
        ]
        await device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate(iter(chunks))
    await running.settled()  # the round driver commits off the request path
    status = await admin.GetTaskStatus(
        admin_pb2.GetTaskStatusRequest(protocol_version=V, task_id="after-fuzz")
    )
    assert status.committed_rounds == 1


def test_malformed_requests_get_only_documented_codes_and_a_round_still_commits(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def scenario() -> None:
        async with (
            running_coordinator(
                str(tmp_path / "s.sqlite"), model_bytes, task_config(total_rounds=1000)
            ) as running,
            RoutedChannel(running) as channel,
        ):
            tokens = [await _token(channel, POPULATION, f"seed{i}") for i in range(3)]
            seeds = await fuzzed_rpcs(channel, running, model_bytes, tokens, "fuzz")
            fuzzer = RequestFuzzer(seeds, FUZZ_SEED)

            report = await fuzz(channel, fuzzer, REQUESTS)

            assert report.sent >= REQUESTS
            assert report.undocumented == []
            methods = {method for method, _ in report.codes}
            assert len(methods) == 14  # every RPC of the three services was fuzzed
            await _a_round_commits(channel, running, model_bytes)

    asyncio.run(scenario())
