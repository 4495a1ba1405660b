"""The coordinator's logs in JSON, as a log pipeline reads them: a round over real gRPC,
every line parsed, the task and round on the lines about them, and device ids only at DEBUG."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import pathlib
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from device_runtime import constants
from device_runtime.logs import JsonLogFormatter
from protos import common_pb2, device_pb2, device_pb2_grpc
from tests.harness import running_coordinator, task_config
from tests.identities import check_in_over, device_key, sign_header, signed_check_in

DEVICES = ("phone-a", "phone-b", "phone-c")
STRANGER = "phone-never-enrolled"


@contextlib.contextmanager
def _json_log(level: int) -> Iterator[io.StringIO]:
    """Every record at `level` and above, as `serve --log-format json` writes it."""
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    before = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(before)


async def _a_round_with_a_refusal(tmp_path: pathlib.Path, model_bytes: bytes) -> None:
    async with (
        running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, task_config(target_reports=2)
        ) as running,
        running.device_channel() as channel,
    ):
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):  # not enrolled: refused, and logged
            await stub.CheckIn(signed_check_in(STRANGER, time.time()))
        tokens = [(await check_in_over(channel, d)).assignment.upload_token for d in DEVICES]
        n = running.coordinator.task("t1").record.num_parameters
        for token in tokens[:2]:
            header = device_pb2.UploadHeader(
                protocol_version=constants.PROTOCOL_VERSION,
                upload_token=token,
                example_count=5,
                num_elements=n,
                encoding="float32_delta",
                metrics=common_pb2.ClientMetrics(num_examples=5, num_batches=1),
            )
            payload = np.full(n, 0.25, "<f4").tobytes()
            chunks = [
                device_pb2.UploadChunk(header=sign_header(header)),
                device_pb2.UploadChunk(data=payload),
            ]
            await stub.UploadUpdate(iter(chunks))
        await running.settled()


def _logged(tmp_path: pathlib.Path, model_bytes: bytes, level: int) -> list[str]:
    with _json_log(level) as lines:
        asyncio.run(_a_round_with_a_refusal(tmp_path, model_bytes))
    return lines.getvalue().splitlines()


def _device_ids() -> list[str]:
    ids = [device_key(name).device_id for name in (*DEVICES, STRANGER)]
    return ids + [i[:12] for i in ids]  # a prefix identifies a device as well


def test_every_line_is_one_json_object_with_time_level_logger_and_message(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    lines = _logged(tmp_path, model_bytes, logging.DEBUG)

    records = [json.loads(line) for line in lines]

    assert records
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert record["time"].endswith("Z")


def test_lines_about_a_round_carry_its_task_and_number(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    records = [json.loads(line) for line in _logged(tmp_path, model_bytes, logging.INFO)]

    committed = [r for r in records if "committed" in r["message"]]
    assert committed, records
    assert (committed[0]["task"], committed[0]["round"]) == ("t1", 1)
    selecting = [r for r in records if "selecting" in r["message"]]
    assert (selecting[0]["task"], selecting[0]["round"]) == ("t1", 1)


def test_no_device_id_is_logged_at_info_or_above(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    lines = _logged(tmp_path, model_bytes, logging.DEBUG)

    shown = [line for line in lines if json.loads(line)["level"] != "DEBUG"]
    assert any("refused" in line for line in shown)  # the stranger's refusal is there
    for line in shown:
        for device_id in _device_ids():
            assert device_id not in line, line


def test_at_debug_an_assignment_names_its_device(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    records = [json.loads(line) for line in _logged(tmp_path, model_bytes, logging.DEBUG)]

    devices = {r["device"] for r in records if r["level"] == "DEBUG" and "device" in r}
    assert devices == {device_key(name).device_id for name in DEVICES}
