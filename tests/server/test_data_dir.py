"""The data directory: one owner at a time, checked and, on request, repaired at start-up."""

from __future__ import annotations

import os
import pathlib
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from device_runtime import constants
from protos import common_pb2, device_pb2
from server.data_dir import DataDirectory, DataDirError
from server.sqlite_store import SqliteStore
from server.store import RoundState
from tests.fakes import FakeClock
from tests.harness import task_config
from tests.identities import check_in, make_coordinator, sign_header
from tests.small_disk import SmallDisk

PAGE_BYTES = 16384  # SqliteStore's page size


def test_a_second_owner_is_refused_with_the_holders_pid(tmp_path: pathlib.Path) -> None:
    first = DataDirectory.open(tmp_path / "data")

    with pytest.raises(DataDirError, match=f"in use by another coordinator \\(pid {os.getpid()}"):
        DataDirectory.open(tmp_path / "data")

    first.close()
    DataDirectory.open(tmp_path / "data").close()


def test_the_lock_dies_with_its_process(tmp_path: pathlib.Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from server.data_dir import DataDirectory; "
            f"DataDirectory.open({str(tmp_path / 'data')!r}); print('locked', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    with pytest.raises(DataDirError, match=f"pid {holder.pid}"):
        DataDirectory.open(tmp_path / "data")

    holder.kill()
    holder.wait()

    DataDirectory.open(tmp_path / "data").close()


def test_a_new_directory_is_private(tmp_path: pathlib.Path) -> None:
    DataDirectory.open(tmp_path / "data").close()

    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700


def test_a_read_only_directory_is_refused(small_disk: SmallDisk) -> None:
    DataDirectory.open(small_disk.path / "data").close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk.path)], check=True)

    with pytest.raises(DataDirError, match="is not writable"):
        DataDirectory.open(small_disk.path / "data")


def _store_with_a_committed_round(path: pathlib.Path, model_bytes: bytes) -> list[str]:
    """A store whose task committed one round from two uploads; returns their token hashes."""
    clock = FakeClock()
    store = SqliteStore(path)
    coordinator = make_coordinator(store, clock)
    coordinator.register_task(task_config(target_reports=2, over_selection=1.0), model_bytes)
    n = coordinator.task("t1").record.num_parameters
    for i in range(2):
        answer = check_in(coordinator, f"d{i}")
        payload = np.full(n, 0.5, "<f4").tobytes()
        header = device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=answer.assignment.upload_token,
            example_count=10,
            num_elements=n,
            encoding="float32_delta",
            metrics=common_pb2.ClientMetrics(num_examples=10, num_batches=1),
        )
        sign_header(header)
        coordinator.accept_upload(header, payload, len(payload))
    coordinator.tick()
    tokens = coordinator.task("t1").last_round.counted_tokens()  # type: ignore[union-attr]
    store.close()
    return tokens


def _overwrite_page(path: pathlib.Path, btree: str) -> None:
    with sqlite3.connect(path) as db:
        [(page,)] = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (btree,))
    with open(path, "r+b") as f:
        f.seek((page - 1) * PAGE_BYTES)
        f.write(b"\xa5" * PAGE_BYTES)


def test_a_damaged_index_stops_the_start_and_says_what_to_do(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _store_with_a_committed_round(data / "coordinator.sqlite", model_bytes)
    _overwrite_page(data / "coordinator.sqlite", "sqlite_autoindex_counted_uploads_1")

    with pytest.raises(
        DataDirError, match="is damaged .*restore .* backup, or start with --repair"
    ):
        DataDirectory.open(data)


def test_repair_rebuilds_a_damaged_index_and_keeps_every_count(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tokens = _store_with_a_committed_round(data / "coordinator.sqlite", model_bytes)
    _overwrite_page(data / "coordinator.sqlite", "sqlite_autoindex_counted_uploads_1")

    DataDirectory.open(data, repair=True).close()

    store = SqliteStore(data / "coordinator.sqlite")
    assert [r.state for r in store.rounds("t1")] == [RoundState.COMMITTED]
    assert all(store.is_counted(token) for token in tokens)
    assert list(data.glob("coordinator.sqlite.damaged-*"))


def test_repair_keeps_the_last_good_commit_when_a_table_page_is_lost(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _store_with_a_committed_round(data / "coordinator.sqlite", model_bytes)
    before = SqliteStore(data / "coordinator.sqlite")
    [committed] = before.rounds("t1")
    before.close()
    _overwrite_page(data / "coordinator.sqlite", "assignments")

    DataDirectory.open(data, repair=True).close()

    restarted = make_coordinator(SqliteStore(data / "coordinator.sqlite"), FakeClock())
    assert restarted.task("t1").committed_rounds == 1
    assert restarted.task("t1").weights_sha256 == committed.weights_sha256


def test_an_overwritten_store_cannot_be_repaired(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "coordinator.sqlite").write_bytes(b"not a database at all" * 1000)

    with pytest.raises(DataDirError, match="file is not a database"):
        DataDirectory.open(data)
    with pytest.raises(DataDirError, match="cannot be repaired"):
        DataDirectory.open(data, repair=True)
    assert (data / "coordinator.sqlite").read_bytes().startswith(b"not a database")
