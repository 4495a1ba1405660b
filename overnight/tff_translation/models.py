"""The model and its loss: a Keras model or `model_fn`, and a Keras loss -> what the exporter
takes. TFF's `from_keras_model(keras_model, loss=...)` pairs the same two objects."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from overnight.tff_translation.errors import NotTranslatable
from tflite_export.layers import final_activation

MODEL_SUPPORTED = (
    "a tf.keras.Model, or a function of no arguments returning one (TFF's model_fn, without "
    "the tff.learning.models.from_keras_model wrapping: pass its loss as `loss`)"
)
LOSS_SUPPORTED = (
    "tf.keras.losses.SparseCategoricalCrossentropy, CategoricalCrossentropy, "
    "BinaryCrossentropy (from_logits matching the model's last activation, no label "
    "smoothing) and MeanSquaredError, with the default reduction; or their names"
)
_LOSS_NAMES = {
    tf.keras.losses.SparseCategoricalCrossentropy: "sparse_categorical_crossentropy",
    tf.keras.losses.CategoricalCrossentropy: "categorical_crossentropy",
    tf.keras.losses.BinaryCrossentropy: "binary_crossentropy",
    tf.keras.losses.MeanSquaredError: "mean_squared_error",
}


def keras_model(model: Any) -> tf.keras.Model:
    """The Keras model `model` is or builds. Raises NotTranslatable."""
    built = model if isinstance(model, tf.keras.Model) else model()
    if not isinstance(built, tf.keras.Model):
        raise NotTranslatable(built, "model_fn must return the Keras model itself", MODEL_SUPPORTED)
    return built


def loss_name(loss: tf.keras.losses.Loss | str, model: tf.keras.Model) -> str:
    """The exporter's name for `loss` on `model`. Keras reads `from_logits=False` outputs as
    probabilities and `True` as logits; the exporter reads a softmax/sigmoid output as
    probabilities and a linear one as logits, so the two must agree. Raises NotTranslatable."""
    if isinstance(loss, str):
        return loss
    name = next((n for kind, n in _LOSS_NAMES.items() if type(loss) is kind), None)
    if name is None:
        raise NotTranslatable(loss, "no on-device form of this loss", LOSS_SUPPORTED)
    config = loss.get_config()
    if config.get("reduction") not in ("auto", "sum_over_batch_size"):
        raise NotTranslatable(loss, f"reduction {config.get('reduction')!r}", LOSS_SUPPORTED)
    for key, neutral in (("label_smoothing", 0.0), ("axis", -1), ("ignore_class", None)):
        if key in config and config[key] != neutral:
            raise NotTranslatable(loss, f"{key}={config[key]!r}", LOSS_SUPPORTED)
    if "from_logits" in config:
        logits_out = final_activation(model) == "linear"
        if bool(config["from_logits"]) != logits_out:
            raise NotTranslatable(
                loss,
                f"from_logits={config['from_logits']} but the model ends in "
                f"{final_activation(model)}",
                LOSS_SUPPORTED,
            )
    return name
