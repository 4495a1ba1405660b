"""Graceful drain with devices mid-upload: real gRPC over TLS on loopback, real SQLite.
Event-driven: each step waits for what the server has done, never for time."""

from __future__ import annotations

import asyncio
import logging
import pathlib

import grpc
import numpy as np
import pytest

from device_runtime import constants
from protos import common_pb2, device_pb2, device_pb2_grpc
from server.drain import (
    Ending,
    abandon_open_rounds,
    drain_retry_s,
    run_to_exit,
    wait_for_drain,
)
from server.sqlite_store import SqliteStore
from server.store import RoundState
from tests.harness import POPULATION, RunningCoordinator, running_coordinator, task_config
from tests.identities import check_in_over, sign_header

V = constants.PROTOCOL_VERSION


async def _check_in(channel: grpc.aio.Channel, device_id: str) -> device_pb2.CheckInResponse:
    return await check_in_over(channel, device_id, POPULATION)


async def _drain(running: RunningCoordinator) -> Ending:
    gate, driver = running.server.drain_gate, running.coordinator.driver
    return await wait_for_drain(gate, driver, 3600.0, asyncio.Event())


class HalfUpload:
    """An upload stream that has sent its header and half its payload."""

    def __init__(self, channel: grpc.aio.Channel, token: bytes, n: int) -> None:
        header = device_pb2.UploadHeader(
            protocol_version=V,
            upload_token=token,
            example_count=5,
            num_elements=n,
            encoding="float32_delta",
            metrics=common_pb2.ClientMetrics(num_examples=5, num_batches=1),
        )
        payload = np.full(n, 0.25, "<f4").tobytes()
        self._parts = [payload[: len(payload) // 2], payload[len(payload) // 2 :]]
        self._header = header
        self.call = device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate()

    async def start(self) -> None:
        await self.call.write(device_pb2.UploadChunk(header=sign_header(self._header)))
        await self.call.write(device_pb2.UploadChunk(data=self._parts[0]))

    async def finish(self) -> device_pb2.UploadResponse:
        await self.call.write(device_pb2.UploadChunk(data=self._parts[1]))
        await self.call.done_writing()
        return await self.call


async def _mid_upload(
    running: RunningCoordinator, channel: grpc.aio.Channel, devices: str, uploading: int
) -> list[HalfUpload]:
    """Devices check in; the first `uploading` of them are left mid-upload, each holding an
    upload slot (the server has read their headers)."""
    tokens = [(await _check_in(channel, d)).assignment.upload_token for d in devices]
    n = running.coordinator.task("t1").record.num_parameters
    uploads = [HalfUpload(channel, t, n) for t in tokens[:uploading]]
    for upload in uploads:
        await upload.start()
    while running.server.device_service.upload_slots.in_use < uploading:
        await asyncio.sleep(0.01)
    return uploads


def _store_rounds(path: pathlib.Path) -> list[tuple[int, RoundState]]:
    store = SqliteStore(str(path))
    try:
        return [(r.round_number, r.state) for r in store.rounds("t1")]
    finally:
        store.close()


def test_check_ins_during_a_drain_are_rejected_with_a_retry_window(tmp_path, model_bytes) -> None:
    async def scenario() -> device_pb2.CheckInResponse:
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes, task_config()) as running,
            running.device_channel() as channel,
        ):
            await running.server.begin_drain()
            return await _check_in(channel, "late")

    response = asyncio.run(scenario())

    assert response.WhichOneof("outcome") == "rejection"
    assert response.rejection.reason == device_pb2.Rejection.SHUTTING_DOWN
    window = response.retry_window
    assert (window.min_delay_s, window.max_delay_s) == drain_retry_s


def test_uploads_under_way_finish_and_their_round_commits(tmp_path, model_bytes) -> None:
    path = tmp_path / "s.sqlite"

    async def scenario() -> tuple[Ending, list[device_pb2.UploadResponse], str]:
        async with (
            running_coordinator(str(path), model_bytes, task_config()) as running,
            running.device_channel() as channel,
        ):
            uploads = await _mid_upload(running, channel, "abc", uploading=2)
            await running.server.begin_drain()
            ending = asyncio.create_task(
                wait_for_drain(
                    running.server.drain_gate, running.coordinator.driver, 3600.0, asyncio.Event()
                )
            )
            late = await _check_in(channel, "late")
            responses = [await u.finish() for u in uploads]
            return await ending, responses, late.WhichOneof("outcome")

    ending, responses, late = asyncio.run(scenario())

    assert ending is Ending.DRAINED
    assert len(responses) == 2 and late == "rejection"
    assert _store_rounds(path) == [(1, RoundState.COMMITTED)]


def test_a_round_short_of_its_target_is_recorded_abandoned(tmp_path, model_bytes) -> None:
    path = tmp_path / "s.sqlite"

    async def scenario() -> tuple[Ending, int]:
        async with (
            running_coordinator(str(path), model_bytes, task_config()) as running,
            running.device_channel() as channel,
        ):
            [upload] = await _mid_upload(running, channel, "abc", uploading=1)
            await running.server.begin_drain()
            ending = asyncio.create_task(
                wait_for_drain(
                    running.server.drain_gate, running.coordinator.driver, 3600.0, asyncio.Event()
                )
            )
            await upload.finish()  # one report of the two the round needs
            result = await ending
            await running.server.stop(0)
            return result, abandon_open_rounds(running.coordinator)

    ending, abandoned = asyncio.run(scenario())

    assert (ending, abandoned) == (Ending.DRAINED, 1)
    assert _store_rounds(path) == [(1, RoundState.ABANDONED)]


@pytest.mark.parametrize("how", ["interrupted", "timed out"])
def test_an_interrupted_or_timed_out_drain_ends_at_once_and_keeps_what_was_committed(
    tmp_path, model_bytes, how
) -> None:
    path = tmp_path / "s.sqlite"

    async def scenario() -> tuple[Ending, grpc.StatusCode]:
        async with (
            running_coordinator(str(path), model_bytes, task_config()) as running,
            running.device_channel() as channel,
        ):
            for upload in await _mid_upload(running, channel, "abc", uploading=2):
                await upload.finish()
            await running.settled()  # round 1 committed
            uploads = await _mid_upload(running, channel, "def", uploading=2)
            await running.server.begin_drain()
            interrupted = asyncio.Event()
            if how == "interrupted":
                interrupted.set()  # a second SIGTERM
            ending = await wait_for_drain(
                running.server.drain_gate,
                running.coordinator.driver,
                3600.0 if how == "interrupted" else 0.0,
                interrupted,
            )
            await running.server.stop(0)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await uploads[0].call  # the stopped server ended it
            return ending, info.value.code()

    ending, lost_upload = asyncio.run(scenario())

    assert ending.value == how
    assert lost_upload in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert (1, RoundState.COMMITTED) in _store_rounds(path)
    assert (2, RoundState.COMMITTED) not in _store_rounds(path)


def test_the_process_exits_even_when_a_task_swallows_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = []

    async def stubborn() -> None:
        started.append(True)
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # the defect: cancellation swallowed

    async def polite() -> None:
        await asyncio.sleep(3600)

    async def main() -> None:
        asyncio.get_running_loop().create_task(stubborn(), name="stubborn")
        asyncio.get_running_loop().create_task(polite(), name="polite")
        await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="server.drain"):
        run_to_exit(main(), leftover_s=0.2)  # asyncio.run(main()) would never return

    assert started == [True]
    (record,) = caplog.records
    assert "stubborn did not end" in record.getMessage()
    assert "in stubborn" in record.getMessage()  # where it was stuck
