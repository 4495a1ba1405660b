"""Client and server optimizers: Keras or `tff.learning.optimizers` objects -> Overnight's.

The client optimizer becomes the update rule the exporter writes into the model (sgd,
momentum, adam: Keras 2.14's rules, which TFF's `build_sgdm` and `build_adam` equal). The
server optimizer becomes the task's `server_optimizer` with TFF's update rules
(server/optimizers.py). Hyper-parameters are read through TFF's public `get_hparams()`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff

from overnight.tff_translation.errors import NotTranslatable, describe

CLIENT_SUPPORTED = (
    "tff.learning.optimizers.build_sgdm(learning_rate, momentum), "
    "tff.learning.optimizers.build_adam(...), tf.keras.optimizers.SGD(learning_rate, momentum, "
    "nesterov), tf.keras.optimizers.Adam(...) with a constant learning rate and no weight "
    "decay, clipping, EMA or AMSGrad"
)
SERVER_SUPPORTED = (
    "tff.learning.optimizers.build_sgdm, build_adam, build_yogi, build_adagrad (with non-zero "
    "betas and epsilon), tf.keras.optimizers.SGD (no Nesterov) or Adam, or a name: sgd, sgdm, "
    "adam, yogi, adagrad"
)
# Keras config entries that change the update rule; each must have its neutral value.
_KERAS_NEUTRAL: dict[str, object] = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "amsgrad": False,
    "decay": 0.0,
}


@dataclasses.dataclass(frozen=True)
class ClientOptimizerPlan:
    """What `tflite_export.exporter.export_model` takes."""

    name: str  # sgd, momentum, adam
    learning_rate: float
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ServerOptimizerPlan:
    """The task config's server optimizer fields (0 = TFF's default in those fields)."""

    name: str
    learning_rate: float
    momentum: float = 0.0
    beta_1: float = 0.0
    beta_2: float = 0.0
    epsilon: float = 0.0
    initial_preconditioner: float = 0.0


def _instance(optimizer: object) -> object:
    """TFF users pass `lambda: tf.keras.optimizers.SGD(...)` as optimizer functions."""
    if callable(optimizer) and not hasattr(optimizer, "get_config") and not _is_tff(optimizer):
        return optimizer()
    return optimizer


def _is_tff(optimizer: object) -> bool:
    return isinstance(optimizer, tff.learning.optimizers.Optimizer)


def _tff_kind(optimizer: object) -> str | None:
    """sgdm, adam, yogi or adagrad when `optimizer` is exactly one of TFF's builders' types."""
    for kind, build in (
        ("sgdm", lambda: tff.learning.optimizers.build_sgdm(0.1)),
        ("adam", lambda: tff.learning.optimizers.build_adam(0.1)),
        ("yogi", lambda: tff.learning.optimizers.build_yogi(0.1)),
        ("adagrad", lambda: tff.learning.optimizers.build_adagrad(0.1)),
    ):
        if type(optimizer) is type(build()):
            return kind
    return None


def _tff_hparams(optimizer: Any) -> dict[str, float]:
    state = optimizer.initialize(tf.TensorSpec([1], tf.float32))
    return {key: float(value) for key, value in optimizer.get_hparams(state).items()}


def _keras_config(optimizer: tf.keras.optimizers.Optimizer, supported: str) -> dict[str, Any]:
    config = optimizer.get_config()
    for key, neutral in _KERAS_NEUTRAL.items():
        if key in config and config[key] != neutral:
            raise NotTranslatable(optimizer, f"{key}={config[key]!r} is not supported", supported)
    if not isinstance(config.get("learning_rate"), numbers.Real):
        raise NotTranslatable(
            optimizer, "a learning-rate schedule is not supported (constant only)", supported
        )
    return config


def client_optimizer(optimizer: object) -> ClientOptimizerPlan:
    """The exporter's optimizer for a Keras or TFF client optimizer. Raises NotTranslatable."""
    optimizer = _instance(optimizer)
    kind = _tff_kind(optimizer)
    if kind is not None:
        hparams = _tff_hparams(optimizer)
        match kind:
            case "sgdm":
                momentum = hparams.get("momentum", 0.0)
                if momentum == 0.0:
                    return ClientOptimizerPlan("sgd", hparams["learning_rate"])
                return ClientOptimizerPlan(
                    "momentum", hparams["learning_rate"], {"momentum": momentum}
                )
            case "adam":
                return ClientOptimizerPlan(
                    "adam",
                    hparams["learning_rate"],
                    {k: hparams[k] for k in ("beta_1", "beta_2", "epsilon")},
                )
        raise NotTranslatable(optimizer, "no on-device training rule for it", CLIENT_SUPPORTED)
    if isinstance(optimizer, tf.keras.optimizers.SGD | tf.keras.optimizers.legacy.SGD):
        config = _keras_config(optimizer, CLIENT_SUPPORTED)
        rate, momentum = float(config["learning_rate"]), float(config["momentum"])
        if momentum == 0.0:
            if config["nesterov"]:
                raise NotTranslatable(optimizer, "Nesterov without momentum", CLIENT_SUPPORTED)
            return ClientOptimizerPlan("sgd", rate)
        options = {"momentum": momentum, "nesterov": bool(config["nesterov"])}
        return ClientOptimizerPlan("momentum", rate, options)
    if isinstance(optimizer, tf.keras.optimizers.Adam | tf.keras.optimizers.legacy.Adam):
        config = _keras_config(optimizer, CLIENT_SUPPORTED)
        options = {k: float(config[k]) for k in ("beta_1", "beta_2", "epsilon")}
        return ClientOptimizerPlan("adam", float(config["learning_rate"]), options)
    raise NotTranslatable(optimizer, "not a supported client optimizer", CLIENT_SUPPORTED)


