"""Status codes over real gRPC on loopback: what a device or operator actually sees."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest

from device_runtime import constants
from protos import admin_pb2, common_pb2, device_pb2, device_pb2_grpc
from server.grpc_service import PayloadChunks, parse_upload_chunk
from tests.harness import (
    POPULATION,
    OperatorAdminStub,
    RunningCoordinator,
    running_coordinator,
    task_config,
)
from tests.identities import check_in_over, sign_header

V = constants.PROTOCOL_VERSION


def _run(
    tmp_path: pathlib.Path,
    model_bytes: bytes,
    body: Callable[[RunningCoordinator, grpc.aio.Channel], Awaitable[object]],
) -> object:
    async def scenario() -> object:
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes, task_config()) as running,
            running.device_channel() as channel,
        ):
            return await body(running, channel)

    return asyncio.run(scenario())


async def _assignment(channel: grpc.aio.Channel, device_id: str = "d") -> device_pb2.Assignment:
    response = await check_in_over(channel, device_id)
    return response.assignment


def _chunks(
    header: device_pb2.UploadHeader | None, payload: bytes, chunk: int = 1000
) -> list[device_pb2.UploadChunk]:
    parts = [device_pb2.UploadChunk(header=header)] if header is not None else []
    return parts + [
        device_pb2.UploadChunk(data=payload[i : i + chunk]) for i in range(0, len(payload), chunk)
    ]


def _header(token: bytes, n: int) -> device_pb2.UploadHeader:
    return sign_header(
        device_pb2.UploadHeader(
            protocol_version=V,
            upload_token=token,
            example_count=5,
            num_elements=n,
            encoding="float32_delta",
            metrics=common_pb2.ClientMetrics(num_examples=5, num_batches=1),
        )
    )


def _status_of(
    tmp_path: pathlib.Path,
    model_bytes: bytes,
    call: Callable[[RunningCoordinator, grpc.aio.Channel], Awaitable[object]],
) -> tuple[grpc.StatusCode, str, RunningCoordinator]:
    seen: dict[str, object] = {}

    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        seen["running"] = running
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(running, channel)
        seen["code"], seen["details"] = info.value.code(), info.value.details()

    _run(tmp_path, model_bytes, body)
    return seen["code"], seen["details"], seen["running"]  # type: ignore[return-value]


def test_unknown_population_is_not_found(tmp_path, model_bytes) -> None:
    async def call(running, channel):
        await check_in_over(channel, "d", "nobody")  # enrolled, but no task there

    code, details, _ = _status_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.NOT_FOUND and "nobody" in details


def test_chunked_upload_is_accepted(tmp_path, model_bytes) -> None:
    async def body(running, channel):
        assignment = await _assignment(channel)
        n = running.coordinator.task("t1").record.num_parameters
        payload = np.full(n, 0.25, "<f4").tobytes()
        await device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate(
            iter(_chunks(_header(assignment.upload_token, n), payload))
        )
        return running.coordinator.task("t1").current.reported

    assert _run(tmp_path, model_bytes, body) == 1


@pytest.mark.parametrize(
    ("make_chunks", "expected"),
    [
        (
            lambda token, n, payload: _chunks(_header(token, n), payload[:-8]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda token, n, payload: _chunks(_header(token, n), payload + b"x" * 64),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (lambda token, n, payload: _chunks(None, payload), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda token, n, payload: _chunks(_header(b"forged-token", n), payload),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            lambda token, n, payload: (
                _chunks(_header(token, n), payload)
                + [device_pb2.UploadChunk(header=_header(token, n))]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
    ids=["short", "oversized", "no-header", "unknown-token", "second-header"],
)
def test_malformed_upload_gets_its_status_and_leaves_the_round(
    tmp_path, model_bytes, make_chunks, expected
) -> None:
    async def call(running, channel):
        assignment = await _assignment(channel)
        n = running.coordinator.task("t1").record.num_parameters
        payload = np.zeros(n, "<f4").tobytes()
        await device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate(
            iter(make_chunks(assignment.upload_token, n, payload))
        )

    code, _, running = _status_of(tmp_path, model_bytes, call)

    assert code is expected
    current = running.coordinator.task("t1").current
    assert current.reported == 0 and current.aggregate.count == 0


def test_oversized_chunk_is_resource_exhausted(tmp_path, model_bytes) -> None:
    async def call(running, channel):
        assignment = await _assignment(channel)
        n = running.coordinator.task("t1").record.num_parameters
        chunks = [
            device_pb2.UploadChunk(header=_header(assignment.upload_token, n)),
            device_pb2.UploadChunk(data=b"\0" * (constants.max_upload_chunk_bytes + 1)),
        ]
        await device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate(iter(chunks))

    code, details, running = _status_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "smaller chunks" in details
    assert running.coordinator.task("t1").current.reported == 0


def test_populations_are_kept_apart(tmp_path, model_bytes) -> None:
    async def body(running, channel):
        running.coordinator.register_task(
            task_config(task_id="t2", population="watches"), model_bytes
        )
        answers = {}
        for population in (POPULATION, "watches"):
            answers[population] = await check_in_over(channel, "d", population)
        return answers

    answers = _run(tmp_path, model_bytes, body)

    assert answers[POPULATION].assignment.task_id == "t1"
    assert answers["watches"].assignment.task_id == "t2"


def test_reused_token_is_already_exists(tmp_path, model_bytes) -> None:
    async def call(running, channel):
        assignment = await _assignment(channel)
        n = running.coordinator.task("t1").record.num_parameters
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        chunks = _chunks(_header(assignment.upload_token, n), np.zeros(n, "<f4").tobytes())
        await stub.UploadUpdate(iter(chunks))
        await stub.UploadUpdate(iter(chunks))

    code, _, running = _status_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert running.coordinator.task("t1").current.reported == 1


def test_download_streams_chunks_that_reassemble(tmp_path, model_bytes) -> None:
    big = np.random.default_rng(0).bytes(3 * constants.chunk_size_bytes + 17)

    async def body(running, channel):
        digest = running.store.put_resource("weights", big)
        chunks = [
            c
            async for c in device_pb2_grpc.DeviceServiceStub(channel).Download(
                device_pb2.DownloadRequest(protocol_version=V, sha256=digest)
            )
        ]
        return chunks

    chunks = _run(tmp_path, model_bytes, body)

    assert len(chunks) == 4
    assert b"".join(c.data for c in chunks) == big


def test_download_of_unknown_resource_is_not_found(tmp_path, model_bytes) -> None:
    async def call(running, channel):
        async for _ in device_pb2_grpc.DeviceServiceStub(channel).Download(
            device_pb2.DownloadRequest(protocol_version=V, sha256="0" * 64)
        ):
            pass

    code, _, _ = _status_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.NOT_FOUND


def test_admin_register_twice_is_already_exists(tmp_path, model_bytes) -> None:
    async def call(running, channel):
        async with running.admin_channel() as admin_channel:
            await OperatorAdminStub(running, admin_channel).RegisterTask(
                admin_pb2.RegisterTaskRequest(
                    protocol_version=V, config=task_config().to_proto(), model_tflite=model_bytes
                )
            )

    code, _, _ = _status_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.ALREADY_EXISTS


def test_admin_bad_config_names_the_field(tmp_path, model_bytes) -> None:
    async def call(running, channel):
        config = task_config(task_id="t2").to_proto()
        config.over_selection = 0.5
        async with running.admin_channel() as admin_channel:
            await OperatorAdminStub(running, admin_channel).RegisterTask(
                admin_pb2.RegisterTaskRequest(
                    protocol_version=V, config=config, model_tflite=model_bytes
                )
            )

    code, details, _ = _status_of(tmp_path, model_bytes, call)

    assert code is grpc.StatusCode.INVALID_ARGUMENT and "over_selection" in details


def test_admin_status_and_rounds(tmp_path, model_bytes) -> None:
    async def body(running, channel):
        async with running.admin_channel() as admin_channel:
            admin = OperatorAdminStub(running, admin_channel)
            await _assignment(channel)
            status = await admin.GetTaskStatus(
                admin_pb2.GetTaskStatusRequest(protocol_version=V, task_id="t1")
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.ListRounds(
                    admin_pb2.ListRoundsRequest(protocol_version=V, task_id="nope")
                )
        return status, info.value.code()

    status, missing = _run(tmp_path, model_bytes, body)

    assert status.state == "running"
    assert status.current_round.selected == 1
    assert missing is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1 << 20, (1 << 21) + 5])
def test_data_chunk_wire_bytes_equals_protobuf_byte_size(size: int) -> None:
    from server.grpc_service import data_chunk_wire_bytes

    chunk = device_pb2.UploadChunk(data=b"\0" * size)

    assert data_chunk_wire_bytes(size) == chunk.ByteSize()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1 << 20])
def test_a_data_chunk_is_read_as_a_view_of_its_payload(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = device_pb2.UploadChunk(data=data).SerializeToString()

    part = parse_upload_chunk(raw)

    assert isinstance(part, memoryview) and part.obj is raw and bytes(part) == data


@pytest.mark.parametrize(
    "raw",
    [
        device_pb2.UploadChunk(header=_header(b"t", 3)).SerializeToString(),
        b"",
        # data twice (protobuf keeps the last), and data followed by a header (oneof: last wins)
        device_pb2.UploadChunk(data=b"ab").SerializeToString()
        + device_pb2.UploadChunk(data=b"xyz").SerializeToString(),
        device_pb2.UploadChunk(data=b"ab").SerializeToString()
        + device_pb2.UploadChunk(header=_header(b"t", 3)).SerializeToString(),
    ],
    ids=["header", "empty", "data-twice", "data-then-header"],
)
def test_any_other_chunk_is_parsed_by_protobuf(raw: bytes) -> None:
    assert parse_upload_chunk(raw) == device_pb2.UploadChunk.FromString(raw)


def test_a_truncated_data_chunk_is_refused_like_protobuf_refuses_it() -> None:
    raw = device_pb2.UploadChunk(data=b"x" * 300).SerializeToString()[:-1]

    with pytest.raises(Exception) as ours:
        parse_upload_chunk(raw)
    with pytest.raises(Exception) as protobufs:
        device_pb2.UploadChunk.FromString(raw)
    assert type(ours.value) is type(protobufs.value)


def test_tiny_chunks_are_gathered_so_the_payload_list_stays_small() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB
    sizes = [1] * 1000 + [PayloadChunks.min_kept_bytes] + [3] * 1000
    chunks, start = PayloadChunks(), 0
    for size in [*sizes, len(payload) - sum(sizes)]:
        chunks.add(memoryview(payload)[start : start + size])
        start += size

    parts = chunks.finish()

    assert len(parts) == 4 and chunks.size == len(payload)
    assert parts[1].obj is payload  # the large chunk is kept as received, not copied
    assert b"".join(parts) == payload
