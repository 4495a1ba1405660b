"""Federated evaluation tasks: devices evaluate the training task's latest model and report
metrics only, over real gRPC with LiteRT."""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import pytest

from device_runtime.clock import RealClock
from device_runtime.conditions import AlwaysEligible
from device_runtime.examples import LocalExamples
from device_runtime.model_runner import TrainableModel
from device_runtime.runtime import DeviceRuntime, Outcome
from device_runtime.transport import CoordinatorClient
from emulator.data import load_digits
from server.coordinator import CoordinatorSettings
from server.errors import InvalidArgument
from server.pace_steering import PaceSteeringSettings
from server.store import RoundState
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET


def test_evaluation_round_reports_the_held_out_metrics_of_the_training_model(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    digits = load_digits()
    shards = [
        LocalExamples(digits.x[i * 30 : (i + 1) * 30], digits.y[i * 30 : (i + 1) * 30])
        for i in range(2)
    ]
    evaluation = task_config(
        task_id="eval",
        kind="evaluation",
        evaluates="t1",
        total_rounds=1,
        target_reports=2,
        over_selection=1.0,
    )
    settings = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=0.01))

    async def scenario():
        async with running_coordinator(
            str(tmp_path / "s.sqlite"),
            model_bytes,
            task_config(total_rounds=1000),
            settings=settings,
        ) as running:
            running.coordinator.register_task(evaluation, b"")
            outcomes = []
            for index, shard in enumerate(shards):
                client = CoordinatorClient(running.address, running.trust)
                runtime = DeviceRuntime(
                    client=client,
                    population=POPULATION,
                    enrollment_secret=ENROLLMENT_SECRET,
                    examples=shard,
                    conditions=AlwaysEligible(),
                    clock=RealClock(),
                    rng=np.random.default_rng(index),
                )
                # The training task fills first; keep checking in until this device evaluated.
                for _ in range(50):
                    attempt = await runtime.attempt()
                    outcomes.append(attempt)
                    if attempt.detail == "evaluation":
                        break
                await client.close()
            await running.settled()
            [record] = running.store.rounds("eval")
            evaluated = running.store.get_resource(record.weights_sha256)
            return outcomes, record, evaluated

    outcomes, record, evaluated = asyncio.run(scenario())

    assert [o.outcome for o in outcomes if o.detail == "evaluation"] == [Outcome.REPORTED] * 2
    assert record.state is RoundState.COMMITTED
    model = TrainableModel(model_bytes)
    model.set_weights(np.frombuffer(evaluated, "<f4").copy())
    expected = model.evaluate(
        np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards])
    )
    assert record.metrics["federated_eval/num_examples"] == 60
    assert record.metrics["federated_eval/accuracy"] == pytest.approx(expected.accuracy)
    assert record.metrics["federated_eval/loss"] == pytest.approx(expected.loss, rel=1e-5)


def test_evaluation_of_an_unknown_task_is_refused(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def scenario():
        async with running_coordinator(str(tmp_path / "s.sqlite"), model_bytes) as running:
            with pytest.raises(InvalidArgument, match="'evaluates': 'nope' is not a training task"):
                running.coordinator.register_task(
                    task_config(task_id="e", kind="evaluation", evaluates="nope"), b""
                )

    asyncio.run(scenario())
