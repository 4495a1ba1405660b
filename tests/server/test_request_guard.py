"""Hostile requests over real gRPC on loopback: each refused with its documented status code,
and nothing changed in the store (server/request_guard.py, server/limits.py)."""

from __future__ import annotations

import asyncio
import gc
import pathlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import pytest

from device_runtime import constants
from protos import admin_pb2, device_pb2, device_pb2_grpc, secagg_pb2
from server import limits
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
    sign_header,
    signed_check_in,
)

V = constants.PROTOCOL_VERSION
UNDECODABLE = b"\xff\xff\xff"  # a field tag whose varint never ends
# Every RPC, by kind: (full method name, request streaming, response streaming).
METHODS = [
    ("/overnight.v1.DeviceService/Enroll", False, False),
    ("/overnight.v1.DeviceService/CheckIn", False, False),
    ("/overnight.v1.DeviceService/Download", False, True),
    ("/overnight.v1.DeviceService/UploadUpdate", True, False),
    ("/overnight.v1.DeviceService/ReportFailure", False, False),
    ("/overnight.v1.AdminService/RegisterTask", False, False),
    ("/overnight.v1.AdminService/GetTaskStatus", False, False),
    ("/overnight.v1.AdminService/ListRounds", False, False),
    ("/overnight.v1.AdminService/ListTasks", False, False),
    ("/overnight.v1.SecAggService/Send", False, False),
    ("/overnight.v1.SecAggService/SendMaskedInput", True, False),
    ("/overnight.v1.SecAggService/AwaitServerMessage", False, False),
]

Body = Callable[[RunningCoordinator, grpc.aio.Channel], Awaitable[None]]


def _rows(path: pathlib.Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}


def _run(tmp_path: pathlib.Path, model_bytes: bytes, body: Body, idle_s: float = 30.0) -> None:
    async def scenario() -> None:
        async with (
            running_coordinator(
                str(tmp_path / "s.sqlite"),
                model_bytes,
                task_config(),
                upload_idle_timeout_s=idle_s,
            ) as running,
            RoutedChannel(running) as channel,
        ):
            await body(running, channel)

    asyncio.run(scenario())


async def raw_call(
    channel: grpc.aio.Channel, method: str, streaming_in: bool, streaming_out: bool, raw: bytes
) -> grpc.StatusCode:
    """Sends `raw` as the request (or the stream's only message); the status it ends with."""
    try:
        if streaming_in:
            await channel.stream_unary(method)(iter([raw]), timeout=30)
        elif streaming_out:
            async for _ in channel.unary_stream(method)(raw, timeout=30):
                pass
        else:
            await channel.unary_unary(method)(raw, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("method", "streaming_in", "streaming_out"), METHODS)
def test_undecodable_bytes_are_invalid_argument_on_every_rpc(
    tmp_path: pathlib.Path, model_bytes: bytes, method: str, streaming_in: bool, streaming_out: bool
) -> None:
    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        before = _rows(tmp_path / "s.sqlite")

        code = await raw_call(channel, method, streaming_in, streaming_out, UNDECODABLE)

        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert _rows(tmp_path / "s.sqlite") == before

    _run(tmp_path, model_bytes, body)


@pytest.mark.parametrize(
    ("method", "request_bytes"),
    [
        (
            "/overnight.v1.DeviceService/ReportFailure",
            device_pb2.FailureReport(protocol_version=V, upload_token=b"t", cause=99),
        ),
        (
            "/overnight.v1.SecAggService/AwaitServerMessage",
            secagg_pb2.AwaitServerMessageRequest(protocol_version=V, after_stage=99),  # type: ignore[arg-type]
        ),
    ],
)
def test_an_out_of_range_enum_is_invalid_argument(
    tmp_path: pathlib.Path, model_bytes: bytes, method: str, request_bytes: object
) -> None:
    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        raw = request_bytes.SerializeToString()  # type: ignore[attr-defined]
        code = await raw_call(channel, method, False, False, raw)

        assert code is grpc.StatusCode.INVALID_ARGUMENT

    _run(tmp_path, model_bytes, body)


