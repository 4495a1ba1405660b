"""Keras models used by the demo and tests, in the style of the TFF tutorials."""

from __future__ import annotations

import tensorflow as tf


def create_digits_mlp(hidden_units: int = 64, seed: int = 0) -> tf.keras.Sequential:
    """An MLP for the 8x8 digits: Flatten -> Dense(relu) -> Dense(softmax)."""
    initializer = tf.keras.initializers.GlorotUniform(seed=seed)
    return tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=(8, 8)),
            tf.keras.layers.Dense(hidden_units, activation="relu", kernel_initializer=initializer),
            tf.keras.layers.Dense(10, activation="softmax", kernel_initializer=initializer),
        ]
    )
