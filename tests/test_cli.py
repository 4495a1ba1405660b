"""The `overnight` command as a user runs it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

from device_runtime.model_file import read_manifest
from overnight import cli
from server.certificates import write_loopback_certificates
from server.operator_access import TOKEN_ENV

REPO = pathlib.Path(__file__).resolve().parents[1]


def _overnight(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `overnight`; the admin token in the environment is `token` (none by default)."""
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    if token is not None:
        env[TOKEN_ENV] = token
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_help_lists_every_subcommand_with_the_extra_it_needs() -> None:
    result = _overnight("--help")

    assert result.returncode == 0
    listing = " ".join(result.stdout.split())
    for command, needs in [
        ("demo", "needs overnight[server,emulator,export], Python 3.11"),
        ("export", "needs overnight[export], Python 3.11"),
        ("serve", "needs overnight[server], Python 3.11 to 3.13"),
        ("status", "needs overnight[server], Python 3.11 to 3.13"),
        ("task", "needs overnight[server], Python 3.11 to 3.13"),
        ("device", "base install"),
        ("emulate", "needs overnight[emulator], Python 3.11 to 3.13"),
    ]:
        assert re.search(rf"\b{command}\b [^[]*\[{re.escape(needs)}\]", listing), command


# Runs `overnight` where the extras' libraries cannot be imported, as on a base install, and
# prints which of the components' heavy modules got imported.
WITHOUT_EXTRAS = """
import importlib.abc, sys
BLOCKED = {"tensorflow", "tensorboard", "dp_accounting", "sklearn", "matplotlib", "h5py"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from overnight.cli import main
try:
    code = main(sys.argv[1:])
finally:  # also after --help, which exits from inside argparse
    heavy = ("server", "emulator", "tflite_export", "tensorflow", "tensorboard")
    print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in heavy))
sys.exit(code)
"""


def _overnight_without_extras(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_device_runs_without_any_extra_and_imports_no_other_component() -> None:
    result = _overnight_without_extras("device", "--help")

    assert result.returncode == 0, result.stderr
    assert "--population" in result.stdout
    assert "imported: []" in result.stdout


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("serve", "pip install 'overnight[server]'"),
        ("status", "pip install 'overnight[server]'"),
        ("emulate", "pip install 'overnight[emulator]'"),
        ("export", "pip install 'overnight[export]'"),
        ("demo", "pip install 'overnight[server,emulator,export]'"),
    ],
)
def test_a_command_whose_extra_is_missing_says_which_to_install(command: str, extra: str) -> None:
    result = _overnight_without_extras(command, "--help")

    assert result.returncode == 2
    assert f"overnight {command} needs the" in result.stderr
    assert extra in result.stderr


@pytest.mark.parametrize(
    ("version", "message"),
    [((3, 10), "needs Python 3.11; this is Python 3.10"), ((3, 13), "this is Python 3.13")],
)
def test_the_exporter_outside_python_3_11_says_it_needs_3_11(
    version: tuple[int, int], message: str
) -> None:
    exporter = next(c for c in cli.COMPONENTS if "export" in c.commands)

    assert message in (cli.missing_requirement(exporter, version) or "")


def test_export_writes_a_model_and_its_manifest(tmp_path: pathlib.Path) -> None:
    output = tmp_path / "mlp.tflite"

    result = _overnight(
        "export",
        "tflite_export.model_zoo:create_digits_mlp",
        "-o",
        str(output),
        "--batch-size",
        "4",
        "--learning-rate",
        "0.05",
    )

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(output.read_bytes())
    assert manifest.batch_size == 4
    assert manifest.optimizer == {"name": "sgd", "learning_rate": 0.05}
    assert (tmp_path / "mlp.tflite.json").exists()
    assert "4810 parameters" in result.stdout


def test_export_of_an_unsupported_loss_fails_with_a_message(tmp_path: pathlib.Path) -> None:
    result = _overnight(
        "export",
        "tflite_export.model_zoo:create_digits_mlp",
        "-o",
        str(tmp_path / "m.tflite"),
        "--loss",
        "hinge",
    )

    assert result.returncode == 2
    assert "loss 'hinge' is not supported" in result.stderr


def test_export_with_a_malformed_model_spec_says_how_to_write_it(tmp_path: pathlib.Path) -> None:
    result = _overnight("export", "model.py", "-o", str(tmp_path / "m.tflite"))

    assert result.returncode != 0
    assert "FILE.py:FUNCTION" in result.stderr


