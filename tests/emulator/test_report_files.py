"""The emulate report: rounds from the coordinator, dropout causes, and a whole CLI run."""

from __future__ import annotations

import asyncio
import collections
import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from emulator.cli import write_causes_csv, write_rounds_csv
from server.operator_access import Role
from tests.harness import running_coordinator, task_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_rounds_csv_lists_the_coordinators_rounds(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def scenario() -> None:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, task_config()
        ) as running:
            await asyncio.to_thread(
                write_rounds_csv,
                running.admin_address,
                running.trust,
                running.tokens[Role.VIEWER],
                "t1",
                tmp_path / "r.csv",
            )

    asyncio.run(scenario())

    rows = list(csv.reader((tmp_path / "r.csv").open()))
    assert rows == [["round", "state", "selected", "reported", "dropped", "seconds"]]


def test_causes_csv_is_sorted_by_count(tmp_path: pathlib.Path) -> None:
    write_causes_csv(collections.Counter({"picked up": 2, "unplugged": 5}), tmp_path / "c.csv")

    rows = list(csv.reader((tmp_path / "c.csv").open()))

    assert rows == [["cause", "dropouts"], ["unplugged", "5"], ["picked up", "2"]]


@pytest.mark.e2e
def test_emulate_writes_its_report_even_without_a_coordinator(tmp_path: pathlib.Path) -> None:
    # 8 real seconds are 8 virtual hours at 3600x, however few of them the workers get to run
    # on a loaded machine: head counts are taken at fixed virtual instants, caught up on.
    result = subprocess.run(
        [sys.executable, "-m", "overnight", "emulate", "--phones", "20", "--workers", "2"]
        + [
            "--server",
            "127.0.0.1:9",
            "--duration",
            "8",
            "--speedup",
            "3600",
            "--start-hour-utc",
            "8",
        ]
        + ["--report-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,  # only against a hang
    )

    assert result.returncode == 0, result.stderr
    assert "outcomes:" in result.stdout
    rows = list(csv.DictReader((tmp_path / "participation.csv").open()))
    assert np.nanmax([float(r["eligible"]) for r in rows]) > 0  # 8:00 UTC is night in the Americas
    assert (tmp_path / "participation.png").stat().st_size > 0
    assert (tmp_path / "dropout_causes.csv").exists()
