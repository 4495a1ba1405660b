"""Keras model -> `.tflite` training model (builtin ops only) + manifest."""

from __future__ import annotations

import logging
import pathlib
import tempfile

import flatbuffers
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema

from device_runtime.manifest import (
    MANIFEST_METADATA_NAME,
    REQUIRED_SIGNATURES,
    ModelManifest,
    WeightSpec,
)
from device_runtime.model_file import operator_names
from tflite_export.errors import ExportError
from tflite_export.layers import final_activation, plan_layers
from tflite_export.training_module import TrainingModule

EXPORTER_VERSION = "0.1.0"
SUPPORTED_LOSSES = ("sparse_categorical_crossentropy",)
SUPPORTED_OPTIMIZERS = ("sgd",)

log = logging.getLogger(__name__)


def export_model(
    model: tf.keras.Model,
    output_path: str | pathlib.Path,
    *,
    loss: str = "sparse_categorical_crossentropy",
    optimizer: str = "sgd",
    learning_rate: float = 0.02,
    batch_size: int = 20,
) -> ModelManifest:
    """Exports `model` as a builtin-ops TFLite training model; writes `<output>.json` beside it.

    Raises ExportError naming the layer, loss or optimizer that cannot be exported.
    """
    if loss not in SUPPORTED_LOSSES:
        raise ExportError(
            f"loss {loss!r} is not supported; supported: {', '.join(SUPPORTED_LOSSES)}"
        )
    if optimizer not in SUPPORTED_OPTIMIZERS:
        raise ExportError(
            f"optimizer {optimizer!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_OPTIMIZERS)}"
        )
    if batch_size <= 0:
        raise ExportError(f"batch size must be positive, got {batch_size}")
    if not learning_rate > 0:
        raise ExportError(f"learning rate must be positive, got {learning_rate}")
    if not model.built:
        raise ExportError("model is not built: give its first layer an input_shape")

    input_shape = tuple(int(d) for d in model.input_shape[1:])
    num_classes = int(model.output_shape[-1])
    plans = plan_layers(model, batch_size)
    module = TrainingModule(
        plans,
        input_shape=input_shape,
        num_classes=num_classes,
        batch_size=batch_size,
        learning_rate=learning_rate,
        output_softmax=final_activation(model) == "softmax",
    )
    tflite_bytes = _convert(module)
    ops = tuple(sorted(set(operator_names(tflite_bytes))))
    flex_ops = [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    if flex_ops:
        raise ExportError(
            f"conversion produced non-builtin ops {flex_ops}; this is an exporter bug"
        )

    weights: list[WeightSpec] = []
    offset = 0
    for variable in module.weight_variables:
        spec = WeightSpec(
            name=variable.name.split(":")[0], shape=tuple(variable.shape), offset=offset
        )
        weights.append(spec)
        offset += spec.size
    manifest = ModelManifest(
        input_shape=input_shape,
        input_dtype="float32",
        label_dtype="int32",
        num_classes=num_classes,
        batch_size=batch_size,
        weights=tuple(weights),
        signatures=dict(REQUIRED_SIGNATURES),
        loss=loss,
        optimizer={"name": optimizer, "learning_rate": learning_rate},
        ops=ops,
        exporter_version=EXPORTER_VERSION,
    )
    manifest.check_consistent()
    output_path = pathlib.Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_bytes(embed_manifest(tflite_bytes, manifest))
    output_path.with_suffix(output_path.suffix + ".json").write_text(manifest.to_json() + "\n")
    log.info(
        "exported %s: %d parameters, %d bytes, ops %s",
        output_path,
        manifest.num_parameters,
        output_path.stat().st_size,
        ", ".join(ops),
    )
    return manifest


def _convert(module: TrainingModule) -> bytes:
    with tempfile.TemporaryDirectory(prefix="overnight-export-") as saved_model_dir:
        signatures = {
            name: getattr(module, name).get_concrete_function() for name in REQUIRED_SIGNATURES
        }
        tf.saved_model.save(module, saved_model_dir, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model_dir, signature_keys=list(REQUIRED_SIGNATURES)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            return bytes(converter.convert())
        except Exception as exc:  # the converter raises a zoo of types
            raise ExportError(f"TFLite conversion failed: {exc}") from exc


def embed_manifest(tflite_bytes: bytes, manifest: ModelManifest) -> bytes:
    """Returns the model with the manifest stored as a metadata entry (replacing an older one)."""
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite_bytes, 0))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(manifest.to_json().encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = MANIFEST_METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [
        m
        for m in (model.metadata or [])
        if m.name not in (MANIFEST_METADATA_NAME.encode(), MANIFEST_METADATA_NAME)
    ] + [entry]
    builder = flatbuffers.Builder(len(tflite_bytes) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
