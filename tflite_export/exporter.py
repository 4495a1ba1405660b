"""Keras model -> `.tflite` training model (builtin ops only) + manifest."""

from __future__ import annotations

import logging
import pathlib
import tempfile
from typing import Any

import flatbuffers
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema

from device_runtime.manifest import (
    MANIFEST_METADATA_NAME,
    FrozenWeight,
    ModelManifest,
    WeightSpec,
    required_signatures,
)
from device_runtime.model_file import operator_names
from tflite_export.chain import layer_chain
from tflite_export.errors import ExportError
from tflite_export.layers import final_activation, plan_layers
from tflite_export.losses import resolve_loss
from tflite_export.networks import KerasNetwork, Network, PlannedNetwork
from tflite_export.optimizers import optimizer_config
from tflite_export.training_module import TrainingModule

EXPORTER_VERSION = "0.3.0"

log = logging.getLogger(__name__)


def export_model(
    model: tf.keras.Model,
    output_path: str | pathlib.Path,
    *,
    loss: str = "sparse_categorical_crossentropy",
    optimizer: str = "sgd",
    learning_rate: float = 0.02,
    batch_size: int = 20,
    optimizer_options: dict[str, Any] | None = None,
    flex: bool = False,
    fedprox: bool = False,
) -> ModelManifest:
    """Exports `model` as a TFLite training model; writes `<output>.json` beside it.

    By default the model is built from builtin ops only and runs on stock LiteRT. `flex=True`
    exports any Keras model with TensorFlow's autodiff and select TensorFlow ops; such a model
    needs the Flex delegate and the manifest says so.
    `fedprox=True` adds FedProx's proximal term and its `set_proximal_mu` signature.
    Frozen layers (`trainable = False`) stay in the model as constants, outside the weight
    vector; weight regularizers are part of the loss. A builtin-ops model with dropout reads
    its masks' noise as a `train` input, which the device draws from its round's seed.

    Raises ExportError naming the layer, loss or optimizer that cannot be exported.
    """
    if batch_size <= 0:
        raise ExportError(f"batch size must be positive, got {batch_size}")
    optimizer_settings = optimizer_config(optimizer, learning_rate, **(optimizer_options or {}))
    if not model.built:
        raise ExportError("model is not built: give its first layer an input_shape")
    if isinstance(model.output_shape, list) or isinstance(model.input_shape, list):
        raise ExportError(
            "models with several inputs or outputs are not supported; supported: one input "
            "and one output"
        )

    input_shape = tuple(int(d) for d in model.input_shape[1:])
    output_shape = tuple(int(d) for d in model.output_shape[1:])
    network: Network
    if flex:
        loss_spec = resolve_loss(loss, _flex_final_activation(model), output_shape)
        network = KerasNetwork(model, loss_spec)
        input_dtype = tf.as_dtype(model.inputs[0].dtype) if model.inputs else tf.float32
    else:
        # Layers first: an unsupported layer or activation is the more useful error.
        model_plan = plan_layers(model, batch_size)
        loss_spec = resolve_loss(loss, model_plan.final_activation, output_shape)
        if loss_spec.fuses_final_activation and model_plan.unfusable:
            # The loss reads the logits under the final activation, and there are none.
            raise ExportError(f"loss {loss_spec.name!r}: {model_plan.unfusable}")
        network = PlannedNetwork(model_plan, loss_spec)
        embedded = isinstance(layer_chain(model)[0], tf.keras.layers.Embedding)
        input_dtype = tf.int32 if embedded else tf.float32
    module = TrainingModule(
        network,
        loss_spec,
        optimizer_settings,
        input_shape=input_shape,
        input_dtype=input_dtype,
        batch_size=batch_size,
        fedprox=fedprox,
    )
    signatures = required_signatures(fedprox, network.noise_units > 0)
    tflite_bytes = _convert(module, flex, signatures)
    ops = tuple(sorted(set(operator_names(tflite_bytes))))
    non_builtin = [op for op in ops if op.startswith("Flex") or op == "CUSTOM"]
    if non_builtin and not flex:
        raise ExportError(
            f"conversion produced non-builtin ops {non_builtin}; this is an exporter bug"
        )

    weights: list[WeightSpec] = []
    offset = 0
    for name, shape in module.weight_tensors:
        spec = WeightSpec(name=name, shape=shape, offset=offset)
        weights.append(spec)
        offset += spec.size
    manifest = ModelManifest(
        input_shape=input_shape,
        input_dtype=input_dtype.name,
        label_dtype=loss_spec.label_dtype.name,
        label_shape=loss_spec.label_shape,
        num_classes=output_shape[-1] if output_shape else 1,
        batch_size=batch_size,
        weights=tuple(weights),
        signatures=signatures,
        loss=loss_spec.name,
        optimizer=optimizer_settings.to_manifest(),
        ops=ops,
        exporter_version=EXPORTER_VERSION,
        flex=flex,
        fedprox=fedprox,
        frozen_weights=tuple(FrozenWeight(name, shape) for name, shape in module.frozen_tensors),
        noise_units=network.noise_units,
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


def _flex_final_activation(model: tf.keras.Model) -> str:
    """The final activation of any model: through a chain when it is one, else its last layer's."""
    try:
        return final_activation(model)
    except ExportError:
        last = model.layers[-1]
        activation = getattr(last, "activation", None)
        if isinstance(last, tf.keras.layers.Softmax):
            return "softmax"
        return "linear" if activation is None else str(tf.keras.activations.serialize(activation))


def _convert(module: TrainingModule, flex: bool, names: dict[str, tuple[str, ...]]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="overnight-export-") as saved_model_dir:
        signatures = {name: getattr(module, name).get_concrete_function() for name in names}
        tf.saved_model.save(module, saved_model_dir, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model_dir, signature_keys=list(names)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if flex:
            converter.target_spec.supported_ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
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
