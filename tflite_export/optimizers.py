"""Client optimizers written by hand, their state in variables, as Keras 2.14 computes them.

A Keras optimizer inside the training graph would bring its own ops and slot bookkeeping; the
update rules are a few lines each, so we write them with builtin ops. The state (momentum,
Adam's moments and step count) lives in variables that `reset()` zeroes, so a device can start
each round from a fresh optimizer as TFF's client update does.

The slots start as copies of their variable, not as zeros: the converter stores a constant
buffer per distinct initial value, so zero-initialised slots would add one or two model-sized
buffers to the file, while a copy of the weights shares theirs. The step count says whether the
slots hold state: at step 0 they are read as zero, so a reset only zeroes the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tflite_export.errors import ExportError

SUPPORTED_OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What the manifest records: the name and every hyper-parameter."""

    name: str
    learning_rate: float
    momentum: float = 0.0
    nesterov: bool = False
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    def to_manifest(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "learning_rate": self.learning_rate}
        if self.name == "momentum":
            body.update(momentum=self.momentum, nesterov=self.nesterov)
        if self.name == "adam":
            body.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return body


def optimizer_config(name: str, learning_rate: float, **options: Any) -> OptimizerConfig:
    """Validates the optimizer name and options; raises ExportError saying what is supported."""
    name = name.lower()
    if name not in SUPPORTED_OPTIMIZERS:
        raise ExportError(
            f"optimizer {name!r} is not supported; supported: {', '.join(SUPPORTED_OPTIMIZERS)}"
        )
    if not learning_rate > 0:
        raise ExportError(f"learning rate must be positive, got {learning_rate}")
    allowed = {"sgd": set(), "momentum": {"momentum", "nesterov"}}.get(
        name, {"beta_1", "beta_2", "epsilon"}
    )
    unknown = set(options) - allowed
    if unknown:
        raise ExportError(
            f"optimizer {name!r} takes no option {sorted(unknown)}; "
            f"it takes {sorted(allowed) or 'none'}"
        )
    config = OptimizerConfig(name, float(learning_rate), **options)
    if name == "momentum" and not 0.0 < config.momentum < 1.0:
        raise ExportError(f"momentum must be in (0, 1), got {config.momentum}")
    if name == "adam" and not (0 <= config.beta_1 < 1 and 0 <= config.beta_2 < 1):
        raise ExportError(f"Adam betas must be in [0, 1), got {config.beta_1}, {config.beta_2}")
    return config


class ClientOptimizer(tf.Module):
    """Applies one update to `variables` from their gradients; `reset()` zeroes the state."""

    def __init__(self, config: OptimizerConfig, variables: Sequence[tf.Variable]) -> None:
        super().__init__(name="client_optimizer")
        self.config = config
        self._variables = list(variables)
        self._slots: list[list[tf.Variable]] = []
        slot_names = {"sgd": (), "momentum": ("momentum",), "adam": ("m", "v")}[config.name]
        for variable in self._variables:
            self._slots.append(
                [
                    tf.Variable(variable.read_value(), name=f"{slot}/{variable.name.split(':')[0]}")
                    for slot in slot_names
                ]
            )
        self._step = tf.Variable(0.0, name="optimizer_step")

    def reset(self) -> None:
        self._step.assign(0.0)

    def apply(self, gradients: Sequence[tf.Tensor]) -> None:
        config = self.config
        lr = config.learning_rate
        previous_step = self._step.read_value()
        has_state = tf.cast(previous_step > 0.0, tf.float32)
        step = previous_step + 1.0
        self._step.assign(step)
        if config.name == "adam":
            # Keras's Adam folds both bias corrections into the step size.
            alpha = (
                lr
                * tf.sqrt(1.0 - tf.pow(config.beta_2, step))
                / (1.0 - tf.pow(config.beta_1, step))
            )
        for variable, gradient, slots in zip(self._variables, gradients, self._slots, strict=True):
            match config.name:
                case "sgd":
                    variable.assign_sub(lr * gradient)
                case "momentum":
                    (velocity,) = slots
                    new_velocity = config.momentum * (velocity * has_state) - lr * gradient
                    velocity.assign(new_velocity)
                    if config.nesterov:
                        variable.assign_add(config.momentum * new_velocity - lr * gradient)
                    else:
                        variable.assign_add(new_velocity)
                case "adam":
                    m_slot, v_slot = slots
                    m, v = m_slot * has_state, v_slot * has_state
                    new_m = m + (gradient - m) * (1.0 - config.beta_1)
                    new_v = v + (gradient * gradient - v) * (1.0 - config.beta_2)
                    m_slot.assign(new_m)
                    v_slot.assign(new_v)
                    variable.assign_sub(new_m * alpha / (tf.sqrt(new_v) + config.epsilon))
