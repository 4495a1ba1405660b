"""Shared fixtures: one exported model per session; cleanup of TFF's worker processes."""

from __future__ import annotations

import os
import pathlib
import signal
from collections.abc import Iterator

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BATCH_SIZE = 8
# Fixtures defined beside the fakes, for every test folder; our public test harness too.
pytest_plugins = ["tests.small_disk", "tests.postgres_server", "overnight.testing"]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A small digits MLP exported once per session (batch size 8)."""
    from tflite_export.exporter import export_model
    from tflite_export.model_zoo import create_digits_mlp

    path = tmp_path_factory.mktemp("model") / "digits_mlp.tflite"
    export_model(
        create_digits_mlp(hidden_units=16, seed=1), path, learning_rate=0.1, batch_size=BATCH_SIZE
    )
    return path


@pytest.fixture(scope="session")
def model_bytes(model_path: pathlib.Path) -> bytes:
    return model_path.read_bytes()


# TFF's execution context starts `worker_binary` child processes that outlive the test
# session unless stopped; this fixture stops the ones this process started.
def _worker_children() -> list[int]:
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"worker_binary" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="session", autouse=True)
def stop_tff_workers() -> Iterator[None]:
    yield
    for pid in _worker_children():
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
