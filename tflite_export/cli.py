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
            "Exports a Keras Sequential model, or a functional one that is a single chain of "
            "layers (Dense, Conv2D, Max/AveragePooling2D, GlobalAveragePooling, Embedding, "
            "Flatten, Reshape, Dropout; relu, tanh, sigmoid, softmax; L1/L2 weight "
            "regularizers; frozen layers stay out of the federated update) to a .tflite file "
            "with train, evaluate, infer, get_weights, set_weights, and reset_optimizer "
            "signatures (plus set_proximal_mu with --fedprox) that run on "
            "stock LiteRT without the Flex delegate. Writes the manifest into the model and "
            "beside it as OUTPUT.json. "
            "--flex exports any Keras model for devices that ship TensorFlow."
        ),
    )
    parser.add_argument(
        "model",
        help="FILE.py:FUNCTION or MODULE:FUNCTION returning the Keras model, "
        "e.g. tflite_export.model_zoo:create_digits_mlp",
    )
    parser.add_argument("-o", "--output", required=True, help="path of the .tflite file to write")
    parser.add_argument(
        "--loss",
        default="sparse_categorical_crossentropy",
        help="sparse_categorical_crossentropy (default), categorical_crossentropy, "
        "binary_crossentropy or mean_squared_error; logits or probabilities follow the "
        "model's last activation",
    )
    parser.add_argument("--optimizer", default="sgd", help="sgd (default), momentum or adam")
    parser.add_argument("--momentum", type=float, help="momentum optimizer: its momentum")
    parser.add_argument("--nesterov", action="store_true", help="momentum optimizer: Nesterov")
    parser.add_argument("--beta-1", type=float, help="adam: beta_1 (default 0.9)")
    parser.add_argument("--beta-2", type=float, help="adam: beta_2 (default 0.999)")
    parser.add_argument("--epsilon", type=float, help="adam: epsilon (default 1e-7)")
    parser.add_argument(
        "--flex",
        action="store_true",
        help="export any Keras model with select TensorFlow ops (needs TensorFlow on device)",
    )
    parser.add_argument(
        "--fedprox",
        action="store_true",
        help="include FedProx's proximal term (set_proximal_mu); needed by tasks with "
        "fedprox_mu > 0, costs a second copy of the weights on the device",
    )
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
    options = {
        name: getattr(args, name)
        for name in ("momentum", "beta_1", "beta_2", "epsilon")
        if getattr(args, name) is not None
    }
    if args.nesterov:
        options["nesterov"] = True
    try:
        manifest = export_model(
            model,
            args.output,
            loss=args.loss,
            optimizer=args.optimizer,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            optimizer_options=options,
            flex=args.flex,
            fedprox=args.fedprox,
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
