"""The Python API against a real coordinator (TLS, operator token): control and refusals."""

from __future__ import annotations

import grpc
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import overnight
from tflite_export.model_zoo import create_digits_mlp


def _create(client: overnight.Client, **overrides: object) -> overnight.Task:
    arguments: dict[str, object] = dict(
        population="digits",
        model=lambda: create_digits_mlp(hidden_units=8, seed=0),
        loss="sparse_categorical_crossentropy",
        client_optimizer=tf.keras.optimizers.SGD(learning_rate=0.1),
        rounds=2,
        clients_per_round=2,
        batch_size=8,
    )
    arguments.update(overrides)
    return client.create_task("t1", **arguments)  # type: ignore[arg-type]


def test_an_untranslatable_object_is_refused_before_anything_is_registered(
    overnight_coordinator,
) -> None:
    client = overnight_coordinator.connect()

    with pytest.raises(overnight.NotTranslatable, match="_Yogi"):
        _create(client, client_optimizer=tff.learning.optimizers.build_yogi(0.1))

    assert client.tasks() == []


def test_pause_resume_and_cancel_change_the_tasks_state(overnight_coordinator) -> None:
    task = _create(overnight_coordinator.connect())

    states = [task.pause(), task.resume(), task.cancel()]

    assert states == ["paused", "running", "cancelled"]
    assert list(task.rounds(progress=False)) == []  # a cancelled task's stream ends at once


def test_the_registered_config_carries_the_translated_objects(overnight_coordinator) -> None:
    task = _create(
        overnight_coordinator.connect(),
        server_optimizer=tff.learning.optimizers.build_sgdm(0.5, momentum=0.9),
        eligibility=overnight.Eligibility(min_examples=20, min_separation_s=60.0),
    )

    config = task.status().config

    assert (config.server_optimizer.name, config.server_learning_rate) == ("sgdm", 0.5)
    assert config.server_optimizer.momentum == pytest.approx(0.9)
    assert (config.eligibility.min_examples, config.eligibility.min_separation_s) == (20, 60.0)
    assert config.aggregator == "mean"


def test_a_wrong_token_is_unauthenticated(overnight_coordinator) -> None:
    credentials = overnight.Credentials(
        token="not-a-token", root_certificates=overnight_coordinator.credentials.root_certificates
    )
    client = overnight.connect(overnight_coordinator.admin_address, credentials=credentials)

    with pytest.raises(overnight.AdminError) as refused:
        client.tasks()

    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_an_untrusted_coordinator_is_not_reached(overnight_coordinator) -> None:
    credentials = overnight.Credentials(token="x")  # system trust store: not the test CA
    client = overnight.connect(overnight_coordinator.admin_address, credentials=credentials)

    with pytest.raises(overnight.AdminError) as refused:
        client.tasks()

    assert refused.value.code is grpc.StatusCode.UNAVAILABLE


def test_rounds_shows_a_progress_bar_of_committed_rounds(overnight_coordinator, capsys) -> None:
    task = _create(overnight_coordinator.connect())
    task.cancel()

    list(task.rounds())

    assert "task t1" in capsys.readouterr().err  # tqdm's bar (a widget in a notebook)
