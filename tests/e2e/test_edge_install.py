"""The base package, installed alone into a fresh venv of each Python an edge OS ships, runs
`overnight device` against a coordinator from the full environment until a round commits.

The venvs hold the lock's device pins (requirements/device.txt, hash-checked) and are kept
under `.edge-venvs/`, keyed by Python version and lock: a later run reinstalls the package
itself, offline, and only when its sources changed. A Python that pyenv does not have is
skipped, naming it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from device_runtime.examples import LocalExamples
from emulator.data import load_digits
from requirements.for_target import pins_for_target
from server.store import RoundState
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
EDGE_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# What `pip install .` needs from the repository: the project file and the packages.
PROJECT_FILES = ("pyproject.toml", "README.md")
PACKAGES = ("overnight", "protos", "device_runtime", "server", "emulator", "tflite_export")


@dataclasses.dataclass(frozen=True)
class EdgeVenv:
    version: str
    path: pathlib.Path

    @property
    def overnight(self) -> pathlib.Path:
        return self.path / "bin" / "overnight"

    def installed_bytes(self) -> int:
        """What `pip install overnight` put into site-packages (not pip and setuptools)."""
        tools = ("pip", "setuptools", "pkg_resources", "_distutils_hack")
        (site,) = self.path.glob("lib/python*/site-packages")
        return sum(
            f.stat().st_size
            for f in site.rglob("*")
            if f.is_file() and not f.relative_to(site).parts[0].startswith(tools)
        )


def _pyenv_interpreter(version: str) -> pathlib.Path | None:
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return None
    root = pathlib.Path(
        subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
    )
    found = sorted(root.glob(f"versions/{version}.*/bin/python{version}"))
    return found[-1] if found else None


def _pip(venv_path: pathlib.Path, *args: str) -> None:
    subprocess.run(
        [venv_path / "bin" / "python", "-m", "pip", "--disable-pip-version-check", *args],
        check=True,
        capture_output=True,
        timeout=900,
    )


def _venv_with_device_pins(version: str, interpreter: pathlib.Path) -> pathlib.Path:
    """A venv holding the lock's device pins for `version` (and setuptools to build the
    package offline); made once per interpreter and lock."""
    lock = hashlib.sha256((REPO / "uv.lock").read_bytes())
    lock.update(str(interpreter.resolve()).encode())
    path = REPO / ".edge-venvs" / f"{version}-{lock.hexdigest()[:12]}"
    if (path / ".ready").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([interpreter, "-m", "venv", path], check=True, timeout=300)
    machine = subprocess.run(
        [interpreter, "-c", "import platform; print(platform.machine())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pins = pins_for_target((REPO / "requirements" / "device.txt").read_text(), version, machine)
    (path / "device-pins.txt").write_text("\n".join(pins) + "\n")
    _pip(path, "install", "--only-binary=:all:", "--no-deps", "-r", str(path / "device-pins.txt"))
    _pip(path, "install", "setuptools>=68")
    (path / ".ready").touch()
    return path


def _source_digest() -> str:
    """What `pip install .` would install: the project files and the packages' sources."""
    digest = hashlib.sha256()
    files = [REPO / name for name in PROJECT_FILES] + sorted(
        f
        for package in PACKAGES
        for f in (REPO / package).rglob("*")
        if f.suffix in (".py", ".pyi")
    )
    for f in files:
        digest.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module", params=EDGE_PYTHONS)
def edge_venv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> EdgeVenv:
    version: str = request.param
    interpreter = _pyenv_interpreter(version)
    if interpreter is None:
        pytest.skip(f"no Python {version} interpreter under `pyenv root`/versions")
    path = _venv_with_device_pins(version, interpreter)
    installed = path / "overnight-source.sha256"
    if installed.exists() and installed.read_text() == _source_digest():
        return EdgeVenv(version, path)  # this very source is installed already
    source = tmp_path_factory.mktemp(f"overnight-source-{version}")
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("*.pyc"))
    # Offline, and then every dependency of the base package must be there, from the lock.
    _pip(
        path,
        "install",
        "--no-index",
        "--no-build-isolation",
        "--force-reinstall",
        "--no-deps",
        str(source),
    )
    _pip(path, "check")
    installed.write_text(_source_digest())
    return EdgeVenv(version, path)


def test_base_install_has_no_extra_library(edge_venv: EdgeVenv) -> None:
    extras = ("tensorflow", "tensorboard", "sklearn", "matplotlib", "h5py", "dp_accounting")
    check = f"import importlib.util as u; print([m for m in {extras!r} if u.find_spec(m)])"

    found = subprocess.run(
        [edge_venv.path / "bin" / "python", "-c", check], capture_output=True, text=True
    )

    assert found.stdout.strip() == "[]", found.stderr


def test_a_command_of_an_extra_says_what_to_install(edge_venv: EdgeVenv) -> None:
    result = subprocess.run(
        [edge_venv.overnight, "serve", "--help"], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2
    expected = "needs Python 3.11 to 3.13" if edge_venv.version == "3.10" else "overnight[server]"
    assert expected in result.stderr


def test_device_from_the_base_install_reports_until_a_round_commits(
    edge_venv: EdgeVenv, tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    digits = load_digits()
    examples_path = tmp_path / "examples.npz"
    LocalExamples(digits.x[:40], digits.y[:40]).save(examples_path)
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=1)

    async def scenario() -> tuple[int, bytes, list, float]:
        async with running_coordinator(
            str(tmp_path / "store.sqlite"), model_bytes, config
        ) as running:
            first_check_in: list[float] = []
            check_in = running.coordinator.check_in

            def observed_check_in(request, peer=""):  # type: ignore[no-untyped-def]
                first_check_in.append(time.monotonic())
                return check_in(request, peer)

            running.coordinator.check_in = observed_check_in  # type: ignore[method-assign]
            assert running.trust.root_certificates is not None
            (tmp_path / "ca.pem").write_bytes(running.trust.root_certificates)
            (tmp_path / "enroll.secret").write_bytes(ENROLLMENT_SECRET)
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                edge_venv.overnight,
                "device",
                "--server",
                running.address,
                "--root-certs",
                str(tmp_path / "ca.pem"),
                "--population",
                POPULATION,
                "--examples",
                str(examples_path),
                "--enrollment-secret-file",
                str(tmp_path / "enroll.secret"),
                "--cache-dir",
                str(tmp_path / "device-cache"),  # its key is made there on first run
                "--max-reports",
                "1",
                "--seed",
                "0",
                cwd=tmp_path,  # not the repository: only the installed package is importable
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await asyncio.wait_for(process.communicate(), timeout=300)
            await running.settled()  # the round commits off the request path
            startup = first_check_in[0] - started if first_check_in else float("nan")
            return process.returncode or 0, output, running.store.rounds("t1"), startup

    code, output, rounds, startup_s = asyncio.run(scenario())

    assert code == 0, output.decode()
    assert b"reported round 1" in output
    assert [r.state for r in rounds] == [RoundState.COMMITTED]
    assert rounds[0].reported == 1
    assert np.isfinite(rounds[0].metrics["client_work/train/loss"])
    # Figures for the record (never asserted): what an edge box installs and waits for.
    print(
        f"\nPython {edge_venv.version} ({sys.platform}): base install "
        f"{edge_venv.installed_bytes() / 2**20:.0f} MiB, "
        f"first check-in {startup_s:.2f} s after start"
    )
