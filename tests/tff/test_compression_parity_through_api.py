"""`tff.learning.compression_aggregator()` through TFF and through Overnight's API: the same
bits per parameter and the same held-out accuracy after 5 rounds.

The same `model_fn`, optimizers and `compression_aggregator()` object go once into
`tff.learning.algorithms.build_weighted_fed_avg` (simulation) and once into
`overnight.connect(...).create_task(...)`, trained by emulated phones (LiteRT, real gRPC and
TLS) on the same clients in the same batch order. Both quantize each update stochastically, each
with its own randomness, so the models differ a little and are compared by what they achieve.

The model is the digits MLP with 512 hidden units: its 64 x 512 kernel (32,768 elements) is
the one tensor above the aggregator's 20,000-element threshold, so it is quantized to 8 bits;
the other 5,642 parameters travel as float32.

What each side's bits per parameter count (per client and round, over the model's 38,410
parameters):
- TFF 0.87 reports no sizes (its EncodedSumFactory measures nothing and the sizing executor of
  the compression tutorial is gone), so its figure is read from TFF's own compilation of the
  round into MapReduceForm: every tensor a client contributes to the round's aggregation, at
  its dtype's width. That is the encoded update (the codes bit-packed into int32 words, each
  holding 28 code bits so that its varint serialization is 4 bytes; min and max as float32; the
  small tensors as float32), the client's weight, the zeroing and clipping counts and norm
  votes, and the training metrics' sums.
- Ours is `aggregated_bits` of the round metrics: every byte of the UploadUpdate streams the
  coordinator accepted, protobuf framing included: the UploadHeader (upload token, device
  signature, example count, training metrics) and the payload (a 4-byte header carrying the
  zeroing/clipping votes, the small tensors as float32, low and high of the quantized tensor,
  then its 8-bit codes packed densely).
Ours matches TFF's code bits (its int32 words counted at the 28 bits they hold) within 5%, and
is below TFF's serialized size, which spends 32 bits on every 28 bits of codes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from emulator.data import federated_digits
from overnight.testing import TestCoordinator
from overnight.testing.coordinator import LocalCoordinator
from tflite_export.model_zoo import create_digits_mlp

pytestmark = pytest.mark.e2e

CLIENTS = 4
ROUNDS = 5
BATCH = 10
EPOCHS = 2
HIDDEN_UNITS = 512  # a 64 x 512 kernel: above compression_aggregator()'s threshold
DATA = federated_digits(CLIENTS, alpha=0.5, seed=11)
# TFF's BitpackingEncodingStage fills 28 of each int32 word's bits (tensor_encoding).
CODE_BITS_PER_PACKED_WORD = 28


def model_fn() -> tf.keras.Model:
    return create_digits_mlp(hidden_units=HIDDEN_UNITS, seed=0)


def client_optimizer() -> tff.learning.optimizers.Optimizer:
    return tff.learning.optimizers.build_sgdm(learning_rate=0.1)


def server_optimizer() -> tff.learning.optimizers.Optimizer:
    return tff.learning.optimizers.build_sgdm(learning_rate=1.0)


NUM_PARAMETERS = sum(int(np.prod(w.shape)) for w in model_fn().trainable_weights)


@dataclasses.dataclass(frozen=True)
class TffRun:
    serialized_bits_per_parameter: float  # every tensor at its dtype's width
    code_bits_per_parameter: float  # bit-packed words counted at the code bits they hold
    accuracy: float


@dataclasses.dataclass(frozen=True)
class OvernightRun:
    bits_per_parameter: float  # aggregated_bits per accepted upload
    accuracy: float
    committed_rounds: int


def held_out_accuracy(model: tf.keras.Model) -> float:
    """The one evaluation both sides' weights get: argmax of the Keras model on the test set."""
    predicted = np.argmax(model.predict(DATA.test.x, verbose=0), axis=1)
    return float(np.mean(predicted == DATA.test.y))