def test_emulate_refuses_a_bad_fleet_config_and_names_the_field(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text("[fleet]\n[fleet.routine]\np_home_wifi = 2.0\n")

    result = _overnight("emulate", "--fleet-config", str(config), "--duration", "1")

    assert result.returncode == 2
    assert "routine.p_home_wifi" in result.stderr


def test_emulate_refuses_an_unknown_data_source() -> None:
    result = _overnight("emulate", "--data", "mnist", "--duration", "1")

    assert result.returncode == 2
    assert "expected digits, emnist-h5:PATH or femnist-json:PATH" in result.stderr


def _free_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def _serving(tmp_path: pathlib.Path, *extra: str) -> Iterator[tuple[str, list[str]]]:
    """`overnight serve` over TLS with a fresh CA; yields the admin address and the lines it
    printed at start (listening, then the first operator token's file)."""
    tls = write_loopback_certificates(tmp_path / "tls")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "overnight",
            "serve",
            "--address",
            _free_address(),
            "--admin-address",
            "127.0.0.1:0",
            "--tls-cert",
            str(tls.server_cert),
            "--tls-key",
            str(tls.server_key),
            "--data-dir",
            str(tmp_path / "state"),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        listening = server.stdout.readline()
        token_line = server.stdout.readline()
        assert "listening" in listening, listening
        admin_address = listening.split(" and ")[1].split()[0]
        yield admin_address, [listening, token_line]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_task_create_and_status_against_a_running_coordinator(
    tmp_path: pathlib.Path, model_path: pathlib.Path
) -> None:
    config = tmp_path / "task.toml"
    config.write_text('[task]\ntask_id = "cli-task"\npopulation = "phones"\nbatch_size = 8\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[task]\ntask_id = "x"\npopulation = "phones"\ntarget_reports = -1\n')
    token_file = tmp_path / "state" / "operator.token"
    with _serving(tmp_path) as (admin, _):
        client = (
            "--server",
            admin,
            "--root-certs",
            str(tmp_path / "tls" / "ca.pem"),
            "--admin-token-file",
            str(token_file),
        )
        created = _overnight("task", "create", str(config), "--model", str(model_path), *client)
        again = _overnight("task", "create", str(config), "--model", str(model_path), *client)
        invalid = _overnight("task", "create", str(bad), "--model", str(model_path), *client)
        paused = _overnight("task", "pause", "cli-task", *client)
        status = _overnight("status", "--task", "cli-task", *client)

    assert created.returncode == 0, created.stderr
    assert "registered task cli-task" in created.stdout
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr
    assert invalid.returncode == 2 and "'target_reports'" in invalid.stderr
    assert paused.returncode == 0 and "task cli-task: paused" in paused.stdout
    assert "population phones" in status.stdout
    assert "task cli-task: paused, 0/10 rounds committed" in status.stdout
    assert (tmp_path / "state" / "coordinator.sqlite").exists()


def test_serve_keeps_its_data_directory_private_and_names_the_first_token(
    tmp_path: pathlib.Path,
) -> None:
    with _serving(tmp_path) as (_, lines):
        pass

    token_file = tmp_path / "state" / "operator.token"
    assert str(token_file) in lines[1]
    state = [tmp_path / "state", *(tmp_path / "state").rglob("*")]
    assert token_file in state and len(state) >= 4  # the store, its hashed tokens, this token
    assert all(stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600) for p in state)
    assert (
        token_file.read_text().strip() not in (tmp_path / "state" / "admin_tokens.json").read_text()
    )


def test_status_with_a_wrong_admin_token_is_unauthenticated(tmp_path: pathlib.Path) -> None:
    with _serving(tmp_path) as (admin, _):
        result = _overnight(
            "status",
            "--server",
            admin,
            "--root-certs",
            str(tmp_path / "tls" / "ca.pem"),
            token="not-a-token",
        )

    assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr


def test_serve_without_certificates_or_insecure_refuses_to_start(tmp_path: pathlib.Path) -> None:
    result = _overnight("serve", "--data-dir", str(tmp_path / "state"))

    assert result.returncode == 2 and "--tls-cert and --tls-key" in result.stderr


def test_insecure_commands_say_so_on_start(tmp_path: pathlib.Path) -> None:
    result = _overnight("status", "--insecure", "--server", _free_address(), token="t")

    assert "WARNING" in result.stderr and "without TLS" in result.stderr


def test_a_device_started_insecure_says_so(tmp_path: pathlib.Path) -> None:
    result = _overnight(
        "device",
        "--insecure",
        "--population",
        "p",
        "--examples",
        str(tmp_path / "missing.npz"),
    )

    assert result.returncode == 2
    assert result.stderr.startswith("WARNING: device runs without TLS")


def test_a_device_refuses_insecure_with_root_certificates(tmp_path: pathlib.Path) -> None:
    result = _overnight(
        "device",
        "--insecure",
        "--root-certs",
        str(tmp_path / "ca.pem"),
        "--population",
        "p",
        "--examples",
        str(tmp_path / "x.npz"),
    )

    assert result.returncode == 2 and "exclude each other" in result.stderr
