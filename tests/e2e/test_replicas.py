"""Three `overnight serve --replica` processes on one real PostgreSQL database, with emulated
phones on each, running a plain-mean and a robust task. The leader of the plain task is
killed with SIGKILL, then its successor is stopped with SIGSTOP for longer than its lease and
resumed, then a follower is killed. After each fault: no committed round is lost, every
committed round counted exactly its uploads and no token twice, weights are finite, and both
tasks keep committing; after a leader's fault another replica leads the task, and no round of
the lost epoch commits after the lease was lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

import numpy as np
import psycopg
import pytest

from device_runtime.channel import ServerTrust
from emulator.data import federated_digits
from emulator.fleet import Fleet
from emulator.phone import RandomConditionsSettings
from server.certificates import CertificateFiles, write_loopback_certificates
from server.leases import default_lease_s
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
REPLICAS = 3
TASKS = {
    "plain": "mean()",
    "robust": "robust_aggregator()",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _task_file(directory: pathlib.Path, task_id: str, aggregator: str) -> pathlib.Path:
    path = directory / f"{task_id}.toml"
    path.write_text(
        f'[task]\ntask_id = "{task_id}"\npopulation = "digits"\ntotal_rounds = 10000\n'
        "target_reports = 3\nover_selection = 1.4\nmin_reports = 2\nselection_deadline_s = 2.0\n"
        f'reporting_deadline_s = 5.0\nepochs = 1\nbatch_size = 8\naggregator = "{aggregator}"\n'
    )
    return path


class Replicas:
    def __init__(
        self, url: str, root: pathlib.Path, model: pathlib.Path, tls: CertificateFiles
    ) -> None:
        self.url, self.root, self.model, self.tls = url, root, model, tls
        self.ports = [_free_port() for _ in range(REPLICAS)]
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.secret = root / "enrollment.secret"
        self.secret.write_bytes(ENROLLMENT_SECRET)
        self.tasks = [_task_file(root, t, a) for t, a in TASKS.items()]

    @staticmethod
    def name(index: int) -> str:
        return f"r{index}"

    async def start(self, index: int) -> None:
        # Each replica registers one task at start (the other finds it in the database).
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
            f"127.0.0.1:{self.ports[index]}",
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
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=300)
        assert b"listening" in line, line
        self.processes[self.name(index)] = process

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
        for process in self.processes.values():
            await process.wait()


def _read(url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(url) as db:
        return db.execute(sql, params).fetchall()  # type: ignore[arg-type]


def _lease(url: str, task_id: str) -> tuple[str, int, float]:
    (row,) = _read(
        url, "SELECT holder, epoch, expires_at FROM task_leases WHERE task_id = %s", task_id
    )
    return row[0], int(row[1]), float(row[2])


def _round_open(url: str, task_id: str) -> bool:
    """Whether a round of the task has devices and is still open (a fault then catches it)."""
    return bool(
        _read(
            url,
            "SELECT 1 FROM shared_rounds WHERE task_id = %s AND selected > 0 "
            "AND state IN ('selecting', 'reporting')",
            task_id,
        )
    )


def _snapshot(url: str) -> dict[str, object]:
    rounds = _read(
        url,
        "SELECT task_id, round_number, state, reported, weights_sha256 FROM rounds "
        "ORDER BY task_id, round_number",
    )
    counted = {
        (t, n): c
        for t, n, c in _read(
            url,
            "SELECT task_id, round_number, COUNT(*) FROM counted_uploads "
            "GROUP BY task_id, round_number",
        )
    }
    (tokens,) = _read(url, "SELECT COUNT(*), COUNT(DISTINCT token_sha256) FROM counted_uploads")
    epochs = {
        (t, n): e
        for t, n, e in _read(url, "SELECT task_id, round_number, epoch FROM shared_rounds")
    }
    return {"rounds": rounds, "counted": counted, "tokens": tokens, "epochs": epochs}


def _committed(snapshot: dict, task_id: str) -> int:
    return sum(r[0] == task_id and r[2] == "committed" for r in snapshot["rounds"])


def _check_invariants(url: str, before: dict, after: dict) -> None:
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
        (data,) = _read(url, "SELECT data FROM resources WHERE sha256 = %s", weights_sha)
        assert np.all(np.isfinite(np.frombuffer(data[0], "<f4"))), f"{task_id}/{number} weights"


def _check_no_stale_commit(before: dict, after: dict, task_id: str, lost_epoch: int) -> None:
    """Rounds opened under the epoch a leader lost, not committed when it lost it, never
    commit afterwards: the new leader abandons them and the old one's commits are refused."""
    done = {(r[0], r[1]) for r in before["rounds"] if r[2] == "committed"}
    for t, number, state, _, _ in after["rounds"]:
        opened_in = after["epochs"].get((t, number))
        if t == task_id and opened_in == lost_epoch and (t, number) not in done:
            assert state != "committed", f"round {number} of stale epoch {lost_epoch} committed"


