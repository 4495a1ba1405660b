"""A user script that passes an adaptive TFF factory to `create_task` leaves no process behind.

Reading such a factory runs a few TFF computations, and TFF runs computations in a
`worker_binary` child process. The script runs as a user runs it, in a session of its own, so
whatever it started is found by session after it exits, even once orphaned."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = """
import pathlib
import sys

import tensorflow as tf
import tensorflow_federated as tff

from overnight.testing.coordinator import LocalCoordinator
from tflite_export.model_zoo import create_digits_mlp

local = LocalCoordinator(pathlib.Path(sys.argv[1])).start()
with local.connect() as client:
    client.create_task(
        "adaptive",
        population="phones",
        model=lambda: create_digits_mlp(hidden_units=8, seed=0),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        client_optimizer=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
        aggregator=tff.learning.robust_aggregator(),  # adaptive zeroing and clipping norms
    )
local.stop()
print("registered", flush=True)
"""


def _session_members(session: int) -> dict[int, bytes]:
    """pid -> command line of every process in `session`."""
    members = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[3]) == session:  # after ")": state, ppid, pgrp, session
            members[int(entry.name)] = cmdline
    return members


@pytest.mark.skipif(not pathlib.Path("/proc").is_dir(), reason="reads processes from /proc")
def test_a_script_that_translated_an_adaptive_factory_leaves_no_tff_worker(
    tmp_path: pathlib.Path,
) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    output = tmp_path / "output.txt"

    # Execute: output to a file, not a pipe, which a leftover worker would hold open.
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "coordinator")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process.wait(timeout=600)
    left_behind = _session_members(process.pid)
    for pid in left_behind:  # a failing run must not leave them running either
        os.kill(pid, signal.SIGKILL)

    assert process.returncode == 0, output.read_text()[-3000:]
    assert "registered" in output.read_text()
    assert left_behind == {}
