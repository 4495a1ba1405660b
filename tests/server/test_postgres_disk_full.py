"""PostgreSQL on a full disk: the database's tablespace on a small tmpfs filled to its last
byte, so the server itself answers "could not extend file ... No space left on device"
(SQLSTATE 53100), as it would with its data disk full. The coordinator's answer is the one
SQLite's full disk gets (tests/server/test_round_faults.py): the commit changes nothing, is
retried after its backoff, and once there is room the round commits with each upload counted
once. Replicas, whose partial aggregates go through the same database, likewise: nothing
half-merged, every upload counted once when the leader commits."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import pwd
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from server.postgres_store import PostgresStore
from server.store import RoundState
from tests.fakes import FakeClock
from tests.harness import task_config
from tests.identities import check_in, make_coordinator
from tests.postgres_server import PostgresServer, server_user
from tests.server.test_replicas import Cluster, _deltas, _records, _registered, _upload
from tests.server.test_round_faults import commit_on_a_full_disk_is_retried
from tests.small_disk import SmallDisk


@pytest.fixture
def database_on_small_disk(postgres_server: PostgresServer) -> Iterator[tuple[str, SmallDisk]]:
    """A new database whose tables live on a 64 MiB tmpfs; its WAL stays on the server's own
    disk, as with a separate data volume. Yields the database's URL and the disk."""
    if os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs root to mount; run the suite as root")
    account = pwd.getpwnam(server_user)
    # Under /tmp, not the test's own directory: the server's user must reach it.
    mount_point = pathlib.Path(tempfile.mkdtemp(prefix="overnight-pg-disk-"))
    options = f"size=64m,mode=0700,uid={account.pw_uid},gid={account.pw_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], check=True)
    name = f"t_{uuid.uuid4().hex[:16]}"
    try:
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            admin.execute(f"CREATE TABLESPACE \"{name}\" LOCATION '{mount_point}'")
            admin.execute(f'CREATE DATABASE "{name}" TABLESPACE "{name}"')
        try:
            yield postgres_server.url(name), SmallDisk(mount_point)
        finally:
            with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                # Best effort: a tablespace left behind only names an unmounted directory
                # of the session's throwaway server.
                with contextlib.suppress(psycopg.Error):
                    admin.execute(f'DROP TABLESPACE IF EXISTS "{name}"')
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        with contextlib.suppress(OSError):
            mount_point.rmdir()


def test_a_commit_on_a_full_disk_changes_nothing_and_commits_once_there_is_room(
    database_on_small_disk: tuple[str, SmallDisk], model_bytes: bytes, caplog
) -> None:
    url, disk = database_on_small_disk
    clock = FakeClock()
    store = PostgresStore(url, sole_coordinator=True)
    try:
        coordinator = make_coordinator(store, clock)
        coordinator.register_task(task_config(target_reports=2, over_selection=1.0), model_bytes)
        commit_on_a_full_disk_is_retried(
            coordinator, store, clock, disk, caplog, "No space left on device"
        )
    finally:
        store.close()


def test_replicas_on_a_full_disk_commit_nothing_and_then_count_every_upload_once(
    database_on_small_disk: tuple[str, SmallDisk], model_bytes: bytes, caplog
) -> None:
    url, disk = database_on_small_disk
    cluster = Cluster(url, FakeClock(), 3)
    try:
        _registered(cluster, model_bytes, target_reports=4, over_selection=1.0)
        size = cluster.replicas[0].task("t1").record.num_parameters
        deltas = _deltas(4, size)
        assignments = [check_in(cluster.replicas[i % 3], f"d{i}").assignment for i in range(4)]
        # Uploads on the replicas that did not select the devices: partials must be merged.
        for i, (assignment, delta) in enumerate(zip(assignments, deltas, strict=True)):
            _upload(cluster.replicas[(i + 1) % 3], assignment, delta)

        with disk.filled(), caplog.at_level(logging.ERROR):
            cluster.tick()

        assert "No space left on device" in caplog.text, caplog.text
        assert [r for r in _records(cluster) if r.state is RoundState.COMMITTED] == []

        cluster.wait(60, cluster.replicas)  # past every retry backoff; the disk has room

        (record,) = [r for r in _records(cluster) if r.state is RoundState.COMMITTED]
        assert (record.selected, record.reported, record.dropped) == (4, 4, 0)
        weights = np.frombuffer(cluster.stores[0].get_resource(record.weights_sha256) or b"", "<f4")
        initial = np.frombuffer(
            cluster.stores[0].get_resource(
                cluster.replicas[0].task("t1").record.initial_weights_sha256
            )
            or b"",
            "<f4",
        )
        np.testing.assert_allclose(weights - initial, np.mean(deltas, axis=0), atol=1e-6)
    finally:
        cluster.close()
