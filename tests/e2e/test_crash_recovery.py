"""`kill -9` the coordinator at 10 seeded moments of a running task, with devices still
running; after each restart no committed round is lost and no update is counted twice. On
the SQLite store in its data directory, and on PostgreSQL (`--store`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pathlib
import signal
import socket
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psycopg
import pytest

from device_runtime.channel import ServerTrust
from emulator.data import federated_digits
from emulator.fleet import Fleet
from emulator.phone import RandomConditionsSettings
from server.certificates import CertificateFiles, write_loopback_certificates
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
KILLS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Opens a read connection to the coordinator's store (the same SQL reads both).
StoreReader = Callable[[], Any]


def _snapshot(connect: StoreReader) -> dict[str, object]:
    with contextlib.closing(connect()) as db:
        rounds = db.execute(
            "SELECT round_number, state, reported, weights_sha256 FROM rounds ORDER BY round_number"
        ).fetchall()
        counted = dict(
            db.execute("SELECT round_number, COUNT(*) FROM counted_uploads GROUP BY round_number")
        )
        resources = {row[0] for row in db.execute("SELECT sha256 FROM resources")}
        tokens = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT token_sha256) FROM counted_uploads"
        ).fetchone()
    return {"rounds": rounds, "counted": counted, "resources": resources, "tokens": tokens}


def _round_is_open(connect: StoreReader) -> bool:
    """Whether the store holds an assignment of a round with no record yet (a round open)."""
    with contextlib.closing(connect()) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM assignments AS a WHERE NOT EXISTS (SELECT 1 FROM rounds AS r "
            "WHERE r.task_id = a.task_id AND r.round_number = a.round_number)"
        ).fetchone()
    return bool(row[0])


async def _until_a_round_is_open(connect: StoreReader) -> None:
    # An event, not a time: on a loaded machine the phones may need seconds to come back
    # after a restart. Bounded only to fail rather than hang.
    for _ in range(6000):
        if _round_is_open(connect):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no round opened within 300 s of a restart")


def _check_invariants(before: dict, after: dict) -> None:
    committed_before = [r for r in before["rounds"] if r[1] == "committed"]
    assert set(committed_before) <= set(after["rounds"]), "a committed round was lost"
    total, distinct = after["tokens"]
    assert total == distinct, "an upload was counted twice"
    for number, state, reported, weights_sha in after["rounds"]:
        if state == "committed":
            assert after["counted"].get(number, 0) == reported, f"round {number} miscounted"
            assert weights_sha in after["resources"], f"round {number} weights missing"
        else:
            assert after["counted"].get(number, 0) == 0, f"{state} round {number} counted uploads"


async def _start(
    port: int,
    data_dir: pathlib.Path,
    task: pathlib.Path,
    model: pathlib.Path,
    tls: CertificateFiles,
    extra: Sequence[str] = (),
):
    secret = data_dir.parent / "enrollment.secret"
    secret.write_bytes(ENROLLMENT_SECRET)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "overnight",
        "serve",
        "--address",
        f"127.0.0.1:{port}",
        "--admin-address",
        "127.0.0.1:0",
        "--tls-cert",
        str(tls.server_cert),
        "--tls-key",
        str(tls.server_key),
        "--data-dir",
        str(data_dir),
        "--task",
        str(task),
        "--model",
        str(model),
        "--min-retry-s",
        "0.05",
        "--enrollment-secret-file",
        str(secret),
        "--exempt-network",
        "127.0.0.0/8",
        *extra,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(
        process.stdout.readline(), timeout=300
    )  # start-up on a loaded machine
    assert b"listening" in line, line
    return process


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_kill_minus_nine_at_ten_moments_loses_nothing(
    tmp_path: pathlib.Path, model_path: pathlib.Path, store: str, request: pytest.FixtureRequest
) -> None:
    task = tmp_path / "task.toml"
    task.write_text(
        '[task]\ntask_id = "crash"\npopulation = "digits"\ntotal_rounds = 10000\n'
        "target_reports = 3\nover_selection = 1.4\nmin_reports = 2\nselection_deadline_s = 2.0\n"
        "reporting_deadline_s = 5.0\nepochs = 1\nbatch_size = 8\n"
    )
    data_dir = tmp_path / "state"
    connect: StoreReader
    if store == "postgresql":
        url = request.getfixturevalue("postgres_url")
        extra = ["--store", url]
        connect = functools.partial(psycopg.connect, url)
    else:
        db_path = data_dir / "coordinator.sqlite"
        extra = []
        connect = functools.partial(sqlite3.connect, f"file:{db_path}?mode=ro", uri=True)
    port = _free_port()
    delays = np.random.default_rng(20261121).uniform(0.2, 2.5, KILLS)
    tls = write_loopback_certificates(tmp_path / "tls")
    fleet = Fleet(
        f"127.0.0.1:{port}",
        ServerTrust(root_certificates=tls.root_certs.read_bytes()),
        "digits",
        federated_digits(8, seed=5).clients,
        seed=5,
        conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
        enrollment_secret=ENROLLMENT_SECRET,
    )

    async def scenario() -> tuple[list[dict], dict]:
        snapshots = []
        process = await _start(port, data_dir, task, model_path, tls, extra)
        stop = asyncio.Event()
        devices = asyncio.create_task(fleet.run(stop))
        try:
            for kill, delay in enumerate(delays):
                await asyncio.sleep(float(delay))
                if kill % 2 == 0:  # every other kill lands in an open round, by design
                    await _until_a_round_is_open(connect)
                before = _snapshot(connect)
                os.kill(process.pid, signal.SIGKILL)
                await process.wait()
                after = _snapshot(connect)
                _check_invariants(before, after)
                snapshots.append(after)
                process = await _start(port, data_dir, task, model_path, tls, extra)
            # The restarted coordinator still makes progress with the same devices.
            committed = sum(r[1] == "committed" for r in snapshots[-1]["rounds"])
            # Waits for the event (two more commits), bounded only to fail rather than hang:
            # after ten kills the phones' unreachable backoff and retry windows can be long,
            # and on a loaded machine a restart takes seconds.
            for _ in range(3000):
                await asyncio.sleep(0.1)
                final = _snapshot(connect)
                if sum(r[1] == "committed" for r in final["rounds"]) > committed + 1:
                    break
            return snapshots, final
        finally:
            stop.set()
            process.send_signal(signal.SIGTERM)
            await process.wait()
            await devices

    snapshots, final = asyncio.run(scenario())

    _check_invariants(snapshots[-1], final)
    committed_final = sum(r[1] == "committed" for r in final["rounds"])
    assert committed_final > sum(r[1] == "committed" for r in snapshots[-1]["rounds"]), final[
        "rounds"
    ][-12:]
    assert any(r[1] == "abandoned" for r in final["rounds"]), "no kill caught a round open"
    assert fleet.stats.outcomes["reported"] >= committed_final * 2, fleet.stats.outcomes
