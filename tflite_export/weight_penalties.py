"""Keras's weight regularizers and constraints, as the builtin-ops exporter treats them.

L1, L2 and L1L2 kernel, bias and embeddings regularizers add to the loss, as in Keras's
`model.losses` (and TFF's Keras wrapper, which adds them to the client loss). Activity
regularizers and weight constraints are refused: the first penalise a layer's output, the
second project the weights after each optimizer step; neither is in the exported graph.
"""

from __future__ import annotations

import tensorflow as tf

from tflite_export.errors import ExportError
from tflite_export.layer_plan import WeightPenalty

SUPPORTED_REGULARIZERS = "L1, L2 and L1L2 kernel, bias and embeddings regularizers"
_CONSTRAINTS = ("kernel_constraint", "bias_constraint", "embeddings_constraint")


def check_layer_extras(layer: tf.keras.layers.Layer) -> None:
    """Refuses an activity regularizer or a weight constraint, naming the layer."""
    if getattr(layer, "activity_regularizer", None) is not None:
        raise ExportError(
            f"layer {layer.name!r}: activity_regularizer is not supported (it penalises the "
            f"layer's output); supported: {SUPPORTED_REGULARIZERS}"
        )
    for attribute in _CONSTRAINTS:
        constraint = getattr(layer, attribute, None)
        if constraint is not None:
            raise ExportError(
                f"layer {layer.name!r}: {attribute} {type(constraint).__name__} is not "
                "supported (the exported optimizer does not project weights after a step); "
                "supported: layers without constraints"
            )


def weight_penalty(layer: tf.keras.layers.Layer, attribute: str) -> WeightPenalty | None:
    """The penalty of `layer`'s `attribute` regularizer (e.g. 'kernel_regularizer'), if any."""
    regularizer = getattr(layer, attribute, None)
    if regularizer is None:
        return None
    regularizers = tf.keras.regularizers
    if isinstance(regularizer, regularizers.L1L2):
        penalty = WeightPenalty(float(regularizer.l1), float(regularizer.l2))
    elif isinstance(regularizer, regularizers.L1):
        penalty = WeightPenalty(l1=float(regularizer.l1))
    elif isinstance(regularizer, regularizers.L2):
        penalty = WeightPenalty(l2=float(regularizer.l2))
    else:
        raise ExportError(
            f"layer {layer.name!r}: {attribute} {type(regularizer).__name__} is not "
            f"supported; supported: {SUPPORTED_REGULARIZERS}"
        )
    return penalty if penalty.l1 or penalty.l2 else None
