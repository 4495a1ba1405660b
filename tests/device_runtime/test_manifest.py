"""The device validates a model's manifest against its graph before running anything."""

from __future__ import annotations

import dataclasses

import pytest

from device_runtime.manifest import (
    FrozenWeight,
    ManifestError,
    ModelManifest,
    WeightSpec,
    required_signatures,
)
from device_runtime.model_file import read_manifest
from device_runtime.model_runner import TrainableModel
from tflite_export.exporter import embed_manifest


def test_manifest_json_round_trips(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)

    assert ModelManifest.from_json(manifest.to_json()) == manifest


def test_frozen_weights_and_dropout_noise_round_trip(model_bytes: bytes) -> None:
    manifest = dataclasses.replace(
        read_manifest(model_bytes),
        frozen_weights=(FrozenWeight("base/kernel", (3, 4)),),
        noise_units=12,
        signatures=required_signatures(fedprox=False, dropout=True),
        fedprox=False,
    )

    again = ModelManifest.from_json(manifest.to_json())

    assert again == manifest
    assert again.num_frozen_parameters == 12
    assert again.signatures["train"] == ("x", "y", "mask", "noise")


def test_a_dropout_model_whose_train_takes_no_noise_is_refused(model_bytes: bytes) -> None:
    manifest = dataclasses.replace(read_manifest(model_bytes), noise_units=12)

    with pytest.raises(ManifestError, match="signature 'train' takes"):
        ModelManifest.from_json(manifest.to_json())


def test_not_a_tflite_file_is_refused() -> None:
    with pytest.raises(ManifestError, match="not a TFLite model"):
        read_manifest(b"\x00" * 64)


def test_model_without_manifest_is_refused(model_bytes: bytes) -> None:
    stripped = model_bytes.replace(b"overnight_manifest", b"overnight_xxxxxxxx")

    with pytest.raises(ManifestError, match="no 'overnight_manifest' metadata"):
        read_manifest(stripped)


def test_truncated_model_is_refused(model_bytes: bytes) -> None:
    with pytest.raises(ManifestError, match="corrupt or truncated"):
        read_manifest(model_bytes[: len(model_bytes) // 3])


def test_manifest_signature_that_disagrees_with_graph_is_named(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)
    signatures = dict(manifest.signatures, infer=("x", "extra"))
    lying = dataclasses.replace(manifest, signatures=signatures)

    with pytest.raises(ManifestError, match="signature 'infer'"):
        read_manifest(embed_manifest(model_bytes, lying))


def test_manifest_ops_that_disagree_with_graph_are_named(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)
    lying = dataclasses.replace(manifest, ops=(*manifest.ops, "CONV_2D"))

    with pytest.raises(ManifestError, match="ops"):
        read_manifest(embed_manifest(model_bytes, lying))


def test_weight_layout_that_disagrees_with_graph_is_refused(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)
    extra = WeightSpec(name="ghost", shape=(3,), offset=manifest.num_parameters)
    lying = dataclasses.replace(manifest, weights=(*manifest.weights, extra))

    with pytest.raises(ManifestError, match=f"{manifest.num_parameters + 3} parameters"):
        TrainableModel(embed_manifest(model_bytes, lying))


def test_non_contiguous_weight_layout_is_refused(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)
    first, *rest = manifest.weights
    lying = dataclasses.replace(manifest, weights=(dataclasses.replace(first, offset=5), *rest))

    with pytest.raises(ManifestError, match="contiguous"):
        read_manifest(embed_manifest(model_bytes, lying))


def test_flex_model_is_refused_without_tensorflow(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)
    flex = dataclasses.replace(manifest, flex=True)

    with pytest.raises(ManifestError, match="Flex delegate"):
        TrainableModel(embed_manifest(model_bytes, flex))


def test_label_shape_that_disagrees_with_graph_is_named(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)
    lying = dataclasses.replace(manifest, label_shape=(10,), label_dtype="float32")

    with pytest.raises(ManifestError, match=r"train input 'y'.*float32 \[8, 10\]"):
        read_manifest(embed_manifest(model_bytes, lying))


def test_input_shape_that_disagrees_with_graph_is_named(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)
    lying = dataclasses.replace(manifest, input_shape=(64,))

    with pytest.raises(ManifestError, match=r"train input 'x'.*\[8, 64\]"):
        read_manifest(embed_manifest(model_bytes, lying))


def test_unknown_input_dtype_is_refused(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)
    lying = dataclasses.replace(manifest, input_dtype="complex64")

    with pytest.raises(ManifestError, match="input dtype 'complex64'"):
        read_manifest(embed_manifest(model_bytes, lying))


def test_manifest_records_what_the_device_needs(model_bytes: bytes) -> None:
    manifest = read_manifest(model_bytes)

    assert manifest.loss == "sparse_categorical_crossentropy"
    assert manifest.label_shape == () and manifest.label_dtype == "int32"
    assert manifest.optimizer == {"name": "sgd", "learning_rate": 0.1}
    assert "reset_optimizer" in manifest.signatures
    # FedProx is opt-in: this model was exported without it.
    assert manifest.fedprox is False and "set_proximal_mu" not in manifest.signatures
    assert not any(op.startswith("Flex") for op in manifest.ops)


def test_a_fedprox_manifest_without_set_proximal_mu_is_refused(model_bytes: bytes) -> None:
    lying = dataclasses.replace(read_manifest(model_bytes), fedprox=True)

    with pytest.raises(ManifestError, match="required signature 'set_proximal_mu'"):
        read_manifest(embed_manifest(model_bytes, lying))
