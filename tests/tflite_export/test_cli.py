"""`overnight export` with a model file, loss and optimizer options."""

from __future__ import annotations

import json
import pathlib

import pytest

from overnight.cli import main

MODEL_FILE = """
import tensorflow as tf

def create_model():
    return tf.keras.Sequential([
        tf.keras.layers.Conv2D(2, 3, padding="same", activation="relu", input_shape=(6, 6, 1)),
        tf.keras.layers.MaxPooling2D(2),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(3, activation="sigmoid"),
    ])

def create_unsupported():
    return tf.keras.Sequential([tf.keras.layers.LSTM(2, input_shape=(3, 4))])
"""


def test_export_writes_the_model_and_its_manifest(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.py").write_text(MODEL_FILE)
    output = tmp_path / "out" / "m.tflite"

    code = main(
        [
            "export",
            f"{tmp_path / 'model.py'}:create_model",
            "--loss",
            "binary_crossentropy",
            "--optimizer",
            "momentum",
            "--momentum",
            "0.9",
            "--learning-rate",
            "0.05",
            "--batch-size",
            "4",
            "-o",
            str(output),
        ]
    )

    assert code == 0
    manifest = json.loads(output.with_suffix(".tflite.json").read_text())
    assert manifest["loss"] == "binary_crossentropy"
    assert manifest["optimizer"] == {
        "name": "momentum",
        "learning_rate": 0.05,
        "momentum": 0.9,
        "nesterov": False,
    }
    assert manifest["label"] == {"dtype": "float32", "shape": [3], "num_classes": 3}
    assert manifest["batch_size"] == 4


def test_export_of_an_unsupported_layer_fails_naming_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.py").write_text(MODEL_FILE)

    code = main(
        ["export", f"{tmp_path / 'model.py'}:create_unsupported", "-o", str(tmp_path / "m.tflite")]
    )

    assert code == 2
    assert "LSTM" in capsys.readouterr().err
    assert not (tmp_path / "m.tflite").exists()
