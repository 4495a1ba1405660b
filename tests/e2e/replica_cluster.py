"""Coordinator replicas as real `overnight serve --replica` processes on one PostgreSQL
database, and what the e2e replica tests read from that database to check the crash-test
invariants (no committed round lost, report counts equal counted uploads, no token counted
twice, finite weights)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import psycopg

from server.certificates import CertificateFiles
from tests.identities import ENROLLMENT_SECRET

REPO = pathlib.Path(__file__).resolve().parents[2]
HANG_GUARD_S = 300.0  # every wait is on an event; this bound only turns a hang into a failure


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def task_file(directory: pathlib.Path, task_id: str, aggregator: str) -> pathlib.Path:
    path = directory / f"{task_id}.toml"
    path.write_text(
        f'[task]\ntask_id = "{task_id}"\npopulation = "digits"\ntotal_rounds = 10000\n'
        "target_reports = 3\nover_selection = 1.4\nmin_reports = 2\nselection_deadline_s = 2.0\n"
        f'reporting_deadline_s = 5.0\nepochs = 1\nbatch_size = 8\naggregator = "{aggregator}"\n'
    )
    return path


class Replicas:
    """`hosts[i]` is the loopback address replica i listens on (one per replica)."""

    def __init__(
        self,
        url: str,
        root: pathlib.Path,
        model: pathlib.Path,
        tls: CertificateFiles,
        tasks: Mapping[str, str],
        hosts: list[str],
    ) -> None:
        self.url, self.root, self.model, self.tls = url, root, model, tls
        self.hosts = hosts
        self.ports = [free_port(host) for host in hosts]
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.admin_addresses: dict[str, str] = {}
        self.secret = root / "enrollment.secret"
        self.secret.write_bytes(ENROLLMENT_SECRET)
        self.tasks = [task_file(root, t, a) for t, a in tasks.items()]
        self.extra_args: list[str] = []  # given to every replica's `overnight serve`

    @staticmethod
    def name(index: int) -> str:
        return f"r{index}"

    def address(self, index: int) -> str:
        return f"{self.hosts[index]}:{self.ports[index]}"

    async def start(self, index: int) -> None:
        # Each replica registers one task at start (the others find it in the database).
        task = self.tasks[index % len(self.tasks)]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "overnight",
            "serve",
            "--replica",
            "--replica-name",
            self.name(index),
            "--store",
            self.url,
            "--address",
            self.address(index),
            "--admin-address",
            "127.0.0.1:0",
            "--tls-cert",
            str(self.tls.server_cert),
            "--tls-key",
            str(self.tls.server_key),
            "--data-dir",
            str(self.root / f"state-{index}"),
            "--task",
            str(task),
            "--model",
            str(self.model),
            "--min-retry-s",
            "0.05",
            "--enrollment-secret-file",
            str(self.secret),
            "--exempt-network",
            "127.0.0.0/8",
            *self.extra_args,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=HANG_GUARD_S)
        listening = re.search(rb"and (\S+) \(admin\)", line)
        assert listening is not None, line
        self.processes[self.name(index)] = process
        self.admin_addresses[self.name(index)] = listening.group(1).decode()

    async def start_all(self) -> None:
        for index in range(len(self.hosts)):
            await self.start(index)

    async def status(self, index: int) -> str:
        """What `overnight status` prints, asked of replica `index`'s admin service."""
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "overnight", "status"),
            *("--server", self.admin_addresses[self.name(index)]),
            *("--root-certs", str(self.tls.root_certs)),
            *("--admin-token-file", str(self.root / f"state-{index}" / "operator.token")),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), HANG_GUARD_S)
        assert process.returncode == 0, err.decode()
        return out.decode()

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.processes[name].pid, sig)

    async def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        await self.processes.pop(name).wait()

    async def stop_all(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        stuck = []
        for name, process in self.processes.items():
            try:
                await asyncio.wait_for(process.wait(), HANG_GUARD_S)
            except TimeoutError:
                process.kill()
                await process.wait()
                stuck.append(name)
        assert not stuck, f"replicas {stuck} did not exit within {HANG_GUARD_S:g} s of SIGTERM"


def read(url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(url) as db:
        return db.execute(sql, params).fetchall()  # type: ignore[arg-type]


def lease(url: str, task_id: str) -> tuple[str, int, float]:
    """The task's lease: its holder (a replica's NAME#RUN), epoch and expiry."""
    (row,) = read(
        url, "SELECT holder, epoch, expires_at FROM task_leases WHERE task_id = %s", task_id
    )
    return row[0], int(row[1]), float(row[2])


def round_open(url: str, task_id: str) -> bool:
    """Whether a round of the task has devices and is still open (a fault then catches it)."""
    return bool(
        read(
            url,
            "SELECT 1 FROM shared_rounds WHERE task_id = %s AND selected > 0 "
            "AND state IN ('selecting', 'reporting')",
            task_id,
        )
    )


def snapshot(url: str) -> dict[str, Any]:
    rounds = read(
        url,
        "SELECT task_id, round_number, state, reported, weights_sha256 FROM rounds "
        "ORDER BY task_id, round_number",
    )
    counted = {
        (t, n): c
        for t, n, c in read(
            url,
            "SELECT task_id, round_number, COUNT(*) FROM counted_uploads "
            "GROUP BY task_id, round_number",
        )
    }
    (tokens,) = read(url, "SELECT COUNT(*), COUNT(DISTINCT token_sha256) FROM counted_uploads")
    epochs = {
        (t, n): e for t, n, e in read(url, "SELECT task_id, round_number, epoch FROM shared_rounds")
    }
    return {"rounds": rounds, "counted": counted, "tokens": tokens, "epochs": epochs}


def committed(snapshot: dict, task_id: str) -> int:
    return sum(r[0] == task_id and r[2] == "committed" for r in snapshot["rounds"])


def check_invariants(url: str, before: dict, after: dict) -> None:
    committed_before = [r for r in before["rounds"] if r[2] == "committed"]
    assert set(committed_before) <= set(after["rounds"]), "a committed round was lost"
    total, distinct = after["tokens"]
    assert total == distinct, "an upload was counted twice"
    for task_id, number, state, reported, weights_sha in after["rounds"]:
        counted = after["counted"].get((task_id, number), 0)
        if state != "committed":
            assert counted == 0, f"{state} round {task_id}/{number} counted uploads"
            continue
        assert counted == reported, f"round {task_id}/{number} miscounted"
        (data,) = read(url, "SELECT data FROM resources WHERE sha256 = %s", weights_sha)
        assert np.all(np.isfinite(np.frombuffer(data[0], "<f4"))), f"{task_id}/{number} weights"


def check_no_stale_commit(before: dict, after: dict, task_id: str, lost_epoch: int) -> None:
    """Rounds opened under the epoch a leader lost, not committed when it lost it, never
    commit afterwards: the new leader abandons them and the old one's commits are refused."""
    done = {(r[0], r[1]) for r in before["rounds"] if r[2] == "committed"}
    for t, number, state, _, _ in after["rounds"]:
        opened_in = after["epochs"].get((t, number))
        if t == task_id and opened_in == lost_epoch and (t, number) not in done:
            assert state != "committed", f"round {number} of stale epoch {lost_epoch} committed"


async def until(condition: Callable[[], bool], what: str, bound_s: float = HANG_GUARD_S) -> None:
    """Waits for an event; the bound only turns a hang into a failure."""
    for _ in range(int(bound_s / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {bound_s:g} s")
