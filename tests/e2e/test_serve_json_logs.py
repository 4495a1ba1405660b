"""`overnight serve` configured by a file to log JSON, as a process manager runs it: every line
it writes, on stdout and stderr, from start to SIGTERM, is one JSON object."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
# LiteRT's native library writes this once per process straight to file descriptor 2, past
# Python's logging; it is the one line a JSON log cannot format (see README, "Deploying").
LITERT_NATIVE_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
TASK = '[task]\ntask_id = "t1"\npopulation = "digits"\nbatch_size = 8\n'


def test_serve_with_json_logs_from_its_config_file_writes_only_json_lines(
    tmp_path: pathlib.Path, model_path: pathlib.Path
) -> None:
    (tmp_path / "task.toml").write_text(TASK)
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'log_format = "json"\ninsecure = true\ndata_dir = "{tmp_path / "state"}"\n'
        f'address = "127.0.0.1:0"\nadmin_address = "127.0.0.1:0"\n'
        f'task = "{tmp_path / "task.toml"}"\nmodel = "{model_path}"\n'
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "overnight", "-v", "serve", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        listening = json.loads(server.stdout.readline())
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    assert server.returncode == 0, stderr
    assert "coordinator listening" in listening["message"]
    assert str(tmp_path / "state") in listening["message"]  # data_dir came from the file
    logged = [json.loads(line) for line in stderr.splitlines() if line != LITERT_NATIVE_LINE]
    said = [listening, *(json.loads(line) for line in stdout.splitlines())]
    for record in logged + said:
        assert {"time", "level", "logger", "message"} <= set(record), record
    assert any(r["level"] == "WARNING" and "TLS" in r["message"] for r in logged)  # --insecure
    assert any(r.get("task") == "t1" and "registered" in r["message"] for r in logged)
    assert "coordinator stopped (drained)" in said[-1]["message"]