@pytest.mark.parametrize(
    ("device_id", "code"),
    [
        ("d" * 129, grpc.StatusCode.INVALID_ARGUMENT),  # over the 128-byte field limit
        ("d" * (50 << 20), grpc.StatusCode.RESOURCE_EXHAUSTED),  # over the 64 KiB check-in
    ],
)
def test_an_oversized_device_id_is_refused_and_not_stored(
    tmp_path: pathlib.Path, model_bytes: bytes, device_id: str, code: grpc.StatusCode
) -> None:
    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        before = _rows(tmp_path / "s.sqlite")
        request = device_pb2.CheckInRequest(
            protocol_version=V, population=POPULATION, device_id=device_id, example_count=10
        )

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(request)

        assert refused.value.code() is code
        assert _rows(tmp_path / "s.sqlite") == before

    _run(tmp_path, model_bytes, body)


def test_a_device_id_of_128_bytes_passes_the_guard_to_the_identity_check(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        request = device_pb2.CheckInRequest(
            protocol_version=V, population=POPULATION, device_id="d" * 128, example_count=10
        )

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(request)

        # Not the size limit: the coordinator's own check that the id is a key's hash.
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "SHA-256 hex" in (refused.value.details() or "")

    _run(tmp_path, model_bytes, body)


def test_an_infinite_over_selection_is_refused_by_register_task(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        before = _rows(tmp_path / "s.sqlite")
        config = task_config(task_id="inf").to_proto()
        config.over_selection = float("inf")
        request = admin_pb2.RegisterTaskRequest(
            protocol_version=V, config=config, model_tflite=model_bytes
        )
        raw = request.SerializeToString()

        code = await raw_call(channel, "/overnight.v1.AdminService/RegisterTask", False, False, raw)

        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert _rows(tmp_path / "s.sqlite") == before
        await check_in_over(channel, "after")  # still serving

    _run(tmp_path, model_bytes, body)


def test_a_store_failure_reaches_the_device_as_unavailable(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        enrolled = await stub.Enroll(enroll_request(device_key("d")))
        running.store.close()  # every later store call raises sqlite3.ProgrammingError
        now = enrolled.server_time_s
        request = signed_check_in("d", now)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(request)

        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

    _run(tmp_path, model_bytes, body)


async def _assignment(channel: grpc.aio.Channel, device_id: str) -> device_pb2.Assignment:
    return (await check_in_over(channel, device_id)).assignment


def _header(assignment: device_pb2.Assignment) -> device_pb2.UploadHeader:
    return sign_header(
        device_pb2.UploadHeader(
            protocol_version=V,
            upload_token=assignment.upload_token,
            example_count=5,
            num_elements=assignment.weights.size_bytes // 4,
            encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        )
    )


async def _honest_upload(channel: grpc.aio.Channel, assignment: device_pb2.Assignment) -> None:
    header = _header(assignment)
    payload = np.zeros(header.num_elements, "<f4").tobytes()
    chunks = [device_pb2.UploadChunk(header=header), device_pb2.UploadChunk(data=payload)]
    await device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate(iter(chunks))


async def _silent_after(
    first: list[device_pb2.UploadChunk], hold: asyncio.Event
) -> AsyncIterator[device_pb2.UploadChunk]:
    for chunk in first:
        yield chunk
    await hold.wait()  # then sends nothing (a slow-loris)


class UploadArrivals(grpc.aio.ServerInterceptor):
    """Sets `arrived` once `expected` UploadUpdate calls reached the server."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = asyncio.Event()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method.endswith("/UploadUpdate"):
            self.expected -= 1
            if self.expected == 0:
                self.arrived.set()
        return await continuation(handler_call_details)


async def _trickle(
    first: device_pb2.UploadChunk, every_s: float
) -> AsyncIterator[device_pb2.UploadChunk]:
    yield first
    while True:  # never idle for long, but a few bytes at a time (a slow-loris that trickles)
        await asyncio.sleep(every_s)
        yield device_pb2.UploadChunk(data=b"\0" * 4)


def test_a_trickling_upload_is_cancelled_and_frees_its_slot(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        tricklers = [await _assignment(channel, f"trickle{i}") for i in range(2)]
        honest = await _assignment(channel, "honest")
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        # Both upload slots taken by streams that send 4 bytes every tenth of the idle time.
        calls = [
            stub.UploadUpdate(_trickle(device_pb2.UploadChunk(header=_header(a)), 0.1))
            for a in tricklers
        ]

        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await asyncio.wait_for(call, 30)
            assert cancelled.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "bytes/s" in (cancelled.value.details() or "")
        await asyncio.wait_for(_honest_upload(channel, honest), 30)

        round_ = running.coordinator.task("t1").current
        assert round_ is not None and round_.reported == 1

    _run(tmp_path, model_bytes, body, idle_s=1.0)


def test_streams_that_send_nothing_take_no_upload_slot(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def scenario() -> None:
        arrivals = UploadArrivals(2)
        async with (
            running_coordinator(
                str(tmp_path / "s.sqlite"), model_bytes, task_config(), interceptors=[arrivals]
            ) as running,
            RoutedChannel(running) as channel,
        ):
            honest = await _assignment(channel, "honest")
            hold = asyncio.Event()
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            # As many silent streams as there are upload slots, at the server before the
            # honest upload starts.
            silent = [stub.UploadUpdate(_silent_after([], hold)) for _ in range(2)]
            await asyncio.wait_for(arrivals.arrived.wait(), 30)

            await asyncio.wait_for(_honest_upload(channel, honest), 30)

            round_ = running.coordinator.task("t1").current
            assert round_ is not None and round_.reported == 1
            for call in silent:
                call.cancel()

    asyncio.run(scenario())


def test_an_idle_upload_is_cancelled_and_frees_its_slot(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        idle = [await _assignment(channel, f"idle{i}") for i in range(2)]
        honest = await _assignment(channel, "honest")
        hold = asyncio.Event()
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        # Valid headers: both streams take one of the 2 upload slots, then go silent.
        calls = [
            stub.UploadUpdate(_silent_after([device_pb2.UploadChunk(header=_header(a))], hold))
            for a in idle
        ]

        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                await asyncio.wait_for(call, 30)
            assert cancelled.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(_honest_upload(channel, honest), 30)

        round_ = running.coordinator.task("t1").current
        assert round_ is not None and round_.reported == 1

    _run(tmp_path, model_bytes, body, idle_s=0.2)


def test_refused_uploads_do_not_use_up_the_connections_streams(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    """Refused calls must free their HTTP/2 stream at once, not when the garbage collector
    finds their reference cycles (server/errors.py): with the collector off, connection-fulls
    of refused uploads and check-ins, then calls on the same connection still work."""
    header = device_pb2.UploadChunk(
        header=device_pb2.UploadHeader(
            protocol_version=V,
            upload_token=b"x" * 32,
            example_count=5,
            num_elements=10,
            encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        )
    ).SerializeToString()
    streams = limits.max_concurrent_streams_per_connection

    # Well formed, but from a key no population enrolled.
    check_in = device_pb2.CheckInRequest(
        protocol_version=V,
        population="other",
        device_id="0" * 64,
        example_count=10,
        nonce=b"n" * 16,
    ).SerializeToString()
    refused = [
        ("/overnight.v1.DeviceService/UploadUpdate", True, header, "UNAUTHENTICATED"),
        ("/overnight.v1.DeviceService/CheckIn", False, check_in, "UNAUTHENTICATED"),
        ("/overnight.v1.DeviceService/CheckIn", False, UNDECODABLE, "INVALID_ARGUMENT"),
    ]

    async def body(running: RunningCoordinator, channel: grpc.aio.Channel) -> None:
        for method, streaming, request, code in refused:
            for _ in range(3):
                codes = await asyncio.gather(
                    *(
                        raw_call(channel, method, streaming, False, request)
                        for _ in range(streams // 2)
                    )
                )
                assert {c.name for c in codes} == {code}

        codes = await asyncio.gather(
            *(
                raw_call(channel, "/overnight.v1.DeviceService/CheckIn", False, False, check_in)
                for _ in range(streams - 10)
            )
        )

        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}

    gc.disable()
    try:
        _run(tmp_path, model_bytes, body)
    finally:
        gc.enable()
