"""Every TFF object the API accepts becomes exactly the task config of its expression; every
other one is refused by name."""

from __future__ import annotations

import math

import pytest
import tensorflow as tf
import tensorflow_federated as tff

from overnight.tff_translation.aggregators import aggregator_expression
from overnight.tff_translation.errors import NotTranslatable
from overnight.tff_translation.models import loss_name
from overnight.tff_translation.optimizers import client_optimizer, server_optimizer
from server.aggregators.presets import parse_aggregator
from tflite_export.model_zoo import create_digits_mlp


@pytest.mark.parametrize(
    ("make", "expression"),
    [
        (lambda: tff.aggregators.MeanFactory(), "mean"),
        (lambda: tff.aggregators.UnweightedMeanFactory(), "unweighted_mean"),
        (lambda: tff.learning.robust_aggregator(), "robust_aggregator()"),
        (lambda: tff.learning.robust_aggregator(zeroing=False), "robust_aggregator(zeroing=false)"),
        (
            lambda: tff.learning.robust_aggregator(clipping=False),
            "robust_aggregator(clipping=false)",
        ),
        (
            lambda: tff.learning.robust_aggregator(weighted=False),
            "robust_aggregator(weighted=false)",
        ),
        (lambda: tff.learning.compression_aggregator(), "compression_aggregator()"),
        (
            lambda: tff.learning.compression_aggregator(zeroing=False, weighted=False),
            "compression_aggregator(zeroing=false, weighted=false)",
        ),
        (
            lambda: tff.learning.dp_aggregator(noise_multiplier=1.0, clients_per_round=100),
            "dp_aggregator(noise_multiplier=1, clients_per_round=100)",
        ),
        (
            lambda: tff.learning.dp_aggregator(0.5, 20, zeroing=False),
            "dp_aggregator(noise_multiplier=0.5, clients_per_round=20, zeroing=false)",
        ),
        (
            lambda: tff.aggregators.zeroing_factory(
                5.0, tff.aggregators.clipping_factory(2.0, tff.aggregators.MeanFactory()), 2.0
            ),
            "zeroing(norm=5, norm_order=2, clipping(norm=2, mean))",
        ),
        (
            lambda: tff.aggregators.MeanFactory(
                tff.aggregators.EncodedSumFactory.quantize_above_threshold(4, 100)
            ),
            "mean(uniform(bits=4, threshold=100))",
        ),
        (
            lambda: tff.aggregators.clipping_factory(
                tff.aggregators.PrivateQuantileEstimationProcess.no_noise(3.0, 0.7, 0.5),
                tff.aggregators.UnweightedMeanFactory(),
            ),
            "clipping(initial_estimate=3, target_quantile=0.7, learning_rate=0.5, unweighted_mean)",
        ),
        (
            lambda: tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(0.8, 50, 0.3),
            "dp(noise_multiplier=0.8, clients_per_round=50, clip=0.3)",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_tff_factory_becomes_the_config_of_its_expression(make, expression: str) -> None:
    factory = make()

    translated = aggregator_expression(factory)

    assert parse_aggregator(translated) == parse_aggregator(expression)


def test_dp_with_noise_zero_keeps_tffs_noiseless_clip_count() -> None:
    translated = parse_aggregator(aggregator_expression(tff.learning.dp_aggregator(0.0, 10)))

    assert translated.dp is not None
    assert translated.dp.count_stddev == 0.0  # TFF adds no noise to the count either


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: tff.learning.secure_aggregator(), "WeightedRobustFactory"),
        (lambda: tff.aggregators.SumFactory(), "SumFactory"),
        (lambda: tff.aggregators.MeanFactory(no_nan_division=True), "MeanFactory"),
        (
            lambda: tff.aggregators.MeanFactory(tff.aggregators.SecureSumFactory(1.0)),
            "MeanFactory",
        ),
        (
            lambda: tff.aggregators.UnweightedMeanFactory(
                tff.aggregators.HadamardTransformFactory()
            ),
            "UnweightedMeanFactory",
        ),
        (lambda: tff.learning.ddp_secure_aggregator(0.1, 10), "RobustFactory"),
    ],
    ids=["secure_aggregator", "sum", "no_nan_division", "secure_sum", "hadamard", "ddp"],
)
def test_an_untranslatable_factory_is_refused_by_name(make, named: str) -> None:
    with pytest.raises(NotTranslatable, match=named) as refused:
        aggregator_expression(make())

    assert "supported:" in str(refused.value)


