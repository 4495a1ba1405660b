"""The model manifest: what a device must know about a `.tflite` training model.

The exporter writes it (as JSON beside the model and inside the model's metadata under
`MANIFEST_METADATA_NAME`); the device runtime reads and validates it before running anything.
It is owned here, by the device runtime, because the device is the side that must be able to
trust it without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MANIFEST_FORMAT = "overnight-tflite-training"
MANIFEST_VERSION = 2
MANIFEST_METADATA_NAME = "overnight_manifest"
# The dtypes a model's inputs and labels may have (numpy names).
TENSOR_DTYPES = ("float32", "int32")

# Signatures every builtin-ops training model exposes, with their input names.
REQUIRED_SIGNATURES: dict[str, tuple[str, ...]] = {
    "train": ("x", "y", "mask"),
    "evaluate": ("x", "y", "mask"),
    "infer": ("x",),
    "get_weights": (),
    "set_weights": ("weights",),
    "reset_optimizer": (),
}
# Signatures of a model exported with FedProx (`overnight export --fedprox`).
FEDPROX_SIGNATURES: dict[str, tuple[str, ...]] = {"set_proximal_mu": ("mu",)}
# A model with dropout trains on uniform noise the device draws from its round's seed.
DROPOUT_TRAIN_INPUTS = ("x", "y", "mask", "noise")


def required_signatures(fedprox: bool, dropout: bool = False) -> dict[str, tuple[str, ...]]:
    signatures = {**REQUIRED_SIGNATURES, **(FEDPROX_SIGNATURES if fedprox else {})}
    if dropout:
        signatures["train"] = DROPOUT_TRAIN_INPUTS
    return signatures


class ManifestError(ValueError):
    """The manifest is missing, malformed, or disagrees with the model graph."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One trainable tensor inside the flat float32 weight vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size


@dataclasses.dataclass(frozen=True)
class FrozenWeight:
    """A weight of a frozen layer (Keras's `trainable = False`): a constant of the model,
    outside the flat weight vector and the federated update."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size


@dataclasses.dataclass(frozen=True)
class ModelManifest:
    input_shape: tuple[int, ...]  # per example, without the batch dimension
    input_dtype: str
    label_dtype: str
    num_classes: int  # size of the output's last axis
    batch_size: int
    weights: tuple[WeightSpec, ...]
    signatures: dict[str, tuple[str, ...]]
    loss: str
    optimizer: dict[str, Any]
    ops: tuple[str, ...]
    exporter_version: str
    flex: bool = False
    label_shape: tuple[int, ...] = ()  # per example: () for class ids, (units,) otherwise
    # FedProx's proximal term is in the graph (set_proximal_mu). Manifests written before it
    # was opt-in always had it, hence the default when the field is absent.
    fedprox: bool = True
    frozen_weights: tuple[FrozenWeight, ...] = ()
    # Uniform noise values per example that `train` reads (its `noise` input, for dropout);
    # 0: no dropout, and `train` takes x, y and mask only.
    noise_units: int = 0

    @property
    def num_parameters(self) -> int:
        return sum(w.size for w in self.weights)

    @property
    def num_frozen_parameters(self) -> int:
        return sum(w.size for w in self.frozen_weights)

    def to_json(self) -> str:
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "input": {"shape": list(self.input_shape), "dtype": self.input_dtype},
            "label": {
                "dtype": self.label_dtype,
                "shape": list(self.label_shape),
                "num_classes": self.num_classes,
            },
            "batch_size": self.batch_size,
            "weights": [
                {"name": w.name, "shape": list(w.shape), "offset": w.offset, "size": w.size}
                for w in self.weights
            ],
            "num_parameters": self.num_parameters,
            "signatures": {k: list(v) for k, v in self.signatures.items()},
            "loss": self.loss,
            "optimizer": self.optimizer,
            "ops": list(self.ops),
            "exporter_version": self.exporter_version,
            "flex": self.flex,
            "fedprox": self.fedprox,
            "frozen_weights": [
                {"name": w.name, "shape": list(w.shape), "size": w.size}
                for w in self.frozen_weights
            ],
            "noise_units": self.noise_units,
        }
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelManifest:
        try:
            body = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"manifest format is not {MANIFEST_FORMAT!r}")
        if body.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"manifest version {body.get('version')!r} is not supported "
                f"(this runtime reads version {MANIFEST_VERSION})"
            )
        try:
            weights = tuple(
                WeightSpec(name=w["name"], shape=tuple(w["shape"]), offset=int(w["offset"]))
                for w in body["weights"]
            )
            manifest = cls(
                input_shape=tuple(body["input"]["shape"]),
                input_dtype=body["input"]["dtype"],
                label_dtype=body["label"]["dtype"],
                num_classes=int(body["label"]["num_classes"]),
                batch_size=int(body["batch_size"]),
                weights=weights,
                signatures={k: tuple(v) for k, v in body["signatures"].items()},
                loss=body["loss"],
                optimizer=dict(body["optimizer"]),
                ops=tuple(body["ops"]),
                exporter_version=body["exporter_version"],
                flex=bool(body.get("flex", False)),
                label_shape=tuple(int(d) for d in body["label"]["shape"]),
                fedprox=bool(body.get("fedprox", True)),
                frozen_weights=tuple(
                    FrozenWeight(name=w["name"], shape=tuple(int(d) for d in w["shape"]))
                    for w in body.get("frozen_weights", [])
                ),
                noise_units=int(body.get("noise_units", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest field missing or malformed: {exc!r}") from exc
        manifest.check_consistent()
        return manifest

    def check_consistent(self) -> None:
        """Checks the manifest against itself (layout contiguous, signatures complete)."""
        offset = 0
        for w in self.weights:
            if w.offset != offset:
                raise ManifestError(
                    f"weight {w.name!r} starts at offset {w.offset}, expected {offset}: "
                    "the weight layout must be contiguous"
                )
            offset += w.size
        if self.noise_units < 0:
            raise ManifestError(f"noise_units must be >= 0, got {self.noise_units}")
        for name, inputs in required_signatures(self.fedprox, self.noise_units > 0).items():
            if name not in self.signatures:
                raise ManifestError(f"manifest lacks the required signature {name!r}")
            if tuple(sorted(self.signatures[name])) != tuple(sorted(inputs)):
                raise ManifestError(
                    f"signature {name!r} takes {list(self.signatures[name])}, "
                    f"expected {list(inputs)}"
                )
        if self.batch_size <= 0:
            raise ManifestError(f"batch_size must be positive, got {self.batch_size}")
        for role, dtype in (("input", self.input_dtype), ("label", self.label_dtype)):
            if dtype not in TENSOR_DTYPES:
                raise ManifestError(
                    f"{role} dtype {dtype!r} is not one of {', '.join(TENSOR_DTYPES)}"
                )
