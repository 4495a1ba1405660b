"""Compressed rounds end to end: device runtime and coordinator over real gRPC on loopback.

The coordinator counts the bytes that crossed gRPC; compressed uploads must show up there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib

import grpc
import numpy as np
import pytest

from device_runtime.aggregation.client import encode_for_upload
from device_runtime.examples import LocalExamples
from device_runtime.runtime import DeviceRuntime
from device_runtime.transport import CoordinatorClient, TransportError
from emulator.data import load_digits
from protos import common_pb2
from server.coordinator import Coordinator, CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore
from tests.fakes import FakeClock, ScriptedConditions
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

SETTINGS = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=1.0))


def _run_rounds(
    tmp_path: pathlib.Path, model_bytes: bytes, aggregator: str, rounds: int = 2
) -> list[dict[str, float]]:
    clock = FakeClock()
    config = task_config(
        target_reports=1, over_selection=1.0, total_rounds=rounds, aggregator=aggregator
    )
    digits = load_digits()

    async def scenario() -> list[dict[str, float]]:
        async with running_coordinator(
            str(tmp_path / f"{aggregator[:8]}.sqlite"), model_bytes, config, clock, SETTINGS
        ) as running:
            client = CoordinatorClient(running.address, running.trust, wall_clock=clock.now)
            runtime = DeviceRuntime(
                client=client,
                population=POPULATION,
                enrollment_secret=ENROLLMENT_SECRET,
                examples=LocalExamples(digits.x[:40], digits.y[:40]),
                conditions=ScriptedConditions(),
                clock=clock,
                rng=np.random.default_rng(1),
            )
            await runtime.run(max_reports=rounds)
            await client.close()
            await running.settled()
            return [r.metrics for r in running.store.rounds("t1")]

    return asyncio.run(scenario())


def test_one_bit_rounds_commit_and_upload_a_thirtieth_of_float32(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    plain = _run_rounds(tmp_path, model_bytes, "mean")
    one_bit = _run_rounds(tmp_path, model_bytes, "one_bit_aggregator(keep_fraction=1.0)")

    assert len(one_bit) == len(plain) == 2
    assert one_bit[-1]["aggregator/num_reports"] == 1
    assert one_bit[-1]["aggregator/codec/payload_bits_per_parameter"] < 1.2
    # What crossed the wire: the upload header and framing weigh on this small model.
    assert one_bit[-1]["aggregated_bits"] < plain[-1]["aggregated_bits"] / 8
    assert (
        one_bit[-1]["aggregator/clipping/clipping_norm"]
        != one_bit[0]["aggregator/clipping/clipping_norm"]
    )  # the adaptive clip moved between rounds, carried by the committed state


def test_aggregator_state_is_restored_after_a_restart(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    metrics = _run_rounds(tmp_path, model_bytes, "robust_aggregator()", rounds=1)
    store_path = tmp_path / "robust_a.sqlite"

    restarted = Coordinator(SqliteStore(store_path), FakeClock())

    state = restarted.task("t1").aggregation.state
    assert state["clipping_estimate"] == pytest.approx(
        metrics[-1]["aggregator_state/clipping_estimate"]
    )
    assert state["clipping_estimate"] != 1.0


def test_corrupt_encoded_upload_gets_invalid_argument_and_the_token_stays_usable(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    config = task_config(target_reports=1, over_selection=1.0, aggregator="one_bit_aggregator()")

    async def scenario() -> tuple[grpc.StatusCode, int]:
        async with running_coordinator(
            str(tmp_path / "c.sqlite"), model_bytes, config, FakeClock(), SETTINGS
        ) as running:
            client = CoordinatorClient(running.address, running.trust)
            await client.enroll(POPULATION, ENROLLMENT_SECRET)
            response = await client.check_in(POPULATION, 40)
            assignment = response.assignment
            num_parameters = running.coordinator.task("t1").record.num_parameters
            good = encode_for_upload(
                assignment.aggregation,
                np.full(num_parameters, 0.01, np.float32),
                np.random.default_rng(0),
            )
            # Flag bit 0x80 is defined by no codec: a corrupt header.
            corrupt = dataclasses.replace(
                good, payload=good.payload[:1] + b"\x80" + good.payload[2:]
            )
            metrics = common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=40)
            with pytest.raises(TransportError) as refused:
                await client.upload(assignment.upload_token, corrupt, 40, metrics)
            current = running.coordinator.task("t1").current
            assert current is not None and current.aggregate.count == 0
            await client.upload(assignment.upload_token, good, 40, metrics)
            await client.close()
            await running.settled()
            return refused.value.code, len(running.store.rounds("t1"))

    code, committed = asyncio.run(scenario())

    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert committed == 1