@pytest.mark.parametrize(
    ("optimizer", "plan"),
    [
        (lambda: tff.learning.optimizers.build_sgdm(0.1), ("sgd", 0.1, {})),
        (
            lambda: tff.learning.optimizers.build_sgdm(0.1, 0.9),
            ("momentum", 0.1, {"momentum": 0.9}),
        ),
        (
            lambda: tff.learning.optimizers.build_adam(0.01),
            ("adam", 0.01, {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}),
        ),
        (lambda: tf.keras.optimizers.SGD(0.02), ("sgd", 0.02, {})),
        (
            lambda: tf.keras.optimizers.SGD(0.02, momentum=0.5, nesterov=True),
            ("momentum", 0.02, {"momentum": 0.5, "nesterov": True}),
        ),
    ],
    ids=["tff_sgd", "tff_sgdm", "tff_adam", "keras_sgd", "keras_nesterov"],
)
def test_client_optimizers_become_the_exporters_rule(optimizer, plan) -> None:
    translated = client_optimizer(optimizer())

    assert (translated.name, translated.learning_rate, dict(translated.options)) == pytest.approx(
        plan
    )


@pytest.mark.parametrize(
    ("optimizer", "named"),
    [
        (lambda: tff.learning.optimizers.build_yogi(0.1), "_Yogi"),
        (lambda: tf.keras.optimizers.Adam(amsgrad=True), "Adam"),
        (lambda: tf.keras.optimizers.SGD(0.1, clipnorm=1.0), "SGD"),
        (lambda: tf.keras.optimizers.RMSprop(), "RMSprop"),
    ],
    ids=["yogi", "amsgrad", "clipnorm", "rmsprop"],
)
def test_an_untranslatable_client_optimizer_is_refused_by_name(optimizer, named: str) -> None:
    with pytest.raises(NotTranslatable, match=named):
        client_optimizer(optimizer())


def test_a_keras_optimizer_function_is_called_as_tff_does() -> None:
    translated = client_optimizer(lambda: tf.keras.optimizers.SGD(learning_rate=0.02))

    assert (translated.name, translated.learning_rate) == ("sgd", pytest.approx(0.02))


@pytest.mark.parametrize(
    ("optimizer", "fields"),
    [
        (lambda: tff.learning.optimizers.build_sgdm(1.0), dict(name="sgd", learning_rate=1.0)),
        (
            lambda: tff.learning.optimizers.build_sgdm(0.5, momentum=0.9),
            dict(name="sgdm", learning_rate=0.5, momentum=0.9),
        ),
        (
            lambda: tff.learning.optimizers.build_adam(0.01, beta_1=0.8),
            dict(name="adam", learning_rate=0.01, beta_1=0.8, beta_2=0.999, epsilon=1e-7),
        ),
        (
            lambda: tff.learning.optimizers.build_yogi(0.01),
            dict(name="yogi", learning_rate=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-3),
        ),
        (
            lambda: tff.learning.optimizers.build_adagrad(0.1),
            dict(name="adagrad", learning_rate=0.1, epsilon=1e-7, initial_preconditioner=0.1),
        ),
        (lambda: tf.keras.optimizers.SGD(learning_rate=1.0), dict(name="sgd", learning_rate=1.0)),
    ],
    ids=["sgd", "sgdm", "adam", "yogi", "adagrad", "keras_sgd"],
)
def test_server_optimizers_read_through_get_hparams(optimizer, fields) -> None:
    translated = server_optimizer(optimizer())

    for field, value in fields.items():
        assert getattr(translated, field) == pytest.approx(value), field


def test_a_server_optimizer_by_name_takes_a_learning_rate() -> None:
    translated = server_optimizer("adam", learning_rate=0.01)

    assert (translated.name, translated.learning_rate) == ("adam", 0.01)


def test_adam_with_beta_1_zero_is_refused_as_the_config_reads_zero_as_default() -> None:
    with pytest.raises(NotTranslatable, match="beta_1 = 0"):
        server_optimizer(tff.learning.optimizers.build_adam(0.01, beta_1=0.0))


def test_the_loss_must_agree_with_the_models_last_activation() -> None:
    softmax_model = create_digits_mlp(hidden_units=4, seed=0)
    loss = tf.keras.losses.SparseCategoricalCrossentropy()

    assert loss_name(loss, softmax_model) == "sparse_categorical_crossentropy"
    with pytest.raises(NotTranslatable, match="from_logits=True"):
        loss_name(tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), softmax_model)


@pytest.mark.parametrize(
    "loss",
    [
        tf.keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        tf.keras.losses.Huber(),
        tf.keras.losses.MeanSquaredError(reduction="sum"),
    ],
    ids=["label_smoothing", "huber", "sum_reduction"],
)
def test_an_untranslatable_loss_is_refused_by_name(loss) -> None:
    with pytest.raises(NotTranslatable, match=type(loss).__name__):
        loss_name(loss, create_digits_mlp(hidden_units=4, seed=0))


def test_zeroing_learning_rate_read_back_is_exactly_tffs_ln10() -> None:
    config = parse_aggregator(aggregator_expression(tff.learning.robust_aggregator()))

    assert config.zeroing is not None and config.zeroing.adaptive is not None
    assert config.zeroing.adaptive.learning_rate == math.log(10.0)