async def _until(condition: Callable[[], bool], what: str, bound_s: float = 300.0) -> None:
    """Waits for an event; the bound only turns a hang into a failure."""
    for _ in range(int(bound_s / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {bound_s:g} s")


def test_replicas_survive_a_killed_and_a_stopped_leader(
    tmp_path: pathlib.Path, model_path: pathlib.Path, postgres_url: str
) -> None:
    url = postgres_url
    tls = write_loopback_certificates(tmp_path / "tls")
    replicas = Replicas(url, tmp_path, model_path, tls)
    trust = ServerTrust(root_certificates=tls.root_certs.read_bytes())
    fleets = [
        Fleet(
            f"127.0.0.1:{port}",
            trust,
            "digits",
            federated_digits(8, seed=10 + i).clients,
            seed=10 + i,
            conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
            enrollment_secret=ENROLLMENT_SECRET,
        )
        for i, port in enumerate(replicas.ports)
    ]
    takeovers: list[float] = []

    async def both_tasks_commit(than: dict) -> None:
        def progressed() -> bool:
            now = _snapshot(url)
            return all(_committed(now, t) > _committed(than, t) for t in TASKS)

        await _until(progressed, "a commit of both tasks")

    async def takeover(lost: str, lost_epoch: int, fault: Awaitable[None]) -> dict:
        before = _snapshot(url)
        await fault
        await _until(
            lambda: _lease(url, "plain")[1] > lost_epoch and _lease(url, "plain")[0] != lost,
            "a takeover",
        )
        holder, epoch, expires = _lease(url, "plain")
        taken_at = expires - default_lease_s
        takeovers.append(taken_at - lost_expires[0])
        after = _snapshot(url)
        _check_invariants(url, before, after)
        return after

    lost_expires = [0.0]
    served: list[tuple] = []  # the replicas' heartbeat rows while they ran

    async def scenario() -> None:
        for index in range(REPLICAS):
            await replicas.start(index)
        stop = asyncio.Event()
        devices = [asyncio.create_task(fleet.run(stop)) for fleet in fleets]
        try:
            await both_tasks_commit(_snapshot(url))

            # SIGKILL the plain task's leader, with a round of it open.
            await _until(lambda: _round_open(url, "plain"), "a plain round with devices")
            leader, epoch, expires = _lease(url, "plain")
            name = leader.split("#")[0]  # a lease holder is a replica's name and run
            lost_expires[0] = expires
            killed = takeover(leader, epoch, replicas.kill(name))
            after_kill = await killed
            _check_no_stale_commit(after_kill, _snapshot(url), "plain", epoch)
            await replicas.start(int(name[1:]))  # its phones come back to it
            await both_tasks_commit(after_kill)

            # SIGSTOP the new leader past its lease, then let it run again.
            await _until(lambda: _round_open(url, "plain"), "a plain round with devices")
            leader, epoch, expires = _lease(url, "plain")
            name = leader.split("#")[0]
            lost_expires[0] = expires
            replicas.signal(name, signal.SIGSTOP)
            at_takeover = await takeover(leader, epoch, asyncio.sleep(0))
            replicas.signal(name, signal.SIGCONT)
            (seen,) = _read(url, "SELECT seen_at FROM replicas WHERE name = %s", name)[0]
            await _until(
                lambda: (
                    _read(url, "SELECT seen_at FROM replicas WHERE name = %s", name)[0][0] > seen
                ),
                "the stopped replica running again",
            )
            await both_tasks_commit(at_takeover)
            after_stop = _snapshot(url)
            _check_invariants(url, at_takeover, after_stop)
            _check_no_stale_commit(at_takeover, after_stop, "plain", epoch)

            # SIGKILL a follower: its uploads not handed over count as dropouts.
            await _until(lambda: _round_open(url, "plain"), "a plain round with devices")
            leaders = {_lease(url, t)[0].split("#")[0] for t in TASKS}
            follower = next(n for n in replicas.processes if n not in leaders)
            await replicas.kill(follower)
            await both_tasks_commit(_snapshot(url))
            await replicas.start(int(follower[1:]))
            final = _snapshot(url)
            _check_invariants(url, after_stop, final)
            served.extend(_read(url, "SELECT name, check_ins, uploads FROM replicas ORDER BY name"))
        finally:
            stop.set()
            await replicas.stop_all()
            await asyncio.gather(*devices)

    asyncio.run(scenario())

    print(f"takeover after the lost lease expired: {', '.join(f'{t:.2f} s' for t in takeovers)}")
    final = _snapshot(url)
    assert any(r[0] == "plain" and r[2] == "abandoned" for r in final["rounds"]), (
        "no fault caught a round open"
    )
    assert [name for name, _, _ in served] == [replicas.name(i) for i in range(REPLICAS)]
    assert sum(uploads for _, _, uploads in served) > 0, served
    # Drained with SIGTERM, every replica left: no leader waits for its partials.
    assert _read(url, "SELECT name FROM replicas") == []
