"""`overnight export`: Keras model -> TFLite training model. Imports TensorFlow only when run."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any


def load_model_factory(spec: str) -> Callable[[], Any]:
    """`path/to/model.py:create_model` or `package.module:create_model` -> the factory."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise SystemExit(
            f"model must be given as FILE.py:FUNCTION or MODULE:FUNCTION, got {spec!r}"
        )
    if location.endswith(".py"):
        path = pathlib.Path(location)
        if not path.exists():
            raise SystemExit(f"model file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"{location} has no function {name!r}")
    return factory


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "export",
        help="export a Keras model as a TFLite training model (builtin ops only)",
        description=(
            "Exports a Keras Sequential model (Dense, ReLU, Flatten, Reshape; softmax "
            "cross-entropy; SGD) to a .tflite file with train, evaluate, infer, get_weights and "
            "set_weights signatures that run on stock LiteRT without the Flex delegate. Writes "
            "the manifest into the model and beside it as OUTPUT.json."
        ),
    )
    parser.add_argument(
        "model",
        help="FILE.py:FUNCTION or MODULE:FUNCTION returning the Keras model, "
        "e.g. tflite_export.model_zoo:create_digits_mlp",
    )
    parser.add_argument("-o", "--output", required=True, help="path of the .tflite file to write")
    parser.add_argument("--loss", default="sparse_categorical_crossentropy")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument(
        "--learning-rate", type=float, default=0.02, help="client learning rate (default 0.02)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=20,
        help="fixed batch size; short batches are masked (default 20)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tflite_export.errors import ExportError
    from tflite_export.exporter import export_model

    model = load_model_factory(args.model)()
    try:
        manifest = export_model(
            model,
            args.output,
            loss=args.loss,
            optimizer=args.optimizer,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
        )
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    size = pathlib.Path(args.output).stat().st_size
    print(
        f"wrote {args.output}: {manifest.num_parameters} parameters, {size} bytes, "
        f"batch size {manifest.batch_size}, ops: {', '.join(manifest.ops)}"
    )
    return 0
