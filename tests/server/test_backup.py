"""`overnight backup` against a data directory a coordinator holds: real SQLite, real locks."""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
import stat
from collections.abc import Iterator

import pytest

from server.backup import BackupError, back_up
from server.data_dir import DataDirectory, DataDirError
from server.operator_access import TOKENS_FILE, AdminTokens, Role
from server.sqlite_store import SqliteStore


@contextlib.contextmanager
def _held(data_dir: pathlib.Path) -> Iterator[SqliteStore]:
    """The data directory as `overnight serve` holds it: locked, its store open (WAL)."""
    directory = DataDirectory.open(data_dir)
    store = SqliteStore.in_data_dir(data_dir)
    try:
        yield store
    finally:
        store.close()
        directory.close()


def _resources(path: pathlib.Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {row[0] for row in db.execute("SELECT sha256 FROM resources")}


def test_a_backup_of_a_held_store_has_what_it_committed_and_leaves_the_lock(
    tmp_path: pathlib.Path,
) -> None:
    data_dir = tmp_path / "state"
    with _held(data_dir) as store:
        digests = {store.put_resource("weights", bytes([i]) * 1000) for i in range(3)}

        made = back_up(data_dir, tmp_path / "copy.sqlite")

        assert _resources(made.store) == digests
        with pytest.raises(DataDirError, match="in use by another coordinator"):
            DataDirectory.open(data_dir)  # still held: the backup took no lock


def test_the_copy_is_one_private_file(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "state"
    with _held(data_dir) as store:
        store.put_resource("weights", b"w" * 1000)

        made = back_up(data_dir, tmp_path / "copy.sqlite")

    assert stat.S_IMODE(made.store.stat().st_mode) == 0o600
    assert not made.store.with_name("copy.sqlite-wal").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial


def test_a_backup_to_a_directory_is_a_data_directory_a_coordinator_opens(
    tmp_path: pathlib.Path,
) -> None:
    data_dir = tmp_path / "state"
    with _held(data_dir) as store:
        _, token = AdminTokens(data_dir).create(Role.OPERATOR)
        digest = store.put_resource("weights", b"w" * 1000)

        made = back_up(data_dir, f"{tmp_path / 'restored'}/")

    assert (tmp_path / "restored" / TOKENS_FILE) in made.copied
    with _held(tmp_path / "restored") as restored:
        assert restored.get_resource(digest) == b"w" * 1000
    assert AdminTokens(tmp_path / "restored").role_of(token) is Role.OPERATOR


def test_a_stopped_coordinators_store_is_backed_up_too(tmp_path: pathlib.Path) -> None:
    data_dir = tmp_path / "state"
    with _held(data_dir) as store:
        digest = store.put_resource("weights", b"w")

    made = back_up(data_dir, tmp_path / "copy.sqlite")

    assert _resources(made.store) == {digest}


def test_a_directory_without_a_store_is_refused_naming_it(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BackupError, match=r"no store at .*empty"):
        back_up(tmp_path / "empty", tmp_path / "copy.sqlite")


def test_the_data_directory_of_a_running_coordinator_is_not_overwritten(
    tmp_path: pathlib.Path,
) -> None:
    source, running = tmp_path / "state", tmp_path / "running"
    with _held(source) as store:
        store.put_resource("weights", b"w")
    with _held(running), pytest.raises(BackupError, match="running coordinator"):
        back_up(source, running)
