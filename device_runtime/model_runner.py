"""Runs an exported training model with LiteRT's signature runners (no TensorFlow)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from device_runtime.manifest import ManifestError, ModelManifest
from device_runtime.model_file import read_manifest


@dataclasses.dataclass(frozen=True)
class TrainResult:
    loss: float  # mean over every example processed (all epochs), as TFF reports it
    accuracy: float
    num_examples: int
    num_batches: int
    interrupted: bool


@dataclasses.dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def training_interpreter(tflite_bytes: bytes, num_threads: int = 1) -> Interpreter:
    """A LiteRT interpreter set up as the device runs training models.

    Without delegate clustering, XNNPACK's partitions keep the graph's op order. With it,
    LiteRT regroups independent ops into fewer partitions, e.g. every chunk's im2col GATHER
    ahead of every chunk's matmul, so all the chunks' patch matrices are alive at once and the
    exporter's chunking is lost (McMahan CNN: 116 MiB peak resident memory with clustering,
    99 without, at the same step time).
    """
    return Interpreter(
        model_content=tflite_bytes,
        num_threads=num_threads,
        experimental_disable_delegate_clustering=True,
    )


class TrainableModel:
    """One interpreter over one `.tflite` training model. Not thread-safe; one per device.

    Raises ManifestError at construction when the model is not a valid Overnight training model.
    """

    def __init__(self, tflite_bytes: bytes, num_threads: int = 1) -> None:
        self.manifest: ModelManifest = read_manifest(tflite_bytes)
        if self.manifest.flex:
            raise ManifestError(
                "model needs the Flex delegate (select TensorFlow ops), which this runtime lacks"
            )
        self._interpreter = training_interpreter(tflite_bytes, num_threads)
        self._train = self._interpreter.get_signature_runner("train")
        self._evaluate = self._interpreter.get_signature_runner("evaluate")
        self._infer = self._interpreter.get_signature_runner("infer")
        self._get_weights = self._interpreter.get_signature_runner("get_weights")
        self._set_weights = self._interpreter.get_signature_runner("set_weights")
        self._reset_optimizer = self._interpreter.get_signature_runner("reset_optimizer")
        self._set_proximal_mu = (
            self._interpreter.get_signature_runner("set_proximal_mu")
            if self.manifest.fedprox
            else None
        )
        # Dropout masks come from uniform noise drawn here, per train step; `train` seeds it
        # from the round's plan, so each device and each round draws its own masks.
        self._noise_rng = np.random.default_rng(0)
        self._input_dtype = np.dtype(self.manifest.input_dtype)
        self._label_dtype = np.dtype(self.manifest.label_dtype)
        # The graph's declared shape, not a call: running get_weights here would allocate its
        # arena and read every variable (three model-sized buffers, ~20 MiB on the McMahan
        # CNN) in a process that may only train.
        graph_size = int(np.prod(self._get_weights.get_output_details()["weights"]["shape"]))
        if graph_size != self.manifest.num_parameters:
            raise ManifestError(
                f"manifest lays out {self.manifest.num_parameters} parameters, "
                f"the graph's get_weights returns {graph_size}"
            )

    @property
    def batch_size(self) -> int:
        return self.manifest.batch_size

    def get_weights(self) -> np.ndarray:
        # The signature runner already returns a fresh float32 array that owns its data; a
        # second copy would add a model-sized buffer at the end of every round.
        return self._get_weights()["weights"]

    def set_weights(self, weights: np.ndarray) -> None:
        """Sets the model's weights; they are also the anchor of FedProx's proximal term."""
        weights = np.asarray(weights)
        if weights.dtype != np.float32 or weights.shape != (self.manifest.num_parameters,):
            raise ValueError(
                f"weights must be float32 of shape ({self.manifest.num_parameters},), "
                f"got {weights.dtype} {weights.shape}"
            )
        self._set_weights(weights=weights)

    def _batches(self, x: np.ndarray, y: np.ndarray, order: np.ndarray):
        """Yields fixed-size batches; the last one is zero-padded and masked."""
        self._check_examples(x, y)
        size = self.batch_size
        for start in range(0, len(order), size):
            index = order[start : start + size]
            n = len(index)
            xb = np.zeros((size, *self.manifest.input_shape), self._input_dtype)
            yb = np.zeros((size, *self.manifest.label_shape), self._label_dtype)
            mask = np.zeros((size,), np.float32)
            xb[:n] = x[index]
            yb[:n] = y[index]
            mask[:n] = 1.0
            yield xb, yb, mask, n

    def _check_examples(self, x: np.ndarray, y: np.ndarray) -> None:
        expected = tuple(self.manifest.input_shape)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"examples have shape {tuple(x.shape[1:])}, the model takes {expected}"
            )
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        if tuple(y.shape[1:]) != tuple(self.manifest.label_shape):
            raise ValueError(
                f"labels have shape {tuple(y.shape[1:])}, the model takes "
                f"{tuple(self.manifest.label_shape)} ({self.manifest.loss})"
            )
        if self._label_dtype.kind == "i" and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids for {self.manifest.loss}")
        if (
            self._label_dtype.kind == "i"
            and len(y)
            and (y.min() < 0 or y.max() >= self.manifest.num_classes)
        ):
            raise ValueError(
                f"labels must be class ids in [0, {self.manifest.num_classes}), "
                f"got values in [{y.min()}, {y.max()}]"
            )

    def reset_optimizer(self) -> None:
        """Zeroes the optimizer state (momentum, Adam's moments and step count)."""
        self._reset_optimizer()

    def set_proximal_mu(self, mu: float) -> None:
        """FedProx's μ for the following train steps; 0 is plain FedAvg.

        Raises ValueError for a negative or non-finite μ, and for μ > 0 on a model exported
        without FedProx.
        """
        if not (np.isfinite(mu) and mu >= 0.0):
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {mu}")
        if self._set_proximal_mu is None:
            if mu > 0.0:
                raise ValueError(
                    f"proximal_mu is {mu} but the model was exported without FedProx; "
                    "export it with `overnight export --fedprox`"
                )
            return
        self._set_proximal_mu(mu=np.float32(mu))

    def seed_dropout(self, seed: int) -> None:
        """Seeds the noise of the following train steps' dropout masks."""
        self._noise_rng = np.random.default_rng(seed)

    def dropout_noise(self) -> np.ndarray | None:
        """The next train step's uniform noise, from which the model cuts its dropout masks
        (a value is kept where its noise is at least the rate); None without dropout."""
        if not self.manifest.noise_units:
            return None
        return self._noise_rng.random((self.batch_size, self.manifest.noise_units), np.float32)

    def train_step(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
        """One step on one full-size batch; returns (mean loss, correct count) over mask == 1."""
        noise = self.dropout_noise()
        if noise is None:
            out = self._train(x=x, y=y, mask=mask)
        else:
            out = self._train(x=x, y=y, mask=mask, noise=noise)
        return float(out["loss"]), float(out["correct"])

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int,
        rng: np.random.Generator,
        should_stop: Callable[[], bool] = lambda: False,
        shuffle: bool = True,
        proximal_mu: float = 0.0,
        fresh_optimizer: bool = True,
        dropout_seed: int | None = None,
    ) -> TrainResult:
        """Trains `epochs` passes over (x, y), shuffled by `rng` unless `shuffle` is False,
        polling `should_stop` before each batch. `dropout_seed` (the round's plan carries
        one) seeds the dropout masks; None goes on from the masks drawn so far.

        As TFF's client update: the optimizer starts fresh (unless `fresh_optimizer` is False)
        and, when `proximal_mu` > 0, FedProx pulls the weights towards those last given to
        `set_weights` (the round's global model).
        """
        self._check_examples(x, y)
        self.set_proximal_mu(proximal_mu)
        if dropout_seed is not None:
            self.seed_dropout(dropout_seed)
        if fresh_optimizer:
            self.reset_optimizer()
        loss_sum = correct = 0.0
        examples = batches = 0
        for _ in range(epochs):
            order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
            for xb, yb, mask, n in self._batches(x, y, order):
                if should_stop():
                    return TrainResult(
                        loss_sum / max(examples, 1),
                        correct / max(examples, 1),
                        examples,
                        batches,
                        True,
                    )
                loss, batch_correct = self.train_step(xb, yb, mask)
                loss_sum += loss * n
                correct += batch_correct
                examples += n
                batches += 1
        return TrainResult(
            loss_sum / max(examples, 1), correct / max(examples, 1), examples, batches, False
        )

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalResult:
        loss_sum = correct = count = 0.0
        for xb, yb, mask, _ in self._batches(x, y, np.arange(len(x))):
            out = self._evaluate(x=xb, y=yb, mask=mask)
            loss_sum += float(out["loss_sum"])
            correct += float(out["correct"])
            count += float(out["count"])
        return EvalResult(loss_sum / max(count, 1.0), correct / max(count, 1.0), int(count))

    def infer(self, x: np.ndarray) -> np.ndarray:
        outputs = []
        labels = np.zeros((len(x), *self.manifest.label_shape), self._label_dtype)
        for xb, _, _, n in self._batches(x, labels, np.arange(len(x))):
            outputs.append(np.array(self._infer(x=xb)["output"][:n]))
        return (
            np.concatenate(outputs)
            if outputs
            else np.zeros((0, self.manifest.num_classes), np.float32)  # the output's last axis
        )
