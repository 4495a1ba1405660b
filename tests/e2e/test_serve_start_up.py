"""`overnight serve` refuses a data directory it cannot own or trust: one clear line on stderr,
exit status 2, no traceback, and nothing changed."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import pytest

from tests.small_disk import SmallDisk

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(data_dir: pathlib.Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "overnight",
            "serve",
            "--address",
            f"127.0.0.1:{_free_port()}",
            "--data-dir",
            str(data_dir),
            "--admin-address",
            "127.0.0.1:0",
            "--insecure",  # these tests are about the data directory, not the transport
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _refusal(data_dir: pathlib.Path, *extra: str) -> str:
    process = _serve(data_dir, *extra)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("serve: ")]
    return line


def test_a_second_coordinator_on_the_same_directory_exits_and_changes_nothing(
    tmp_path: pathlib.Path,
) -> None:
    data_dir = tmp_path / "state"
    first = _serve(data_dir)
    try:
        assert first.stdout is not None and "listening" in first.stdout.readline()
        store_before = (data_dir / "coordinator.sqlite").read_bytes()

        line = _refusal(data_dir)

        assert f"{data_dir} is in use by another coordinator (pid {first.pid})" in line
        assert (data_dir / "coordinator.sqlite").read_bytes() == store_before
        assert first.poll() is None  # the first one is untouched
    finally:
        first.terminate()
        first.communicate(timeout=60)


def test_a_read_only_data_directory_is_refused_at_start(small_disk: SmallDisk) -> None:
    (small_disk.path / "state").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk.path)], check=True)

    line = _refusal(small_disk.path / "state")

    assert "is not writable" in line


def test_an_overwritten_store_is_refused_with_what_to_do(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "state"
    data_dir.mkdir()
    (data_dir / "coordinator.sqlite").write_bytes(b"\x00garbage" * 4096)

    line = _refusal(data_dir)

    assert "is damaged (file is not a database)" in line
    assert "restore the data directory from a backup, or start with --repair" in line
    assert "cannot be repaired" in _refusal(data_dir, "--repair")
