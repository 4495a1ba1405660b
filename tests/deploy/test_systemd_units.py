"""The systemd units in deploy/ as an operator installs them: `systemd-analyze verify` reads
each one, with ExecStart pointed at this checkout's `overnight` so that verify also checks the
executable; and the command lines they run parse with the real `overnight` parser."""

from __future__ import annotations

import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from overnight import cli
from server.coordinator_config import read_config

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTALLED = "/opt/overnight/.venv/bin/overnight"  # where the units expect the install
UNITS = sorted(p.name for p in DEPLOY.iterdir() if p.suffix in (".service", ".timer"))


def _exec_start(unit: str) -> list[str]:
    [line] = [
        line for line in (DEPLOY / unit).read_text().splitlines() if line.startswith("ExecStart=")
    ]
    return shlex.split(line.removeprefix("ExecStart="))


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verifies_the_unit(tmp_path: pathlib.Path, unit: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the units are not verified")
    here = pathlib.Path(sys.executable).parent / "overnight"
    for name in UNITS:  # a timer is verified with the service it starts beside it
        text = (DEPLOY / name).read_text().replace(INSTALLED, str(here))
        (tmp_path / name).write_text(text)

    verified = subprocess.run(
        [analyze, "verify", unit], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )

    print(verified.stdout, verified.stderr)
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == "", verified.stderr  # no warning either


@pytest.mark.parametrize("unit", [u for u in UNITS if u.endswith(".service")])
def test_the_command_a_unit_runs_parses(tmp_path: pathlib.Path, unit: str) -> None:
    program, *argv = _exec_start(unit)
    assert program == INSTALLED
    # The config file the coordinator unit names is deploy/coordinator.toml once installed.
    argv = [str(DEPLOY / "coordinator.toml") if a.endswith("coordinator.toml") else a for a in argv]
    command = next(a for a in argv if not a.startswith("-"))

    args = cli.build_parser([command]).parse_args(argv)

    assert args.func is not None


def test_the_shipped_coordinator_config_is_valid() -> None:
    serve = cli.build_parser(["serve"])
    commands = next(a for a in serve._actions if a.dest == "command")
    parser = commands.choices["serve"]  # type: ignore[index]

    values = read_config(DEPLOY / "coordinator.toml", parser)

    assert values["data_dir"] == "/var/lib/overnight"
    assert values["metrics_address"].startswith("127.0.0.1:")  # private by default
