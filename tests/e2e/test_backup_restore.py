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
from protos import device_pb2
from server.certificates import CertificateFiles, write_loopback_certificates
from tests.identities import ENROLLMENT_SECRET, check_in_over

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
TASKS = ("kept", "also-kept")
TASK = (
    '[task]\ntask_id = "{task_id}"\npopulation = "digits"\ntotal_rounds = 1000\n'
    "target_reports = 2\nover_selection = 1.5\nmin_reports = 2\nselection_deadline_s = 5.0\n"
    "reporting_deadline_s = 20.0\nepochs = 1\nbatch_size = 8\n"
)
ROUNDS_BEFORE_BACKUP = 2


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
    ports: tuple[int, int],
    data_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    model: pathlib.Path,
    tls: CertificateFiles,
) -> asyncio.subprocess.Process:
    """`overnight serve` on (device, admin) ports; registers the first task at start."""
    secret = tmp_path / "enrollment.secret"
    secret.write_bytes(ENROLLMENT_SECRET)
    (tmp_path / "task.toml").write_text(TASK.format(task_id=TASKS[0]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "overnight",
        "serve",
        *("--address", f"127.0.0.1:{ports[0]}", "--admin-address", f"127.0.0.1:{ports[1]}"),
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


def _overnight(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _assignments_by_task(
    address: str, trust: ServerTrust
) -> dict[str, device_pb2.Assignment]:
    """Check-ins of new devices until each task has handed one an assignment."""
    found: dict[str, device_pb2.Assignment] = {}
    async with open_channel(address, trust) as channel:
        for attempt in range(20):
            response = await check_in_over(channel, f"after-restore-{attempt}")
            if response.WhichOneof("outcome") == "assignment":
                found.setdefault(response.assignment.task_id, response.assignment)
            if set(found) == set(TASKS):
                break
    return found


def test_a_backup_taken_while_training_resumes_every_task_in_a_new_data_directory(
    tmp_path: pathlib.Path, model_path: pathlib.Path
) -> None:
    tls = write_loopback_certificates(tmp_path / "tls")
    trust = ServerTrust(root_certificates=tls.root_certs.read_bytes())
    original, restored = tmp_path / "state", tmp_path / "restored"
    ports = (_free_port(), _free_port())
    fleet = Fleet(
        f"127.0.0.1:{ports[0]}",
        trust,
        "digits",
        federated_digits(8, seed=3).clients,
        seed=3,
        conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
        enrollment_secret=ENROLLMENT_SECRET,
    )
    second = tmp_path / "second.toml"
    second.write_text(TASK.format(task_id=TASKS[1]))
    admin = ("--server", f"127.0.0.1:{ports[1]}", "--root-certs", str(tls.root_certs))
    token_file = ("--admin-token-file", str(original / "operator.token"))

    async def scenario() -> tuple[
        subprocess.CompletedProcess[str], subprocess.CompletedProcess[str], dict, dict
    ]:
        process = await _serve(ports, original, tmp_path, model_path, tls)
        stop = asyncio.Event()
        devices = asyncio.create_task(fleet.run(stop))
        try:
            created = await asyncio.to_thread(
                _overnight,
                "task",
                "create",
                str(second),
                "--model",
                str(model_path),
                *admin,
                *token_file,
            )
            assert created.returncode == 0, created.stderr
            while (
                min(len(_committed(original / "coordinator.sqlite").get(t, [])) for t in TASKS)
                < ROUNDS_BEFORE_BACKUP
            ):
                await asyncio.sleep(0.2)
            # Taken while the coordinator runs and the phones keep training.
            backup = await asyncio.to_thread(
                _overnight, "backup", "--data-dir", str(original), "--to", f"{restored}/"
            )
        finally:
            stop.set()
            await devices
            await _stop(process)
        process = await _serve(ports, restored, tmp_path, model_path, tls)
        try:
            # The operator's token from before the backup still works on the restored one.
            status = await asyncio.to_thread(_overnight, "status", *admin, *token_file)
            assignments = await _assignments_by_task(f"127.0.0.1:{ports[0]}", trust)
        finally:
            await _stop(process)
        return backup, status, assignments, _committed(restored / "coordinator.sqlite")

    backup, status, assignments, after_restart = asyncio.run(scenario())

    assert backup.returncode == 0, backup.stderr
    assert status.returncode == 0, status.stderr
    in_backup = _committed(restored / "coordinator.sqlite")
    assert sorted(assignments) == sorted(TASKS)
    for task_id in TASKS:
        assert len(in_backup[task_id]) >= ROUNDS_BEFORE_BACKUP
        last_number, last_weights = in_backup[task_id][-1]
        assignment = assignments[task_id]
        assert assignment.round_number > last_number
        assert assignment.weights.sha256 == last_weights  # trains on from the last commit
        assert task_id in status.stdout
        assert after_restart[task_id] == in_backup[task_id]  # nothing committed lost
        # One consistent snapshot: what the original had committed by then, nothing torn.
        finally_committed = _committed(original / "coordinator.sqlite")[task_id]
        assert finally_committed[: len(in_backup[task_id])] == in_backup[task_id]
