"""Replays train steps on an exported model with LiteRT, in a process without TensorFlow.

`python -m tests.tflite_export.litert_replay MODEL.tflite STEPS.npz OUT.npz`: STEPS.npz holds
`x`, `y`, `mask` (one row per step) and optionally FedProx's `mu`; OUT.npz gets `loss`,
`correct` and `weights` (before the first step, then after each step).
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from device_runtime.model_runner import TrainableModel


def replay(model_path: pathlib.Path, steps_path: pathlib.Path, out_path: pathlib.Path) -> None:
    steps = np.load(steps_path)
    model = TrainableModel(model_path.read_bytes())
    # As a device starts a round: the global weights are set (FedProx's anchor), then μ.
    model.set_weights(model.get_weights())
    model.set_proximal_mu(float(steps["mu"]) if "mu" in steps else 0.0)
    weights = [model.get_weights()]
    losses, correct = [], []
    for x, y, mask in zip(steps["x"], steps["y"], steps["mask"], strict=True):
        loss, right = model.train_step(x, y, mask)
        losses.append(loss)
        correct.append(right)
        weights.append(model.get_weights())
    np.savez(out_path, loss=np.array(losses), correct=np.array(correct), weights=np.stack(weights))


if __name__ == "__main__":
    replay(*(pathlib.Path(arg) for arg in sys.argv[1:4]))
    loaded = [name for name in sys.modules if name.startswith("tensorflow")]
    if loaded:
        sys.exit(f"TensorFlow was imported: {loaded[:3]}")
