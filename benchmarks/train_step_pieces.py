"""Where the McMahan CNN's builtin-ops train step spends its time, piece by piece.

LiteRT's Python API has no per-op profiler, so each piece of the step is converted on its own,
at the CNN's shapes (batch 20), and timed under LiteRT with the same thread count as the
training benchmark. Every operand that is a variable in the real model (kernels, weights) is
an input here, so LiteRT cannot treat it as a constant: XNNPACK takes a CONV_2D only with a
constant filter, which is the main finding. Each piece is timed in the formulation the
exporter used before (issue 3) and in the one it uses now, side by side, interleaved.

Run: .venv/bin/python -m benchmarks.train_step_pieces
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from benchmarks.machine import record_section  # noqa: E402

BATCH = 20
THREADS = 2
ROUNDS = 5
STEPS = 15


def _convert(function: Callable, shapes: list[list[int]]) -> bytes:
    import tensorflow as tf

    module = tf.Module()
    module.f = tf.function(
        lambda *args: {"y": function(*args)},
        input_signature=[tf.TensorSpec(shape, tf.float32) for shape in shapes],
    )
    with tempfile.TemporaryDirectory() as saved:
        tf.saved_model.save(module, saved, signatures={"f": module.f.get_concrete_function()})
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return bytes(converter.convert())


def _pieces() -> dict[str, tuple[Callable, list[list[int]]]]:
    """name -> (function, input shapes); names say `piece: formulation`."""
    import tensorflow as tf

    from tflite_export.convolution import patch_matrix

    x2, k2, z2 = [BATCH, 14, 14, 32], [5, 5, 32, 64], [BATCH, 14, 14, 64]

    def pad(x: tf.Tensor) -> tf.Tensor:
        return tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]])

    def patches(x: tf.Tensor) -> tf.Tensor:
        return patch_matrix(pad(x), (5, 5), (1, 1), (14, 14))

    def patches_by_concat(x: tf.Tensor) -> tf.Tensor:
        padded = pad(x)
        columns = tf.concat([padded[:, :, j : j + 14, :] for j in range(5)], axis=3)
        rows = tf.concat([columns[:, i : i + 14, :, :] for i in range(5)], axis=3)
        return tf.reshape(rows, [-1, 800])

    def filter_gradient_as_conv(x: tf.Tensor, dz: tf.Tensor) -> tf.Tensor:
        x_t = tf.transpose(pad(x), [3, 1, 2, 0])
        dz_t = tf.transpose(dz, [1, 2, 0, 3])
        return tf.transpose(tf.nn.conv2d(x_t, dz_t, 1, "VALID"), [1, 2, 0, 3])

    dense = [[3136, 512]] * 3
    return {
        "conv2 forward: CONV_2D, variable filter (before)": (
            lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"),
            [x2, k2],
        ),
        "conv2 forward: GATHER im2col + BATCH_MATMUL (now)": (
            lambda x, k: tf.matmul(patches(x), tf.reshape(k, [800, 64])),
            [x2, k2],
        ),
        "conv2 im2col: 10 slices + 2 CONCATENATION": (patches_by_concat, [x2]),
        "conv2 im2col: one GATHER (now)": (patches, [x2]),
        "conv2 filter-gradient: CONV_2D, dz as 14x14 filter (before)": (
            filter_gradient_as_conv,
            [x2, z2],
        ),
        "conv2 filter-gradient: patches^T @ dz, patches kept (now)": (
            lambda p, dz: tf.matmul(p, dz, transpose_a=True),
            [[BATCH * 196, 800], [BATCH * 196, 64]],
        ),
        "conv2 input-gradient: TRANSPOSE_CONV (before)": (
            lambda dz, k: tf.nn.conv2d_transpose(dz, k, x2, 1, "SAME"),
            [z2, k2],
        ),
        "conv2 input-gradient: im2col(dz) @ rotated kernel (now)": (
            lambda dz, k: tf.matmul(
                patch_matrix(pad(dz), (5, 5), (1, 1), (14, 14)),
                tf.reshape(tf.transpose(tf.reverse(k, [0, 1]), [0, 1, 3, 2]), [1600, 32]),
            ),
            [z2, k2],
        ),
        "dense1 FedProx term at mu=0: g + mu*(w - anchor) (before)": (
            lambda g, w, anchor: g + 0.0 * (w - anchor),
            dense,
        ),
    }


def _median_ms(run: Callable[[], object]) -> float:
    for _ in range(2):
        run()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(0)
    runners = {}
    for name, (function, shapes) in _pieces().items():
        interpreter = Interpreter(model_content=_convert(function, shapes), num_threads=THREADS)
        runner = interpreter.get_signature_runner("f")
        inputs = {
            key: rng.random(detail["shape"], dtype=np.float32)
            for key, detail in runner.get_input_details().items()
        }
        runners[name] = (interpreter, runner, inputs)
    results: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(ROUNDS):  # interleaved, so drift on a shared machine hits all alike
        for name, (_, runner, inputs) in runners.items():
            results[name].append(_median_ms(lambda r=runner, i=inputs: r(**i)))
    rows = [f"| {name} | {min(times):.2f} |" for name, times in results.items()]
    report = "\n".join(
        [
            "Each piece converted alone at the CNN's shapes "
            f"(batch {BATCH}), kernels and weights as inputs (variables in the real model); "
            f"LiteRT with {THREADS} threads and its default XNNPACK delegate; median of {STEPS} "
            f"runs, best of {ROUNDS} interleaved rounds.",
            "",
            "| piece: formulation | ms |",
            "|---|---|",
            *rows,
            "",
        ]
    )
    print(report)
    record_section("McMahan CNN train step, piece by piece (LiteRT)", report)


if __name__ == "__main__":
    main()
