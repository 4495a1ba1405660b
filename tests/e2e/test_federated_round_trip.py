"""End to end on overnight.testing: coordinator + 10 emulated phones + 3 rounds over real
gRPC and TLS, LiteRT training, the task created and followed through the Python API."""

from __future__ import annotations

import sqlite3

import pytest
import tensorflow as tf

from device_runtime.model_runner import TrainableModel
from emulator.data import federated_digits
from tflite_export.model_zoo import create_digits_mlp

pytestmark = pytest.mark.e2e

DATA = federated_digits(10, seed=3)


@pytest.fixture
def overnight_held_out():
    return DATA.test


def test_three_rounds_raise_accuracy_and_count_every_report(overnight_coordinator) -> None:
    client = overnight_coordinator.connect()
    task = client.create_task(
        "digits-mlp",
        population="digits",
        model=lambda: create_digits_mlp(hidden_units=64, seed=3),
        loss="sparse_categorical_crossentropy",
        client_optimizer=tf.keras.optimizers.SGD(learning_rate=0.2),
        rounds=3,
        clients_per_round=5,
        min_clients_per_round=4,
        epochs=10,
        batch_size=10,
    )
    initial = task.evaluate(DATA.test.x, DATA.test.y)

    run = overnight_coordinator.fleet("digits", DATA.clients, seed=3).run_task(task)

    committed = run.committed
    assert len(committed) == 3
    # Accuracy rises: above the untrained model, and the last round above the first.
    accuracies = run.metric("eval/accuracy")
    assert accuracies[-1] > accuracies[0]
    assert accuracies[-1] > initial.accuracy + 0.2
    # Every committed round has exactly the reports it claims, each counted once.
    database = overnight_coordinator.local.data_dir / "coordinator.sqlite"
    with sqlite3.connect(database) as db:
        counted = dict(
            db.execute(
                "SELECT round_number, COUNT(*) FROM counted_uploads GROUP BY round_number"
            ).fetchall()
        )
    for r in committed:
        assert counted[r.round_number] == r.reported == r.metrics["aggregator/num_reports"]
    phone_reports = sum(len(phone.reported_rounds) for phone in run.phones)
    assert phone_reports >= sum(r.reported for r in committed)
    # Bytes that crossed the wire grow round over round.
    bits = run.metric("aggregated_bits")
    parameters = TrainableModel(task.model_tflite or b"").manifest.num_parameters
    assert bits == sorted(bits) and bits[0] >= 4 * 32 * parameters
    # The Keras model holds the committed weights: it predicts as LiteRT evaluated.
    keras_accuracy = task.keras_model().predict(DATA.test.x, verbose=0).argmax(-1) == DATA.test.y
    assert keras_accuracy.mean() == pytest.approx(task.evaluate(DATA.test.x, DATA.test.y).accuracy)
