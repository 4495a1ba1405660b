"""Chaos: a plain and a secure task run with emulated phones while the coordinator process is
killed, frozen, joined by a second process and given a full disk, at seeded moments.

After every fault the store must keep the crash invariants (no committed round lost, each
committed round counts exactly its reports, no upload token counted twice, committed weights
finite); after the last fault both tasks must still commit. The figures it prints (faults,
invariant checks, rounds) are for the record and never asserted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from device_runtime.channel import ServerTrust
from emulator.data import federated_digits
from emulator.fleet import Fleet
from emulator.phone import RandomConditionsSettings
from server.certificates import CertificateFiles, write_loopback_certificates
from tests.identities import ENROLLMENT_SECRET
from tests.small_disk import SmallDisk

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
FAULTS = ("kill", "stop", "second", "disk", "kill", "stop", "kill", "second", "disk", "kill")
PLAIN = (
    '[task]\ntask_id = "plain"\npopulation = "digits"\ntotal_rounds = 10000\n'
    "target_reports = 3\nover_selection = 1.4\nmin_reports = 2\nselection_deadline_s = 2.0\n"
    "reporting_deadline_s = 6.0\nepochs = 1\nbatch_size = 8\n"
)
SECURE = (
    '[task]\ntask_id = "secure"\npopulation = "digits"\ntotal_rounds = 10000\n'
    "target_reports = 5\nover_selection = 1.4\nmin_reports = 4\nselection_deadline_s = 3.0\n"
    'reporting_deadline_s = 10.0\nepochs = 1\nbatch_size = 8\naggregator = "secure_aggregator()"\n'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Coordinator:
    """`overnight serve` as a separate process, on fixed ports and one data directory."""

    def __init__(
        self,
        data_dir: pathlib.Path,
        model: pathlib.Path,
        tls: CertificateFiles,
        secret: pathlib.Path,
    ) -> None:
        self.data_dir = data_dir
        self.secret = secret
        self.model = model
        self.tls = tls
        self.port, self.admin_port = _free_port(), _free_port()
        self.process: asyncio.subprocess.Process | None = None

    def _command(self) -> list[str]:
        task = self.data_dir.parent / "plain.toml"
        return [
            sys.executable,
            "-m",
            "overnight",
            "serve",
            "--address",
            f"127.0.0.1:{self.port}",
            "--admin-address",
            f"127.0.0.1:{self.admin_port}",
            "--tls-cert",
            str(self.tls.server_cert),
            "--tls-key",
            str(self.tls.server_key),
            "--data-dir",
            str(self.data_dir),
            "--task",
            str(task),
            "--model",
            str(self.model),
            "--min-retry-s",
            "0.05",
            "--enrollment-secret-file",
            str(self.secret),
            "--exempt-network",
            "127.0.0.0/8",  # every emulated phone dials from loopback
        ]

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self._command(),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout=120)
        assert b"listening" in line, line

    async def second_process_is_refused(self) -> None:
        """Another `serve` on the same directory (and ports) exits 2, naming the holder."""
        assert self.process is not None
        second = await asyncio.create_subprocess_exec(
            *self._command(),
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(second.communicate(), timeout=120)
        assert second.returncode == 2, stderr
        assert f"in use by another coordinator (pid {self.process.pid})".encode() in stderr

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            await self.process.wait()

    def register_secure_task(self, config: pathlib.Path) -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "overnight",
                "task",
                "create",
                str(config),
                "--model",
                str(self.model),
                "--server",
                f"127.0.0.1:{self.admin_port}",
                "--root-certs",
                str(self.tls.root_certs),
                "--admin-token-file",
                str(self.data_dir / "operator.token"),
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=120,
        )


def _snapshot(db_path: pathlib.Path) -> dict[str, object]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rounds = db.execute(
            "SELECT task_id, round_number, state, reported, weights_sha256 FROM rounds"
        ).fetchall()
        counted = dict(
            ((task, number), count)
            for task, number, count in db.execute(
                "SELECT task_id, round_number, COUNT(*) FROM counted_uploads "
                "GROUP BY task_id, round_number"
            )
        )
        weights = {
            sha: bool(np.all(np.isfinite(np.frombuffer(data, "<f4"))))
            for sha, data in db.execute("SELECT sha256, data FROM resources WHERE kind='weights'")
        }
        tokens = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT token_sha256) FROM counted_uploads"
        ).fetchone()
    return {"rounds": set(rounds), "counted": counted, "weights": weights, "tokens": tokens}


def _check_invariants(before: dict, after: dict) -> int:
    """Asserts the crash invariants between two snapshots; returns how many it checked."""
    checks = 0
    committed_before = {r for r in before["rounds"] if r[2] == "committed"}
    assert committed_before <= after["rounds"], "a committed round was lost"
    total, distinct = after["tokens"]
    assert total == distinct, "an upload was counted twice"
    checks += 2
    for task, number, state, reported, weights_sha in after["rounds"]:
        counted = after["counted"].get((task, number), 0)
        if state == "committed":
            assert counted == reported, f"{task} round {number} miscounted"
            assert after["weights"].get(weights_sha), f"{task} round {number} weights bad"
            checks += 2
        else:
            assert counted == 0, f"{state} {task} round {number} counted uploads"
            checks += 1
    return checks


def _committed(snapshot: dict, task: str) -> int:
    return sum(r[0] == task and r[2] == "committed" for r in snapshot["rounds"])


def test_faults_at_seeded_moments_lose_nothing_and_both_tasks_go_on(
    small_disk: SmallDisk, tmp_path: pathlib.Path, model_path: pathlib.Path
) -> None:
    (tmp_path / "plain.toml").write_text(PLAIN)
    (tmp_path / "secure.toml").write_text(SECURE)
    data_dir = small_disk.path / "state"
    (small_disk.path / "plain.toml").write_text(PLAIN)
    db_path = data_dir / "coordinator.sqlite"
    tls = write_loopback_certificates(tmp_path / "tls")
    secret = tmp_path / "enrollment.secret"
    secret.write_bytes(ENROLLMENT_SECRET)
    coordinator = Coordinator(data_dir, model_path, tls, secret)
    rng = np.random.default_rng(20261126)
    fleet = Fleet(
        f"127.0.0.1:{coordinator.port}",
        ServerTrust(root_certificates=tls.root_certs.read_bytes()),
        "digits",
        federated_digits(16, seed=7).clients,
        seed=7,
        conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
        enrollment_secret=ENROLLMENT_SECRET,
    )

    async def until(condition, timeout_s: float = 180.0) -> dict:  # type: ignore[no-untyped-def]
        """Polls the store (read-only) until `condition(snapshot)`; the bound is a hang
        guard for a broken coordinator, not a timing assertion."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while True:
            snapshot = _snapshot(db_path)
            if condition(snapshot) or loop.time() > give_up:
                return snapshot
            await asyncio.sleep(0.2)

    async def scenario() -> tuple[dict, dict, int]:
        await coordinator.start()
        coordinator.register_secure_task(tmp_path / "secure.toml")
        stop = asyncio.Event()
        devices = asyncio.create_task(fleet.run(stop))
        checks = 0
        try:
            first = await until(lambda s: _committed(s, "plain") and _committed(s, "secure"))
            assert _committed(first, "secure"), "the secure task never committed"
            for fault in FAULTS:
                await asyncio.sleep(float(rng.uniform(0.2, 2.0)))
                before = _snapshot(db_path)
                match fault:
                    case "kill":
                        await coordinator.kill()
                        checks += _check_invariants(before, _snapshot(db_path))
                        await coordinator.start()
                    case "stop":
                        assert coordinator.process is not None
                        coordinator.process.send_signal(signal.SIGSTOP)
                        await asyncio.sleep(float(rng.uniform(0.5, 3.0)))
                        coordinator.process.send_signal(signal.SIGCONT)
                    case "second":
                        await coordinator.second_process_is_refused()
                    case "disk":
                        with small_disk.filled():
                            await asyncio.sleep(float(rng.uniform(1.0, 3.0)))
                checks += _check_invariants(before, _snapshot(db_path))
            last = _snapshot(db_path)
            final = await until(
                lambda s: (
                    _committed(s, "plain") > _committed(last, "plain")
                    and _committed(s, "secure") > _committed(last, "secure")
                )
            )
            checks += _check_invariants(last, final)
            return last, final, checks
        finally:
            stop.set()
            await coordinator.stop()
            await devices

    last, final, checks = asyncio.run(scenario())

    assert _committed(final, "plain") > _committed(last, "plain"), "plain made no progress"
    assert _committed(final, "secure") > _committed(last, "secure"), "secure made no progress"
    states = [r[2] for r in final["rounds"]]
    print(
        f"\nchaos: {len(FAULTS)} faults, {checks} invariant checks; rounds: "
        f"plain {_committed(final, 'plain')} committed, secure {_committed(final, 'secure')} "
        f"committed, {states.count('failed')} failed, {states.count('abandoned')} abandoned"
    )
