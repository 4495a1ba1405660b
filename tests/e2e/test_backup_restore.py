"""`overnight backup` of a coordinator in the middle of training, restored into a new data
directory: the coordinator started there resumes the task from the last round the backup
committed, with that round's weights. Real `overnight serve` processes, real TLS, emulated
phones running the real device runtime."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys

import pytest

from device_runtime.channel import ServerTrust, open_channel
from emulator.data import federated_digits
from emulator.fleet import Fleet
from emulator.phone import RandomConditionsSettings
from server.certificates import CertificateFiles, write_loopback_certificates
from tests.identities import ENROLLMENT_SECRET, check_in_over

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
TASK = (
    '[task]\ntask_id = "kept"\npopulation = "digits"\ntotal_rounds = 1000\n'
    "target_reports = 2\nover_selection = 1.5\nmin_reports = 2\nselection_deadline_s = 5.0\n"
    "reporting_deadline_s = 20.0\nepochs = 1\nbatch_size = 8\n"
)
ROUNDS_BEFORE_BACKUP = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _committed(db_path: pathlib.Path) -> dict[str, list[tuple[int, str]]]:
    """Each task's committed rounds (number, weights sha256), in order."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT task_id, round_number, weights_sha256 FROM rounds "
            "WHERE state = 'committed' ORDER BY task_id, round_number"
        ).fetchall()
    committed: dict[str, list[tuple[int, str]]] = {}
    for task_id, number, sha in rows:
        committed.setdefault(task_id, []).append((number, sha))
    return committed


async def _serve(
    port: int,
    data_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    model: pathlib.Path,
    tls: CertificateFiles,
) -> asyncio.subprocess.Process:
    secret = tmp_path / "enrollment.secret"
    secret.write_bytes(ENROLLMENT_SECRET)
    (tmp_path / "task.toml").write_text(TASK)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "overnight",
        "serve",
        *("--address", f"127.0.0.1:{port}", "--admin-address", "127.0.0.1:0"),
        *("--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)),
        *("--data-dir", str(data_dir), "--min-retry-s", "0.05", "--max-retry-s", "0.5"),
        *("--task", str(tmp_path / "task.toml"), "--model", str(model)),
        *("--enrollment-secret-file", str(secret), "--exempt-network", "127.0.0.0/8"),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=120)
    assert b"listening" in line, line
    return process


async def _stop(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), timeout=120)


def test_a_backup_taken_while_training_resumes_every_task_in_a_new_data_directory(
    tmp_path: pathlib.Path, model_path: pathlib.Path
) -> None:
    tls = write_loopback_certificates(tmp_path / "tls")
    trust = ServerTrust(root_certificates=tls.root_certs.read_bytes())
    original, restored = tmp_path / "state", tmp_path / "restored"
    port = _free_port()
    fleet = Fleet(
        f"127.0.0.1:{port}",
        trust,
        "digits",
        federated_digits(6, seed=3).clients,
        seed=3,
        conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
        enrollment_secret=ENROLLMENT_SECRET,
    )

    async def scenario() -> tuple[subprocess.CompletedProcess[str], object]:
        process = await _serve(port, original, tmp_path, model_path, tls)
        stop = asyncio.Event()
        devices = asyncio.create_task(fleet.run(stop))
        try:
            while len(_committed(original / "coordinator.sqlite").get("kept", [])) < (
                ROUNDS_BEFORE_BACKUP
            ):
                await asyncio.sleep(0.2)
            # Taken while the coordinator runs and the phones keep training.
            backup = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "overnight", "backup", "--data-dir", str(original)]
                + ["--to", f"{restored}/"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            stop.set()
            await devices
            await _stop(process)
        restored_port = _free_port()
        process = await _serve(restored_port, restored, tmp_path, model_path, tls)
        try:
            async with open_channel(f"127.0.0.1:{restored_port}", trust) as channel:
                response = await check_in_over(channel, "after-restore")
        finally:
            await _stop(process)
        return backup, response

    backup, response = asyncio.run(scenario())

    assert backup.returncode == 0, backup.stderr
    in_backup = _committed(restored / "coordinator.sqlite")
    assert len(in_backup["kept"]) >= ROUNDS_BEFORE_BACKUP
    last_number, last_weights = in_backup["kept"][-1]
    assignment = response.assignment  # type: ignore[attr-defined]
    assert assignment.task_id == "kept"
    assert assignment.round_number > last_number
    assert assignment.weights.sha256 == last_weights  # trains on from the last commit
    assert _committed(restored / "coordinator.sqlite")["kept"] == in_backup["kept"]
    # One consistent snapshot: what the original committed up to the backup, nothing torn.
    assert (
        _committed(original / "coordinator.sqlite")["kept"][: len(in_backup["kept"])]
        == (in_backup["kept"])
    )
