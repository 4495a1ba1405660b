"""The data directory at rest: 0700, and every file the coordinator writes there 0600, even
under a permissive umask."""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator

import pytest

from server.certificates import write_loopback_certificates
from server.operator_access import AdminTokens, Role, ensure_first_token
from server.private_files import prepare_data_dir, write_private_file
from server.sqlite_store import SqliteStore
from server.store import RoundRecord, RoundState
from server.tensorboard_sink import TensorBoardSink
from tests.harness import task_config


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """What many systems default to: new files 0644, new directories 0755."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_new_data_directory_is_private(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "a" / "state"

    prepare_data_dir(data_dir)

    assert _mode(data_dir) == 0o700


def test_an_existing_open_data_directory_is_tightened(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "state"
    data_dir.mkdir(mode=0o755)

    SqliteStore.in_data_dir(data_dir).close()

    assert _mode(data_dir) == 0o700


def test_the_store_and_its_wal_and_shm_files_are_private(tmp_path: pathlib.Path) -> None:
    store = SqliteStore.in_data_dir(tmp_path / "state")
    store.put_resource("model", b"x" * 100_000)  # a write: the WAL and SHM files exist now

    files = sorted((tmp_path / "state").iterdir())

    assert [f.name for f in files] == [
        "coordinator.sqlite",
        "coordinator.sqlite-shm",
        "coordinator.sqlite-wal",
    ]
    assert [_mode(f) for f in files] == [0o600] * 3
    store.close()


def test_store_files_left_open_by_an_older_version_are_tightened(tmp_path: pathlib.Path) -> None:
    SqliteStore.in_data_dir(tmp_path / "state").close()
    database = tmp_path / "state" / "coordinator.sqlite"
    wal = tmp_path / "state" / "coordinator.sqlite-wal"
    wal.touch()
    for path in (database, wal):
        path.chmod(0o644)

    SqliteStore.in_data_dir(tmp_path / "state").close()

    assert _mode(database) == 0o600
    assert not wal.exists() or _mode(wal) == 0o600


def test_admin_token_files_are_private_and_hold_no_token_in_the_clear(
    tmp_path: pathlib.Path,
) -> None:
    first = ensure_first_token(tmp_path)
    _, viewer_token = AdminTokens(tmp_path).create(Role.VIEWER)

    hashed = tmp_path / "admin_tokens.json"
    assert first is not None
    assert _mode(first) == 0o600 and _mode(hashed) == 0o600
    stored = hashed.read_text()
    assert first.read_text().strip() not in stored and viewer_token not in stored


def test_tensorboard_directories_and_event_files_are_private(tmp_path: pathlib.Path) -> None:
    class Task:
        committed_rounds = 1

    sink = TensorBoardSink(tmp_path / "tensorboard")
    record = RoundRecord("t1", 1, RoundState.COMMITTED, 2, 2, 0, {"x": 1.0}, 0.0, 1.0)

    sink(Task(), record)  # type: ignore[arg-type]
    sink.close()

    paths = [tmp_path / "tensorboard", *(tmp_path / "tensorboard").rglob("*")]
    assert any(p.is_file() for p in paths)
    assert all(_mode(p) == (0o700 if p.is_dir() else 0o600) for p in paths)


def test_a_private_file_is_replaced_whole_and_stays_private(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "secret"
    path.write_text("old")
    path.chmod(0o644)

    write_private_file(path, b"new")

    assert path.read_bytes() == b"new" and _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_the_tls_private_key_written_for_tests_is_private(tmp_path: pathlib.Path) -> None:
    files = write_loopback_certificates(tmp_path)

    assert _mode(files.server_key) == 0o600


def test_a_registered_task_does_not_widen_anything(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    from device_runtime.clock import RealClock
    from server.coordinator import Coordinator

    store = SqliteStore.in_data_dir(tmp_path / "state")
    Coordinator(store, RealClock()).register_task(task_config(), model_bytes)
    store.close()

    paths = [tmp_path / "state", *(tmp_path / "state").rglob("*")]
    assert all(_mode(p) == (0o700 if p.is_dir() else 0o600) for p in paths)
