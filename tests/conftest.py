"""Shared fixtures: one exported model per session, a fake clock, a coordinator on loopback."""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BATCH_SIZE = 8


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A small digits MLP exported once per session (batch size 8)."""
    from tflite_export.exporter import export_model
    from tflite_export.model_zoo import create_digits_mlp

    path = tmp_path_factory.mktemp("model") / "digits_mlp.tflite"
    export_model(
        create_digits_mlp(hidden_units=16, seed=1), path, learning_rate=0.1, batch_size=BATCH_SIZE
    )
    return path


@pytest.fixture(scope="session")
def model_bytes(model_path: pathlib.Path) -> bytes:
    return model_path.read_bytes()
