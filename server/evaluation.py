"""Held-out evaluation of the global model on the coordinator, with LiteRT (no TensorFlow)."""

from __future__ import annotations

import logging

import numpy as np

from device_runtime.examples import LocalExamples
from device_runtime.model_runner import TrainableModel

log = logging.getLogger(__name__)


class HeldOutEvaluator:
    """Evaluates weights of any model whose input shape matches the held-out examples."""

    def __init__(self, examples: LocalExamples) -> None:
        self._examples = examples
        self._models: dict[str, TrainableModel] = {}

    def evaluate(
        self, model_sha256: str, model_bytes: bytes, weights: np.ndarray
    ) -> dict[str, float]:
        model = self._models.get(model_sha256)
        if model is None:
            model = self._models[model_sha256] = TrainableModel(model_bytes)
        if tuple(self._examples.x.shape[1:]) != tuple(model.manifest.input_shape):
            log.warning(
                "held-out examples do not fit model %s; skipping evaluation", model_sha256[:12]
            )
            return {}
        model.set_weights(weights)
        result = model.evaluate(self._examples.x, self._examples.y)
        return {
            "eval/loss": result.loss,
            "eval/accuracy": result.accuracy,
            "eval/num_examples": float(result.num_examples),
        }
