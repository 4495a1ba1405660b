"""`overnight device` trains and reports in a process where `import tensorflow` fails."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys

import numpy as np

from device_runtime.examples import LocalExamples
from device_runtime.identity import DeviceKey
from emulator.data import load_digits
from server.store import RoundState
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

REPO = pathlib.Path(__file__).resolve().parents[2]

# Runs `overnight device`, after proving that TensorFlow cannot be imported, and checks at exit
# that nothing loaded it.
DEVICE_WITHOUT_TENSORFLOW = """
import sys
try:
    import tensorflow
except ImportError:
    pass
else:
    sys.exit("tensorflow imported despite the blocker")
from overnight.cli import main
code = main(sys.argv[1:])
loaded = [m for m in sys.modules if m.startswith("tensorflow") and sys.modules[m]]
assert not loaded, loaded
sys.exit(code)
"""


def _tensorflow_blocker(directory: pathlib.Path) -> pathlib.Path:
    package = directory / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise ImportError('TensorFlow is not installed on this device')\n"
    )
    return directory


def test_device_process_trains_without_tensorflow(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    digits = load_digits()
    examples_path = tmp_path / "examples.npz"
    LocalExamples(digits.x[:40], digits.y[:40]).save(examples_path)
    blocker = _tensorflow_blocker(tmp_path / "blocker")
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{REPO}")
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=1)
    secret_path = tmp_path / "enrollment.secret"
    secret_path.write_bytes(ENROLLMENT_SECRET + b"\n")
    cache_dir = tmp_path / "device-cache"

    async def scenario() -> tuple[int, bytes, list]:
        async with running_coordinator(
            str(tmp_path / "store.sqlite"), model_bytes, config
        ) as running:
            assert running.trust.root_certificates is not None
            (tmp_path / "ca.pem").write_bytes(running.trust.root_certificates)
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                DEVICE_WITHOUT_TENSORFLOW,
                "device",
                "--server",
                running.address,
                "--root-certs",
                str(tmp_path / "ca.pem"),
                "--population",
                POPULATION,
                "--examples",
                str(examples_path),
                "--cache-dir",
                str(cache_dir),
                "--enrollment-secret-file",
                str(secret_path),
                "--max-reports",
                "1",
                "--seed",
                "0",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
            await running.settled()  # the last round commits off the request path
            return process.returncode or 0, output, running.store.rounds("t1")

    code, output, rounds = asyncio.run(scenario())

    assert code == 0, output.decode()
    assert b"reported round 1" in output
    assert [r.state for r in rounds] == [RoundState.COMMITTED]
    assert rounds[0].reported == 1
    # The installation's key, made on first run, private to its user; its hash is the id.
    key_file = cache_dir / "device_key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    device_id = DeviceKey.load_or_create(cache_dir).device_id
    assert f"device {device_id}".encode() in output
    assert np.isfinite(rounds[0].metrics["client_work/train/loss"])