def _tensor_leaves(value_type: tff.types.Type, path: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value_type, tff.types.TensorType):
        yield path, value_type
    elif isinstance(value_type, tff.types.StructType):
        for index, (name, element) in enumerate(tff.structure.iter_elements(value_type)):
            yield from _tensor_leaves(element, f"{path}/{name or index}")
    else:
        raise AssertionError(f"unexpected type in a client's upload: {value_type}")


def _client_upload_bits(process: tff.learning.templates.LearningProcess) -> tuple[float, float]:
    """(serialized, code) bits one client contributes to a round's aggregation, from TFF's
    MapReduceForm of the round: `work` maps a client's data to what it aggregates."""
    form = tff.backends.mapreduce.get_map_reduce_form_for_computation(process.next)
    serialized = code = 0.0
    for path, tensor in _tensor_leaves(form.work.type_signature.result):
        bits = 8.0 * np.dtype(tensor.dtype).itemsize * int(np.prod(tensor.shape))
        serialized += bits
        packed = path.endswith("bitpacked_values")
        code += bits * CODE_BITS_PER_PACKED_WORD / 32 if packed else bits
    return serialized, code


@pytest.fixture(scope="module")
def tff_run() -> TffRun:
    def tff_model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            model_fn(),
            input_spec=(tf.TensorSpec([None, 8, 8], tf.float32), tf.TensorSpec([None], tf.int32)),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        tff_model_fn,
        client_optimizer_fn=client_optimizer(),
        server_optimizer_fn=server_optimizer(),
        model_aggregator=tff.learning.compression_aggregator(),
    )
    state = process.initialize()
    datasets = [
        tf.data.Dataset.from_tensor_slices((c.x, c.y)).batch(BATCH).repeat(EPOCHS)
        for c in DATA.clients
    ]
    for _ in range(ROUNDS):
        state = process.next(state, datasets).state
    model = model_fn()
    process.get_model_weights(state).assign_weights_to(model)
    serialized, code = _client_upload_bits(process)
    return TffRun(
        serialized_bits_per_parameter=serialized / NUM_PARAMETERS,
        code_bits_per_parameter=code / NUM_PARAMETERS,
        accuracy=held_out_accuracy(model),
    )


@pytest.fixture(scope="module")
def overnight_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OvernightRun]:
    local = LocalCoordinator(tmp_path_factory.mktemp("compression-parity")).start()
    try:
        coordinator = TestCoordinator(local)
        with coordinator.connect() as client:
            task = client.create_task(
                "compression-parity",
                population="digits",
                model=model_fn,
                loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                client_optimizer=client_optimizer(),
                server_optimizer=server_optimizer(),
                aggregator=tff.learning.compression_aggregator(),
                rounds=ROUNDS,
                clients_per_round=CLIENTS,
                over_selection=1.0,
                epochs=EPOCHS,
                batch_size=BATCH,
                keep_order=True,
            )
            run = coordinator.fleet("digits", DATA.clients).run_task(task)
            uploads = sum(r.reported for r in run.committed)
            aggregated_bits = run.committed[-1].metrics["aggregated_bits"]  # cumulative
            yield OvernightRun(
                bits_per_parameter=aggregated_bits / uploads / NUM_PARAMETERS,
                accuracy=held_out_accuracy(task.keras_model()),
                committed_rounds=len(run.committed),
            )
    finally:
        local.stop()


def test_compression_uploads_the_bits_per_parameter_tff_aggregates(
    tff_run: TffRun, overnight_run: OvernightRun
) -> None:
    ours, theirs = overnight_run, tff_run

    assert ours.committed_rounds == ROUNDS
    assert ours.bits_per_parameter == pytest.approx(theirs.code_bits_per_parameter, rel=0.05)
    assert ours.bits_per_parameter < theirs.serialized_bits_per_parameter
    assert theirs.serialized_bits_per_parameter < 16  # TFF itself compressed (float32 is 32)


def test_compression_reaches_tffs_held_out_accuracy_within_a_point(
    tff_run: TffRun, overnight_run: OvernightRun
) -> None:
    ours, theirs = overnight_run, tff_run

    assert theirs.accuracy > 0.5  # TFF's model learned (chance is 0.1): the parity means something
    assert abs(ours.accuracy - theirs.accuracy) <= 0.01