def server_optimizer(optimizer: object, learning_rate: float | None = None) -> ServerOptimizerPlan:
    """The task's server optimizer for a TFF or Keras optimizer, or a name (with
    `learning_rate`, default 1.0 as TFF's FedAvg). Raises NotTranslatable."""
    if isinstance(optimizer, str):
        if optimizer not in ("sgd", "sgdm", "adam", "yogi", "adagrad"):
            raise NotTranslatable(optimizer, "unknown server optimizer", SERVER_SUPPORTED)
        return ServerOptimizerPlan(optimizer, 1.0 if learning_rate is None else learning_rate)
    if learning_rate is not None:
        raise NotTranslatable(
            learning_rate,
            "server_learning_rate goes with an optimizer name; this optimizer object "
            f"({describe(optimizer)}) carries its own learning rate",
            SERVER_SUPPORTED,
        )
    optimizer = _instance(optimizer)
    kind = _tff_kind(optimizer)
    if kind is not None:
        h = _tff_hparams(optimizer)
        plan: ServerOptimizerPlan
        match kind:
            case "sgdm":
                momentum = h.get("momentum", 0.0)
                plan = ServerOptimizerPlan(
                    "sgdm" if momentum else "sgd", h["learning_rate"], momentum=momentum
                )
            case "adam":
                plan = ServerOptimizerPlan(
                    "adam", h["learning_rate"], 0.0, h["beta_1"], h["beta_2"], h["epsilon"]
                )
            case "yogi":
                plan = ServerOptimizerPlan(
                    "yogi",
                    h["learning_rate"],
                    0.0,
                    h["beta_1"],
                    h["beta_2"],
                    h["epsilon"],
                    # Not a hyper-parameter in TFF's sense (get_hparams leaves it out).
                    float(optimizer._initial_preconditioner_value),  # type: ignore[attr-defined]
                )
            case _:
                plan = ServerOptimizerPlan(
                    "adagrad",
                    h["learning_rate"],
                    epsilon=h["epsilon"],
                    initial_preconditioner=float(optimizer._initial_precond),  # type: ignore[attr-defined]
                )
        _refuse_zero_hparams(optimizer, plan)
        return plan
    if isinstance(optimizer, tf.keras.optimizers.SGD | tf.keras.optimizers.legacy.SGD):
        config = _keras_config(optimizer, SERVER_SUPPORTED)
        if config["nesterov"]:
            raise NotTranslatable(optimizer, "Nesterov momentum on the server", SERVER_SUPPORTED)
        momentum = float(config["momentum"])
        name = "sgdm" if momentum else "sgd"
        return ServerOptimizerPlan(name, float(config["learning_rate"]), momentum=momentum)
    if isinstance(optimizer, tf.keras.optimizers.Adam | tf.keras.optimizers.legacy.Adam):
        config = _keras_config(optimizer, SERVER_SUPPORTED)
        plan = ServerOptimizerPlan(
            "adam",
            float(config["learning_rate"]),
            beta_1=float(config["beta_1"]),
            beta_2=float(config["beta_2"]),
            epsilon=float(config["epsilon"]),
        )
        _refuse_zero_hparams(optimizer, plan)
        return plan
    raise NotTranslatable(optimizer, "not a supported server optimizer", SERVER_SUPPORTED)


def _refuse_zero_hparams(optimizer: object, plan: ServerOptimizerPlan) -> None:
    # In a task config 0 means "TFF's default", so a true 0 cannot be expressed.
    fields: dict[str, tuple[str, ...]] = {
        "adam": ("beta_1", "beta_2", "epsilon"),
        "yogi": ("beta_1", "beta_2", "epsilon"),
        "adagrad": ("epsilon", "initial_preconditioner"),
    }
    for field in fields.get(plan.name, ()):
        if getattr(plan, field) == 0.0:
            raise NotTranslatable(optimizer, f"{field} = 0 is not supported", SERVER_SUPPORTED)
