"""Overnight's real stack computes what TFF's simulation computes.

The same FedAvg task runs twice, on the same clients, initial weights, batch order and
optimizer settings: once with `tff.learning.algorithms.build_weighted_fed_avg` in simulation,
once through the coordinator, real gRPC on loopback and LiteRT devices.
"""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from device_runtime.clock import RealClock
from device_runtime.conditions import AlwaysEligible
from device_runtime.examples import LocalExamples
from device_runtime.runtime import DeviceRuntime
from device_runtime.transport import CoordinatorClient
from emulator.data import federated_digits
from server.coordinator import CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET
from tflite_export.exporter import export_model
from tflite_export.model_zoo import create_digits_mlp

pytestmark = pytest.mark.e2e

CLIENTS = 4
ROUNDS = 5
BATCH = 10
EPOCHS = 2
CLIENT_LR = 0.1


def _tff_fedavg(
    clients: list[LocalExamples],
    initial: list[np.ndarray],
    server_optimizer: tff.learning.optimizers.Optimizer,
) -> np.ndarray:
    def model_fn() -> tff.learning.models.VariableModel:
        keras_model = create_digits_mlp(hidden_units=16, seed=0)
        return tff.learning.models.from_keras_model(
            keras_model,
            input_spec=(
                tf.TensorSpec([None, 8, 8], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR),
        server_optimizer_fn=server_optimizer,
    )
    state = process.initialize()
    state = process.set_model_weights(
        state, tff.learning.models.ModelWeights(trainable=initial, non_trainable=[])
    )
    datasets = [
        tf.data.Dataset.from_tensor_slices((c.x, c.y)).batch(BATCH).repeat(EPOCHS) for c in clients
    ]
    for _ in range(ROUNDS):
        state = process.next(state, datasets).state
    weights = process.get_model_weights(state).trainable
    return np.concatenate([np.asarray(w).ravel() for w in weights])


def _overnight_fedavg(
    tmp_path: pathlib.Path, clients: list[LocalExamples], model_bytes: bytes, **server: object
) -> np.ndarray:
    config = task_config(
        total_rounds=ROUNDS,
        target_reports=CLIENTS,
        over_selection=1.0,
        min_reports=CLIENTS,
        epochs=EPOCHS,
        batch_size=BATCH,
        keep_order=True,
        **server,
    )
    settings = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=0.01, min_spread_s=0.05))

    async def scenario() -> np.ndarray:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, config, settings=settings
        ) as running:
            devices = []
            for index, examples in enumerate(clients):
                client = CoordinatorClient(running.address, running.trust)
                runtime = DeviceRuntime(
                    client=client,
                    population=POPULATION,
                    enrollment_secret=ENROLLMENT_SECRET,
                    examples=examples,
                    conditions=AlwaysEligible(),
                    clock=RealClock(),
                    rng=np.random.default_rng(index),
                )
                devices.append((client, runtime))
            await asyncio.gather(*(r.run(max_reports=ROUNDS) for _, r in devices))
            for client, _ in devices:
                await client.close()
            await running.settled()  # the last round commits off the request path
            task = running.coordinator.task("t1")
            assert task.committed_rounds == ROUNDS
            return task.weights.copy()

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    ("tff_optimizer", "server"),
    [
        (lambda: tff.learning.optimizers.build_sgdm(learning_rate=1.0), {}),
        (
            lambda: tff.learning.optimizers.build_adam(learning_rate=0.01),
            {"server_optimizer": "adam", "server_learning_rate": 0.01},
        ),
    ],
    ids=["sgd", "adam"],
)
def test_five_rounds_match_tff_simulation(tmp_path: pathlib.Path, tff_optimizer, server) -> None:
    clients = federated_digits(CLIENTS, alpha=0.5, seed=11).clients
    keras_model = create_digits_mlp(hidden_units=16, seed=0)
    initial = [w.numpy() for w in keras_model.trainable_weights]
    model_path = tmp_path / "mlp.tflite"
    export_model(keras_model, model_path, learning_rate=CLIENT_LR, batch_size=BATCH)

    ours = _overnight_fedavg(tmp_path, clients, model_path.read_bytes(), **server)
    theirs = _tff_fedavg(clients, initial, tff_optimizer())

    start = np.concatenate([w.ravel() for w in initial])
    assert np.max(np.abs(ours - start)) > 1e-2  # training really moved the model
    assert np.max(np.abs(ours - theirs)) <= 1e-5
