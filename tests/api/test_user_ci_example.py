"""The README's example of a user's own CI test with overnight.testing, run as it is shown."""

import pytest
import tensorflow as tf
import tensorflow_federated as tff

from emulator.data import federated_digits

pytest_plugins = ["overnight.testing"]
pytestmark = pytest.mark.e2e

DATA = federated_digits(8, alpha=0.5, seed=3)  # 8 phones' non-IID digits, and a test split


def model_fn() -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=(8, 8)),
            tf.keras.layers.Dense(32, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )


@pytest.fixture
def overnight_held_out():
    return DATA.test  # the coordinator reports eval/accuracy on it after every commit


def test_three_rounds_on_eight_phones_learn_the_digits(overnight_coordinator):
    client = overnight_coordinator.connect()
    task = client.create_task(
        "digits",
        population="phones",
        model=model_fn,
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
        server_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
        aggregator=tff.aggregators.MeanFactory(),
        rounds=3,
        clients_per_round=4,
        over_selection=1.0,
        epochs=5,
        batch_size=10,
    )

    run = overnight_coordinator.fleet("phones", DATA.clients).run_task(task)

    assert [r.round_number for r in run.committed] == [1, 2, 3]
    assert all(r.reported == 4 for r in run.committed)
    accuracy = run.metric("eval/accuracy")
    assert accuracy[-1] > accuracy[0]
    assert sum(len(phone.reported_rounds) for phone in run.phones) == 12
    assert task.evaluate(DATA.test.x, DATA.test.y).accuracy == pytest.approx(accuracy[-1])
