"""The test PostgreSQL server: missing binaries fail the tests with how to install them, and
the server never outlives its test run."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.postgres_server import PostgresUnavailable, find_bindir, running_postgres

REPO = pathlib.Path(__file__).resolve().parents[1]


def _processes_under(root: pathlib.Path) -> list[int]:
    """The postmaster (its command line names `root`) and its children (the background and
    client backends, which rename themselves)."""
    postmasters, parents = [], {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(root).encode() in (entry / "cmdline").read_bytes():
                    postmasters.append(int(entry.name))
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # exited while we looked
    return postmasters + [pid for pid, parent in parents.items() if parent in postmasters]


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 60
    while pathlib.Path(f"/proc/{pid}").exists():
        status = pathlib.Path(f"/proc/{pid}/status").read_text(errors="replace")
        if "State:\tZ" in status:  # exited, waiting for its parent to reap it
            return
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def test_missing_binaries_say_how_to_install_them(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OVERNIGHT_PG_BINDIR", str(tmp_path))

    with pytest.raises(PostgresUnavailable, match="apt-get install postgresql"):
        find_bindir()


def test_missing_binaries_fail_the_tests_that_need_them_never_skip(
    tmp_path: pathlib.Path,
) -> None:
    test_file = tmp_path / "test_needs_postgres.py"
    test_file.write_text("def test_it(postgres_server):\n    pass\n")

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.postgres_server", str(test_file)]
        + ["-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "OVERNIGHT_PG_BINDIR": str(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout and "skipped" not in result.stdout
    assert "PostgreSQL tests cannot run" in result.stdout
    assert "apt-get install postgresql" in result.stdout


def test_the_server_stops_when_the_block_is_interrupted() -> None:
    with pytest.raises(KeyboardInterrupt), running_postgres() as server:
        root, server_processes = server.root, _processes_under(server.root)
        assert len(server_processes) > 1
        raise KeyboardInterrupt

    for pid in server_processes:
        _wait_gone(pid)
    assert not root.exists()


def test_the_server_dies_with_a_killed_test_run() -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from tests.postgres_server import running_postgres\n"
            "with running_postgres() as server:\n"
            "    print(server.root, server.process.pid, flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    root_text, pid_text = holder.stdout.readline().split()
    root = pathlib.Path(root_text)

    server_processes = _processes_under(root)
    assert len(server_processes) > 1  # the postmaster and its backends

    holder.send_signal(signal.SIGKILL)  # no finally block runs
    holder.wait()

    try:
        for pid in server_processes:  # backends exit once they see the postmaster gone
            _wait_gone(pid)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # a killed run leaves its directory
