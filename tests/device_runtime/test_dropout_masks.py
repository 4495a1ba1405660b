"""Dropout masks come from the seed of each assignment's plan: every device and every round
draws its own, and a fixed seed draws the same masks again."""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import pytest

from device_runtime.examples import LocalExamples
from device_runtime.model_runner import TrainableModel
from device_runtime.runtime import DeviceRuntime
from device_runtime.transport import CoordinatorClient
from tests.fakes import FakeClock, ScriptedConditions
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

RATE = 0.5
INPUTS = 400


@pytest.fixture(scope="module")
def probe_model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Dropout on the input of one linear unit, batch 1: the kernel's update is non-zero
    exactly where the mask kept the input."""
    import tensorflow as tf

    from tflite_export.exporter import export_model

    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [layers.Dropout(RATE, input_shape=(INPUTS,)), layers.Dense(1, use_bias=False)]
    )
    path = tmp_path_factory.mktemp("dropout") / "probe.tflite"
    export_model(model, path, loss="mse", learning_rate=0.1, batch_size=1)
    return path.read_bytes()


def _kept(model: TrainableModel, seed: int) -> np.ndarray:
    """The inputs the mask kept in one train step seeded with `seed`."""
    initial = model.get_weights()
    x = np.ones((1, INPUTS), np.float32)
    y = np.full((1, 1), 5.0, np.float32)
    model.train(x, y, 1, np.random.default_rng(0), shuffle=False, dropout_seed=seed)
    kept = model.get_weights() != initial
    model.set_weights(initial)
    return kept


def test_a_seed_fixes_the_masks_and_another_seed_draws_others(probe_model: bytes) -> None:
    model = TrainableModel(probe_model)

    first, again, other = _kept(model, 11), _kept(model, 11), _kept(model, 12)

    assert model.manifest.noise_units == INPUTS
    assert "RANDOM_UNIFORM" not in model.manifest.ops  # the masks' noise is an input
    assert 0.4 < first.mean() < 0.6  # 1 - RATE, give or take sampling
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


class NoiseRecordingModel(TrainableModel):
    """The real model; keeps the noise of the first step of each training, keyed by device."""

    drawn: dict[str, list[np.ndarray]] = {}

    def __init__(self, tflite_bytes: bytes, device_id: str) -> None:
        super().__init__(tflite_bytes)
        self._device_id = device_id
        self._fresh = False

    def seed_dropout(self, seed: int) -> None:
        super().seed_dropout(seed)
        self._fresh = True

    def dropout_noise(self) -> np.ndarray | None:
        noise = super().dropout_noise()
        if self._fresh and noise is not None:
            self.drawn.setdefault(self._device_id, []).append(noise >= RATE)
            self._fresh = False
        return noise


def test_two_devices_and_two_rounds_draw_different_masks(
    tmp_path: pathlib.Path, probe_model: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=2, over_selection=1.0, total_rounds=2, batch_size=1)
    rng = np.random.default_rng(1)
    examples = LocalExamples(
        rng.normal(size=(3, INPUTS)).astype(np.float32), rng.normal(size=(3, 1)).astype(np.float32)
    )
    NoiseRecordingModel.drawn = {}

    async def scenario() -> list[int]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), probe_model, config, clock
        ) as running:
            clients = [CoordinatorClient(running.address, running.trust) for _ in range(2)]
            runtimes = [
                DeviceRuntime(
                    client=client,
                    population=POPULATION,
                    enrollment_secret=ENROLLMENT_SECRET,
                    examples=examples,
                    conditions=ScriptedConditions(),
                    clock=clock,
                    # The same generator seed on both: only the plan's seed tells them apart.
                    rng=np.random.default_rng(5),
                    model_loader=lambda data, device_id=device_id: NoiseRecordingModel(
                        data, device_id
                    ),
                )
                for client, device_id in zip(clients, ("edge-a", "edge-b"), strict=True)
            ]
            await asyncio.gather(*(runtime.run(max_reports=2) for runtime in runtimes))
            for client in clients:
                await client.close()
            await running.settled()  # the last round commits off the request path
            return [r.reported for r in running.store.rounds("t1")]

    reported = asyncio.run(scenario())

    assert reported == [2, 2]
    a_round_1, a_round_2 = NoiseRecordingModel.drawn["edge-a"]
    b_round_1, b_round_2 = NoiseRecordingModel.drawn["edge-b"]
    assert (a_round_1 != b_round_1).any()  # two devices, one round
    assert (a_round_1 != a_round_2).any()  # one device, two rounds
    assert (b_round_1 != b_round_2).any()
