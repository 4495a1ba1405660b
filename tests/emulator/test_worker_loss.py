"""A fleet worker that dies is noticed the moment it exits: by FleetProcesses and by emulate.

Phones check in with a port nobody listens on: the workers run, nothing else is needed.
Every wait is on an event (a process sentinel, a line of output, an exit); the timeouts only
keep a broken build from hanging the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from device_runtime.channel import ServerTrust
from emulator.data import SampledDigits
from emulator.fleet_config import FleetConfig
from emulator.fleet_processes import FleetProcesses, WorkerLoss, run_then_exit
from emulator.fleet_worker import FleetSpec

REPO = pathlib.Path(__file__).resolve().parents[2]
HANG_GUARD_S = 300.0


def _fleet(phones: int, workers: int) -> FleetProcesses:
    spec = FleetSpec(
        target="127.0.0.1:9",
        trust=ServerTrust(insecure=True),  # nothing listens there
        population="digits",
        config=FleetConfig(phones=phones, seed=3),
        datasets=SampledDigits(seed=0),
        virtual_start_s=0.0,
        speedup=60.0,
        anchor_s=time.time(),
    )
    return FleetProcesses(spec, workers)


def test_a_killed_worker_is_reported_at_once_with_its_phones() -> None:
    # Prepare: 6 phones over 2 workers (0, 2, 4 and 1, 3, 5).
    fleet = _fleet(phones=6, workers=2)
    fleet.start()
    victim = fleet.pids[1]

    # Execute
    os.kill(victim, signal.SIGKILL)
    lost = fleet.wait(HANG_GUARD_S)
    report = fleet.stop()

    # Assert: the loss is known with its exit status and phones; the totals count them.
    expected = WorkerLoss(worker=1, pid=victim, exitcode=-signal.SIGKILL, phones=(1, 3, 5))
    assert lost == [expected]
    assert "was killed by SIGKILL" in expected.describe()
    assert report.lost == [expected]
    assert (report.phones, report.phones_lost) == (3, 3)


def _emulate(*extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "overnight", "emulate", "--phones", "4", "--workers", "2"]
        + ["--server", "127.0.0.1:9", "--duration", "600", "--speedup", "3600", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _worker_pids(emulate: subprocess.Popen[str]) -> list[int]:
    """From emulate's `fleet workers: pid 12: 2 phones; pid 13: 2 phones` line."""
    assert emulate.stdout is not None
    for line in emulate.stdout:
        if line.startswith("fleet workers:"):
            parts = line.removeprefix("fleet workers:").split(";")
            return [int(part.split()[1].rstrip(":")) for part in parts]
    raise AssertionError("emulate never listed its workers")


def _line_with(stream: object, text: str) -> str:
    for line in stream:  # type: ignore[attr-defined]
        if text in line:
            return str(line)
    raise AssertionError(f"no line with {text!r}")


@pytest.mark.e2e
def test_emulate_stops_and_exits_non_zero_when_a_worker_dies() -> None:
    # Prepare
    emulate = _emulate()
    pids = _worker_pids(emulate)

    # Execute: the second worker (phones 1 and 3) is killed; nothing else stops the run.
    os.kill(pids[1], signal.SIGKILL)
    stdout, stderr = emulate.communicate(timeout=HANG_GUARD_S)

    # Assert
    assert emulate.returncode == 1, stderr
    assert (
        f"fleet worker 1 (pid {pids[1]}) was killed by SIGKILL; its 2 phones are lost: 1, 3"
        in stderr
    )
    assert "phones: 2 ran to the end, 2 lost with 1 worker(s) that died" in stdout


@pytest.mark.e2e
def test_with_tolerate_worker_loss_emulate_runs_on_and_exits_zero() -> None:
    # Prepare
    emulate = _emulate("--tolerate-worker-loss")
    pids = _worker_pids(emulate)

    # Execute: kill a worker, see emulate report it, then stop the run as an operator would.
    os.kill(pids[0], signal.SIGKILL)
    loss = _line_with(emulate.stderr, "was killed by SIGKILL")
    assert emulate.poll() is None  # still running with the other worker
    emulate.send_signal(signal.SIGINT)
    stdout, _ = emulate.communicate(timeout=HANG_GUARD_S)

    # Assert
    assert f"fleet worker 0 (pid {pids[0]})" in loss and "lost: 0, 2" in loss
    assert emulate.returncode == 0
    assert "phones: 2 ran to the end, 2 lost with 1 worker(s) that died" in stdout


def _worker_leaving_a_task_that_ignores_cancellation(report_pipe: Any) -> None:
    """What a fleet worker's loop holds when grpc.aio leaks a call task on channel close: a
    task that never finishes when cancelled."""

    async def leaked_call() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    async def main() -> str:
        asyncio.get_running_loop().create_task(leaked_call())
        await asyncio.sleep(0)
        return "the worker's report"

    run_then_exit(main, report_pipe)


def test_a_worker_whose_loop_keeps_a_task_it_cannot_cancel_still_reports_and_exits() -> None:
    # Prepare
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    worker = context.Process(
        target=_worker_leaving_a_task_that_ignores_cancellation, args=(writer,)
    )

    # Execute
    worker.start()
    writer.close()
    reported = reader.poll(HANG_GUARD_S)
    worker.join(HANG_GUARD_S)
    if worker.is_alive():
        worker.kill()

    # Assert: the report arrived and the process ended cleanly, without waiting on the task.
    assert reported and reader.recv() == "the worker's report"
    assert worker.exitcode == 0
