"""Every script in examples/ runs as a user runs it (`python examples/X.py --quick`), against
the coordinator and emulated phones it starts itself, and prints what its tutorial prints."""

from __future__ import annotations

import collections
import pathlib
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
DIGITS_LINE = "data: the 8x8 digits shipped with scikit-learn"
LOCAL_LINE = "coordinator: started on this machine over TLS, 4 emulated phones"


def run_example(script: str, *options: str) -> list[str]:
    finished = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", *options],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout.splitlines()


def metrics_of(lines: list[str], prefix: str = "metrics=") -> list[dict[str, Any]]:
    """The metrics each `round N, metrics=OrderedDict(...)` line prints, read back."""
    found = []
    for line in lines:
        if line.startswith("round ") and prefix in line:
            printed = line.split(prefix, 1)[1].split(", broadcasted_bits=")[0]
            found.append(
                eval(printed, {"__builtins__": {}, "OrderedDict": collections.OrderedDict})
            )
    return found


def round_numbers(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(r"round +(\d+), ", line))]


def test_image_classification_prints_each_round_and_the_evaluation(tmp_path: pathlib.Path) -> None:
    lines = run_example("image_classification.py", "--logdir", str(tmp_path))

    assert lines[0].startswith(DIGITS_LINE)
    assert lines[1] == LOCAL_LINE
    assert round_numbers(lines) == [1, 2]
    for metrics in metrics_of(lines):
        assert set(metrics["client_work"]["train"]) == {
            "accuracy",
            "loss",
            "num_batches",
            "num_examples",
        }
        assert set(metrics["eval"]) == {"accuracy", "loss", "num_examples"}
    assert lines[-1].startswith("OrderedDict([('eval', OrderedDict([('num_examples', 359.0)")
    assert list((tmp_path / "training").glob("events.out.tfevents.*"))


def test_compression_aggregates_fewer_bits_than_the_mean(tmp_path: pathlib.Path) -> None:
    lines = run_example("compression.py", "--logdir", str(tmp_path))

    assert lines[0].startswith(DIGITS_LINE)
    starts = [i for i, line in enumerate(lines) if line.startswith("training ")]
    original, compressed = lines[starts[0] : starts[1]], lines[starts[1] :]
    assert round_numbers(original) == round_numbers(compressed) == [1, 2]
    for metrics in metrics_of(lines, prefix="train_metrics="):
        assert set(metrics) == {"accuracy", "loss", "num_batches", "num_examples"}
    original_bits = aggregated_bits(original)
    compressed_bits = aggregated_bits(compressed)
    assert compressed_bits[-1] < original_bits[-1]
    assert {p.name for p in tmp_path.iterdir()} == {"original", "compression"}


def aggregated_bits(lines: list[str]) -> list[float]:
    """The cumulative aggregated bits each round line prints, e.g. 3.83Mibit, in bits."""
    units = {"bit": 1, "Kibit": 2**10, "Mibit": 2**20, "Gibit": 2**30}
    found = (re.search(r"aggregated_bits=([\d.]+)(\w+)$", line) for line in lines)
    return [float(m.group(1)) * units[m.group(2)] for m in found if m]


def test_non_iid_with_the_dp_aggregator_reports_its_privacy_metrics() -> None:
    lines = run_example("non_iid_femnist.py", "--aggregator", "dp")

    assert lines[0].startswith(DIGITS_LINE)
    assert round_numbers(lines) == [1, 2]
    for metrics in metrics_of(lines):
        assert metrics["aggregator"]["dp"]["clip_applied"] == 1.0
        assert metrics["aggregator"]["dp"]["noise_stddev"] == 0.5
        assert metrics["client_work"]["train"]["num_examples"] > 0


def test_metrics_example_logs_every_metric_and_personalizes(tmp_path: pathlib.Path) -> None:
    lines = run_example("metrics_tensorboard.py", "--dp", "--logdir", str(tmp_path))

    assert lines[0].startswith(DIGITS_LINE)
    assert round_numbers(lines) == [1, 2]
    for metrics in metrics_of(lines):
        assert {"client_work", "aggregator", "eval", "broadcasted_bits", "aggregated_bits"} <= set(
            metrics
        )
        assert "epsilon" in metrics["aggregator"]["dp"]
    assert re.match(r"personalized phone 0 .*: accuracy .* [\d.]+ -> [\d.]+$", lines[-1])
    assert list(tmp_path.glob("metrics-*/events.out.tfevents.*"))


def test_an_example_trains_on_tff_emnist_files_when_given_them(tmp_path: pathlib.Path) -> None:
    # Prepare: files in TFF's layout (examples/<writer>/{pixels,label}), random characters.
    import h5py

    rng = np.random.default_rng(0)
    for split, writers in (("train", 4), ("test", 2)):
        with h5py.File(tmp_path / f"fed_emnist_digitsonly_{split}.h5", "w") as f:
            for writer in range(writers):
                group = f.create_group(f"examples/f{writer:04d}_00")
                group["pixels"] = rng.random((30, 28, 28), dtype=np.float32)
                group["label"] = rng.integers(0, 10, 30).astype(np.int32)

    lines = run_example(
        "image_classification.py", "--emnist-dir", str(tmp_path), "--logdir", str(tmp_path)
    )

    assert lines[0].startswith("data: TFF's federated EMNIST (fed_emnist_digitsonly")
    assert round_numbers(lines) == [1, 2]
    assert metrics_of(lines)[0]["client_work"]["train"]["num_examples"] == 4 * 30
    assert lines[-1].startswith("OrderedDict([('eval', OrderedDict([('num_examples', 60.0)")
