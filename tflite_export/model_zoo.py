"""Keras models used by the demo and tests, in the style of the TFF tutorials."""

from __future__ import annotations

import functools

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


def create_mcmahan_cnn(num_classes: int = 10, seed: int = 0) -> tf.keras.Sequential:
    """The CNN of McMahan et al. 2017 as in TFF's EMNIST tutorial: 1,663,370 parameters.

    Two 5x5 'same' convolutions (32 and 64 filters, ReLU), each followed by 2x2 max-pooling,
    a 512-unit ReLU layer and a softmax output over `num_classes`.
    """
    initializer = tf.keras.initializers.GlorotUniform(seed=seed)
    conv = functools.partial(
        tf.keras.layers.Conv2D,
        kernel_size=5,
        padding="same",
        activation=tf.nn.relu,
        kernel_initializer=initializer,
    )
    pool = functools.partial(tf.keras.layers.MaxPooling2D, pool_size=(2, 2), padding="same")
    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=(28, 28, 1)),
            conv(filters=32),
            pool(),
            conv(filters=64),
            pool(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(512, activation=tf.nn.relu, kernel_initializer=initializer),
            tf.keras.layers.Dense(num_classes, kernel_initializer=initializer),
            tf.keras.layers.Softmax(),
        ]
    )
