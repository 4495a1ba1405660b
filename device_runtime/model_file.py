"""Reads a `.tflite` training model with `flatbuffers` only: its manifest, ops and signatures.

The schema comes from the `tflite` package (one small generated module per table, ~1 MiB
resident), not from LiteRT's `schema_py_generated`: that single 690 KB module added ~35 MiB
to the resident memory of a training process, a quarter of the McMahan CNN's.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import tflite as schema

from device_runtime.manifest import MANIFEST_METADATA_NAME, ManifestError, ModelManifest

T = TypeVar("T")
P = ParamSpec("P")

_BUILTIN_NAMES = {
    value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


def _corrupt_file_is_manifest_error(reader: Callable[P, T]) -> Callable[P, T]:
    """A truncated or corrupted flatbuffer raises ManifestError, not a struct error."""

    @functools.wraps(reader)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return reader(*args, **kwargs)
        except ManifestError:
            raise
        except (
            struct.error,
            IndexError,
            UnicodeDecodeError,
            AttributeError,
            TypeError,
            ValueError,  # numpy, reading a vector that runs past the buffer
            OverflowError,
        ) as exc:
            raise ManifestError(
                f"model file is corrupt or truncated ({exc.__class__.__name__})"
            ) from exc

    return wrapper


def _root(tflite_bytes: bytes) -> schema.Model:
    if len(tflite_bytes) < 8 or tflite_bytes[4:8] != b"TFL3":
        raise ManifestError("file is not a TFLite model (missing the TFL3 identifier)")
    return schema.Model.GetRootAsModel(tflite_bytes, 0)


@_corrupt_file_is_manifest_error
def operator_names(tflite_bytes: bytes) -> list[str]:
    """Names of the operators the model uses: builtin names, or the custom code (e.g. FlexX)."""
    model = _root(tflite_bytes)
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            names.append((code.CustomCode() or b"CUSTOM").decode())
        else:
            names.append(_BUILTIN_NAMES.get(builtin, f"BUILTIN_{builtin}"))
    return names


@_corrupt_file_is_manifest_error
def signature_inputs(tflite_bytes: bytes) -> dict[str, tuple[str, ...]]:
    """Signature name -> input names, as the graph declares them."""
    model = _root(tflite_bytes)
    signatures = {}
    for i in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(i)
        inputs = tuple(sig.Inputs(j).Name().decode() for j in range(sig.InputsLength()))
        signatures[sig.SignatureKey().decode()] = inputs
    return signatures


_TENSOR_TYPE_NAMES = {
    value: name.lower()
    for name, value in vars(schema.TensorType).items()
    if not name.startswith("_")
}


@_corrupt_file_is_manifest_error
def signature_input_specs(tflite_bytes: bytes, signature: str) -> dict[str, tuple[tuple, str]]:
    """Input name -> (shape, dtype name) of one signature, as the graph declares them."""
    model = _root(tflite_bytes)
    for i in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(i)
        if sig.SignatureKey().decode() != signature:
            continue
        subgraph = model.Subgraphs(sig.SubgraphIndex())
        specs = {}
        for j in range(sig.InputsLength()):
            tensor = subgraph.Tensors(sig.Inputs(j).TensorIndex())
            shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
            specs[sig.Inputs(j).Name().decode()] = (shape, _TENSOR_TYPE_NAMES[tensor.Type()])
        return specs
    raise ManifestError(f"graph has no signature {signature!r}")


def _check_train_inputs(tflite_bytes: bytes, manifest: ModelManifest) -> None:
    batch = manifest.batch_size
    expected = {
        "x": ((batch, *manifest.input_shape), manifest.input_dtype),
        "y": ((batch, *manifest.label_shape), manifest.label_dtype),
        "mask": ((batch,), "float32"),
    }
    graph = signature_input_specs(tflite_bytes, "train")
    for name, (shape, dtype) in expected.items():
        if graph.get(name) != (shape, dtype):
            raise ManifestError(
                f"train input {name!r}: manifest says {dtype} {list(shape)}, "
                f"graph has {graph.get(name)}"
            )


@_corrupt_file_is_manifest_error
def read_manifest(tflite_bytes: bytes) -> ModelManifest:
    """Reads the embedded manifest and checks it against the graph.

    Raises ManifestError saying what is missing or what disagrees.
    """
    model = _root(tflite_bytes)
    text = None
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == MANIFEST_METADATA_NAME.encode():
            text = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    if text is None:
        raise ManifestError(
            f"model has no {MANIFEST_METADATA_NAME!r} metadata: "
            "was it exported by `overnight export`?"
        )
    manifest = ModelManifest.from_json(text)
    graph_signatures = signature_inputs(tflite_bytes)
    for name, inputs in manifest.signatures.items():
        if name not in graph_signatures:
            raise ManifestError(f"manifest lists signature {name!r}, which the graph does not have")
        if sorted(graph_signatures[name]) != sorted(inputs):
            raise ManifestError(
                f"signature {name!r}: manifest says inputs {sorted(inputs)}, "
                f"graph has {sorted(graph_signatures[name])}"
            )
    graph_ops = sorted(set(operator_names(tflite_bytes)))
    if graph_ops != sorted(manifest.ops):
        raise ManifestError(f"manifest lists ops {sorted(manifest.ops)}, graph uses {graph_ops}")
    graph_needs_flex = any(op.startswith("Flex") for op in graph_ops)
    if graph_needs_flex and not manifest.flex:
        raise ManifestError(
            "graph uses Flex (select TensorFlow) ops, the manifest says it does not"
        )
    _check_train_inputs(tflite_bytes, manifest)
    return manifest
