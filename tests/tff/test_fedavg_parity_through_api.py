"""The same Python objects through TFF and through Overnight's API give the same model.

`model_fn`, `tff.learning.optimizers.build_sgdm` / `build_adam` and
`tff.aggregators.MeanFactory()` go once into `tff.learning.algorithms.build_weighted_fed_avg`
(simulation) and once into `overnight.connect(...).create_task(...)`, trained by emulated
phones (LiteRT, real gRPC and TLS) on the same clients in the same batch order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from emulator.data import federated_digits
from tflite_export.model_zoo import create_digits_mlp

pytestmark = pytest.mark.e2e

CLIENTS = 4
ROUNDS = 5
BATCH = 10
EPOCHS = 2
DATA = federated_digits(CLIENTS, alpha=0.5, seed=11)


def model_fn() -> tf.keras.Model:
    return create_digits_mlp(hidden_units=16, seed=0)


def _tff_weights(server_optimizer: Callable[[], object]) -> np.ndarray:
    def tff_model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            model_fn(),
            input_spec=(tf.TensorSpec([None, 8, 8], tf.float32), tf.TensorSpec([None], tf.int32)),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        tff_model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
        server_optimizer_fn=server_optimizer(),
        model_aggregator=tff.aggregators.MeanFactory(),
    )
    state = process.initialize()
    datasets = [
        tf.data.Dataset.from_tensor_slices((c.x, c.y)).batch(BATCH).repeat(EPOCHS)
        for c in DATA.clients
    ]
    for _ in range(ROUNDS):
        state = process.next(state, datasets).state
    weights = process.get_model_weights(state).trainable
    return np.concatenate([np.asarray(w).ravel() for w in weights])


@pytest.mark.parametrize(
    "server_optimizer",
    [
        lambda: tff.learning.optimizers.build_sgdm(learning_rate=1.0),
        lambda: tff.learning.optimizers.build_adam(learning_rate=0.01),
    ],
    ids=["sgd", "adam"],
)
def test_five_rounds_through_create_task_match_tff(overnight_coordinator, server_optimizer) -> None:
    task = overnight_coordinator.connect().create_task(
        "parity",
        population="digits",
        model=model_fn,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
        server_optimizer=server_optimizer(),
        aggregator=tff.aggregators.MeanFactory(),
        rounds=ROUNDS,
        clients_per_round=CLIENTS,
        over_selection=1.0,
        epochs=EPOCHS,
        batch_size=BATCH,
        keep_order=True,
    )

    run = overnight_coordinator.fleet("digits", DATA.clients).run_task(task)
    ours = task.weights()
    theirs = _tff_weights(server_optimizer)

    assert len(run.committed) == ROUNDS
    start = np.concatenate([w.numpy().ravel() for w in model_fn().trainable_weights])
    assert np.max(np.abs(ours - start)) > 1e-2  # training really moved the model
    assert np.max(np.abs(ours - theirs)) <= 1e-5
