"""Server optimizers with TFF's update rules and defaults (`tff.learning.optimizers`).

The aggregate a round produces is the mean model delta (trained - initial). TFF feeds its
negation to the server optimizer as a gradient, so plain SGD with learning rate 1.0 (TFF's
default) sets the global model to the clients' mean. Arithmetic is float32, as in TFF.

State is a flat dict of numpy arrays and scalars, serialized with the round's commit so a
restarted coordinator continues with the same moments (FedOpt, Reddi et al. 2021).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Literal, assert_never

import numpy as np

OptimizerName = Literal["sgd", "sgdm", "adam", "yogi", "adagrad"]
OPTIMIZERS: tuple[OptimizerName, ...] = ("sgd", "sgdm", "adam", "yogi", "adagrad")

State = dict[str, np.ndarray]

# TFF 0.87 defaults per optimizer (learning rate excepted: always given).
TFF_DEFAULTS: dict[OptimizerName, dict[str, float]] = {
    "sgd": {},
    "sgdm": {"momentum": 0.0},
    "adam": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
    "yogi": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-3, "initial_preconditioner": 1e-6},
    "adagrad": {"initial_preconditioner": 0.1, "epsilon": 1e-7},
}


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
    name: OptimizerName
    learning_rate: float
    momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    initial_preconditioner: float = 0.0

    @classmethod
    def with_tff_defaults(
        cls, name: str, learning_rate: float, **overrides: float
    ) -> ServerOptimizer:
        if name not in OPTIMIZERS:
            raise ValueError(f"server optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
        params = {**TFF_DEFAULTS[name], **overrides}  # type: ignore[index]
        return cls(name=name, learning_rate=learning_rate, **params)  # type: ignore[arg-type]

    def initialize(self, num_parameters: int) -> State:
        zeros = np.zeros(num_parameters, np.float32)
        match self.name:
            case "sgd":
                return {}
            case "sgdm":
                return {"accumulator": zeros}
            case "adam":
                return {
                    "step": np.zeros((), np.int64),
                    "accumulator": zeros,
                    "preconditioner": zeros.copy(),
                }
            case "yogi":
                preconditioner = np.full(num_parameters, self.initial_preconditioner, np.float32)
                return {
                    "step": np.zeros((), np.int64),
                    "accumulator": zeros,
                    "preconditioner": preconditioner,
                }
            case "adagrad":
                return {
                    "preconditioner": np.full(
                        num_parameters, self.initial_preconditioner, np.float32
                    )
                }
            case _:
                assert_never(self.name)

    def apply(
        self, state: State, weights: np.ndarray, mean_delta: np.ndarray
    ) -> tuple[State, np.ndarray]:
        """Returns the new state and weights. Does not modify its arguments."""
        g = -mean_delta.astype(np.float32)
        w = weights.astype(np.float32)
        lr = np.float32(self.learning_rate)
        f32 = np.float32
        match self.name:
            case "sgd":
                return {}, w - lr * g
            case "sgdm":
                if self.momentum == 0.0:
                    return dict(state), w - lr * g
                a = f32(self.momentum) * state["accumulator"] + g
                return {"accumulator": a}, w - lr * a
            case "adam" | "yogi":
                step = state["step"] + 1
                b1, b2, eps = f32(self.beta_1), f32(self.beta_2), f32(self.epsilon)
                t = f32(step)
                normalized_lr = lr * np.sqrt(f32(1.0) - b2**t) / (f32(1.0) - b1**t)
                a = state["accumulator"] + (g - state["accumulator"]) * (f32(1.0) - b1)
                p = state["preconditioner"]
                if self.name == "adam":
                    p = p + (np.square(g) - p) * (f32(1.0) - b2)
                else:
                    g2 = np.square(g)
                    p = p + (f32(1.0) - b2) * np.sign(g2 - p) * g2
                w = w - normalized_lr * a / (np.sqrt(p) + eps)
                return {
                    "step": np.asarray(step, np.int64),
                    "accumulator": a,
                    "preconditioner": p,
                }, w
            case "adagrad":
                p = state["preconditioner"] + np.square(g)
                return {"preconditioner": p}, w - lr * g / np.sqrt(p + f32(self.epsilon))
            case _:
                assert_never(self.name)


def serialize_state(state: State) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    return buffer.getvalue()


def deserialize_state(data: bytes) -> State:
    if not data:
        return {}
    with np.load(io.BytesIO(data)) as archive:
        return {key: archive[key] for key in archive.files}
