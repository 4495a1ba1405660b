"""Bits per parameter and held-out accuracy: fp32 FedAvg, TFF's compression_aggregator() in TFF
simulation, Overnight's 8-bit preset and Overnight's rotation + 1 bit, side by side.

    .venv/bin/python -m benchmarks.compression_accuracy [--rounds 30]

Same clients (scikit-learn digits, non-IID Dirichlet split), same client schedule per round,
same initial weights, same seeds, in one run. The model is an MLP of the McMahan CNN's size
(64-1024-1024-512-10: 1,646,090 parameters against the CNN's 1,663,370), because the builtin-ops
CNN export is being added concurrently (issue 3).

Overnight runs for real: a coordinator on loopback gRPC, each selected client a DeviceRuntime
training with LiteRT and uploading through the round's client half; bits per parameter are the
coordinator's `aggregated_bits` (bytes that crossed gRPC, headers included) divided by uploads
and parameters. TFF runs `build_weighted_fed_avg(model_aggregator=compression_aggregator())` in
a child process (its worker_binary children are ended by id); its bits per parameter are the
sizes of the tensors its own encoders emit for each weight tensor. Every final model is
evaluated by the same LiteRT evaluator on the same held-out digits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import pathlib
import signal
import tempfile
import time
import traceback
from typing import Any

import numpy as np

from benchmarks.machine import record_section

CLIENTS = 20
CLIENTS_PER_ROUND = 10
ALPHA = 0.5
EPOCHS = 2
BATCH = 20
CLIENT_LR = 0.05
SERVER_LR = 1.0
SEED = 5
ENROLLMENT_SECRET = b"compression-bench-enrollment-secret"
HIDDEN = (1024, 1024, 512)
OVERNIGHT = {
    "fp32 FedAvg (Overnight, mean)": "mean",
    "Overnight compression_aggregator() (8-bit)": "compression_aggregator()",
    "Overnight one_bit_aggregator() (rotation + 1 bit, 95% kept)": "one_bit_aggregator()",
}


@dataclasses.dataclass
class Run:
    name: str
    bits_per_parameter: float
    accuracy: float
    accuracy_per_round: list[float]
    seconds: float


def build_model() -> Any:
    import tensorflow as tf

    init = tf.keras.initializers.GlorotUniform(seed=SEED)
    layers: list[Any] = [tf.keras.layers.Flatten(input_shape=(8, 8))]
    layers += [tf.keras.layers.Dense(h, activation="relu", kernel_initializer=init) for h in HIDDEN]
    layers.append(tf.keras.layers.Dense(10, activation="softmax", kernel_initializer=init))
    return tf.keras.Sequential(layers)


def schedule(rounds: int) -> list[list[int]]:
    rng = np.random.default_rng(SEED)
    return [sorted(rng.choice(CLIENTS, CLIENTS_PER_ROUND, replace=False)) for _ in range(rounds)]


def evaluate(model_bytes: bytes, weights: np.ndarray, test: Any) -> float:
    from device_runtime.model_runner import TrainableModel

    model = TrainableModel(model_bytes)
    model.set_weights(weights.astype(np.float32))
    return float(model.evaluate(test.x, test.y).accuracy)


class PluggedIn:
    """Device conditions for the benchmark: charging, idle and on Wi-Fi throughout."""

    def current(self) -> Any:
        from device_runtime.conditions import ConditionsSnapshot

        return ConditionsSnapshot(charging=True, idle=True, unmetered=True)


async def run_overnight(
    name: str, aggregator: str, model_bytes: bytes, rounds: int, workdir: pathlib.Path
) -> Run:
    from device_runtime.cache import ResourceCache
    from device_runtime.clock import RealClock
    from device_runtime.runtime import DeviceRuntime, Outcome
    from device_runtime.transport import CoordinatorClient
    from emulator.data import federated_digits
    from server.certificates import loopback_security
    from server.config import TaskConfig
    from server.coordinator import Coordinator
    from server.device_identity import DeviceIdentities
    from server.enrollment.config import EnrollmentPolicy
    from server.evaluation import HeldOutEvaluator
    from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
    from server.grpc_service import CoordinatorServer
    from server.sqlite_store import SqliteStore

    data = federated_digits(CLIENTS, alpha=ALPHA, seed=SEED)
    store = SqliteStore(str(workdir / f"{abs(hash(aggregator))}.sqlite"))
    clock = RealClock()
    identities = DeviceIdentities(
        store,
        clock,
        EnrollmentPolicy.shared_secret(ENROLLMENT_SECRET),
        networks=NetworkSettings(exempt=LOOPBACK_NETWORKS),
    )
    coordinator = Coordinator(
        store, clock, evaluator=HeldOutEvaluator(data.test), identities=identities
    )
    config = TaskConfig(
        task_id="bench",
        population="digits",
        total_rounds=rounds,
        target_reports=CLIENTS_PER_ROUND,
        over_selection=1.0,
        selection_deadline_s=1e6,
        reporting_deadline_s=1e6,
        epochs=EPOCHS,
        batch_size=BATCH,
        server_learning_rate=SERVER_LR,
        aggregator=aggregator,
    )
    record = coordinator.register_task(config, model_bytes)
    tls, trust = loopback_security()
    server = CoordinatorServer(coordinator, "127.0.0.1:0", tls=tls)
    await server.start()
    clients = [CoordinatorClient(server.address, trust) for _ in range(CLIENTS)]
    caches = [ResourceCache() for _ in range(CLIENTS)]
    started = time.perf_counter()
    try:
        for number, selected in enumerate(schedule(rounds)):
            for c in selected:
                runtime = DeviceRuntime(
                    client=clients[c],
                    population="digits",
                    enrollment_secret=ENROLLMENT_SECRET,
                    examples=data.clients[c],
                    conditions=PluggedIn(),
                    clock=RealClock(),
                    rng=np.random.default_rng([SEED, number, c]),
                    cache=caches[c],
                )
                attempt = await runtime.attempt()
                if attempt.outcome is not Outcome.REPORTED:
                    raise RuntimeError(f"{name}: client {c} round {number}: {attempt}")
    finally:
        for client in clients:
            await client.close()
        await server.stop(0)
    seconds = time.perf_counter() - started
    committed = [r for r in store.rounds("bench") if r.metrics]
    store.close()
    uploads = sum(r.reported for r in committed)
    bits = committed[-1].metrics["aggregated_bits"] / (uploads * record.num_parameters)
    curve = [r.metrics["eval/accuracy"] for r in committed]
    return Run(name, bits, curve[-1], curve, seconds)


def _children(pid: int, name: str) -> list[int]:
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and name.encode() in cmdline:
            found.append(int(stat.parent.name))
    return found


def _tff_main(model_bytes: bytes, rounds: int, out: Any) -> None:
    import collections

    import tensorflow as tf
    import tensorflow_federated as tff
    from tensorflow_model_optimization.python.core.internal import tensor_encoding as te

    from device_runtime.model_file import read_manifest
    from emulator.data import federated_digits

    try:
        data = federated_digits(CLIENTS, alpha=ALPHA, seed=SEED)
        manifest = read_manifest(model_bytes)
        from device_runtime.model_runner import TrainableModel

        initial = TrainableModel(model_bytes).get_weights()
        shapes = [w.shape for w in manifest.weights]
        starts = np.cumsum([0] + [w.size for w in manifest.weights])
        initial_tensors = [
            initial[a:b].reshape(s) for a, b, s in zip(starts[:-1], starts[1:], shapes, strict=True)
        ]

        def dataset(c: int, number: int) -> tf.data.Dataset:
            examples = data.clients[c]
            flat = collections.OrderedDict(x=examples.x, y=examples.y.reshape(-1, 1))
            return (
                tf.data.Dataset.from_tensor_slices(flat)
                .shuffle(len(examples), seed=SEED * 1000 + number * 100 + c)
                .repeat(EPOCHS)
                .batch(BATCH)
            )

        spec = dataset(0, 0).element_spec

        def model_fn() -> Any:
            return tff.learning.models.from_keras_model(
                build_model(),
                input_spec=spec,
                loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
            )

        process = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn,
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR),
            server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=SERVER_LR),
            model_aggregator=tff.learning.compression_aggregator(),
        )
        state = process.initialize()
        keras_shapes = [tuple(w.shape) for w in process.get_model_weights(state).trainable]
        if keras_shapes != [tuple(s) for s in shapes]:
            raise RuntimeError(f"layouts differ: TFF {keras_shapes} vs manifest {shapes}")
        state = process.set_model_weights(
            state, tff.learning.models.ModelWeights(trainable=initial_tensors, non_trainable=[])
        )
        started = time.perf_counter()
        curve_weights = []
        for number, selected in enumerate(schedule(rounds)):
            result = process.next(state, [dataset(c, number) for c in selected])
            state = result.state
            weights = process.get_model_weights(state).trainable
            curve_weights.append(np.concatenate([np.asarray(w).ravel() for w in weights]))
        seconds = time.perf_counter() - started
        # TFF's upload size per client: what its encoders emit for each weight tensor.
        bits = 0
        for shape in shapes:
            size = int(np.prod(shape))
            if size > 20000:
                encoder = te.encoders.as_simple_encoder(
                    te.encoders.uniform_quantization(8), tf.TensorSpec(shape, tf.float32)
                )
                encoded, _ = encoder.encode(tf.random.normal(shape), encoder.initial_state())
                bits += sum(
                    t.dtype.size * 8 * int(np.prod(t.shape)) for t in tf.nest.flatten(encoded)
                )
            else:
                bits += 32 * size
        out.put(
            {
                "bits": bits / sum(int(np.prod(s)) for s in shapes),
                "weights": curve_weights,
                "seconds": seconds,
            }
        )
    except Exception as exc:  # reported to the parent, which raises it
        out.put({"error": "".join(traceback.format_exception(exc))})
    finally:
        for pid in _children(os.getpid(), "worker_binary"):
            os.kill(pid, signal.SIGTERM)


def run_tff(model_bytes: bytes, rounds: int) -> Run:
    from emulator.data import federated_digits

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=_tff_main, args=(model_bytes, rounds, out))
    child.start()
    result = out.get(timeout=3600)
    child.join(timeout=60)
    if "error" in result:
        raise RuntimeError(f"TFF run failed: {result['error']}")
    test = federated_digits(CLIENTS, alpha=ALPHA, seed=SEED).test
    curve = [evaluate(model_bytes, w, test) for w in result["weights"]]
    return Run(
        "TFF compression_aggregator() (TFF simulation)",
        result["bits"],
        curve[-1],
        curve,
        result["seconds"],
    )


def export(workdir: pathlib.Path) -> bytes:
    from tflite_export.exporter import export_model

    path = workdir / "mlp_1p6m.tflite"
    export_model(build_model(), path, learning_rate=CLIENT_LR, batch_size=BATCH)
    return path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-record", action="store_true", help="do not record in RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="overnight-compression-") as tmp:
        workdir = pathlib.Path(tmp)
        model_bytes = export(workdir)
        runs = []
        for name, aggregator in OVERNIGHT.items():
            runs.append(
                asyncio.run(run_overnight(name, aggregator, model_bytes, args.rounds, workdir))
            )
            print(f"{name}: {runs[-1].bits_per_parameter:.3f} bit/param, {runs[-1].accuracy:.4f}")
        runs.insert(1, run_tff(model_bytes, args.rounds))
        print(f"{runs[1].name}: {runs[1].bits_per_parameter:.3f} bit/param, {runs[1].accuracy:.4f}")
    report(runs, args.rounds, not args.no_record)


def report(runs: list[Run], rounds: int, record: bool) -> None:
    fp32 = runs[0].accuracy
    lines = [
        "| aggregator | uploaded bits/param | final held-out accuracy | vs fp32 (points) "
        "| best accuracy over rounds | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.bits_per_parameter:.3f} | {run.accuracy:.4f} | "
            f"{100 * (run.accuracy - fp32):+.2f} | {max(run.accuracy_per_round):.4f} | "
            f"{run.seconds:.0f} |"
        )
    one_bit, eight_bit, tff = runs[3], runs[2], runs[1]
    goal_1 = one_bit.bits_per_parameter <= 1.0 and fp32 - one_bit.accuracy <= 0.01
    goal_2 = eight_bit.bits_per_parameter < tff.bits_per_parameter
    lines += [
        "",
        f"Setting: {CLIENTS} clients (digits, Dirichlet alpha {ALPHA}, seed {SEED}), "
        f"{CLIENTS_PER_ROUND} per round on the same schedule, {rounds} rounds, {EPOCHS} local "
        f"epochs, batch {BATCH}, client SGD {CLIENT_LR}, server SGD {SERVER_LR}; MLP "
        f"64-{'-'.join(map(str, HIDDEN))}-10 (1,646,090 parameters).",
        f"Goal 1 (<= 1.0 bit/param within 1 point of fp32): {one_bit.bits_per_parameter:.3f} "
        f"bit/param, {100 * (one_bit.accuracy - fp32):+.2f} points -> "
        f"{'met' if goal_1 else 'NOT met'}.",
        f"Goal 2 (8-bit preset below TFF's bits): {eight_bit.bits_per_parameter:.3f} vs "
        f"TFF {tff.bits_per_parameter:.3f} bit/param (TFF tutorial: 9.23) -> "
        f"{'met' if goal_2 else 'NOT met'}.",
        "Accuracy per round: "
        + "; ".join(
            f"{run.name.split(' (')[0]}: " + ", ".join(f"{a:.3f}" for a in run.accuracy_per_round)
            for run in runs
        ),
    ]
    print("\n".join(lines))
    if record:
        record_section(
            "Issue 5 — compression: bits per parameter and accuracy (side by side)",
            "\n".join(lines),
        )


if __name__ == "__main__":
    main()
