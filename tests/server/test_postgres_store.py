"""The PostgreSQL store beyond the shared contract: one coordinator per database, failures of
the database as StoreUnavailable, a lease takeover that waits for a commit under way, and a
coordinator that runs and resumes on it."""

from __future__ import annotations

import concurrent.futures
import hashlib
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest

from device_runtime import constants
from protos import common_pb2, device_pb2
from server.errors import StoreUnavailable
from server.leases import Lease
from server.postgres_claim import lock_key
from server.postgres_store import PostgresStore
from server.store import RoundRecord, RoundState
from tests.fakes import FakeClock
from tests.harness import task_config
from tests.identities import check_in, make_coordinator, sign_header


def _committed(round_number: int, weights: bytes) -> RoundRecord:
    digest = hashlib.sha256(weights).hexdigest()
    return RoundRecord("t1", round_number, RoundState.COMMITTED, 2, 2, 0, {}, 1.0, 2.0, digest)


def _terminate_backends(url: str, application_name_like: str) -> int:
    """Ends the server side of matching connections, as a database restart would."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name LIKE %s",
            (application_name_like,),
        ).fetchall()
    return len(rows)


def _wait_until_unclaimed(url: str) -> None:
    """Until no session holds the coordinator lock (its backend exits after the client)."""
    deadline = time.monotonic() + 60
    with psycopg.connect(url, autocommit=True) as admin:
        while admin.execute(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid::bigint = %s",
            (lock_key & 0xFFFFFFFF,),
        ).fetchone():
            assert time.monotonic() < deadline, "the lock outlived its process"
            time.sleep(0.05)


def test_a_second_coordinator_on_the_database_is_refused_by_name(postgres_url: str) -> None:
    first = PostgresStore(postgres_url, sole_coordinator=True)

    with pytest.raises(StoreUnavailable, match=r"in use by another coordinator \(overnight"):
        PostgresStore(postgres_url, sole_coordinator=True)

    first.close()
    PostgresStore(postgres_url, sole_coordinator=True).close()


def test_the_claim_dies_with_its_process(postgres_url: str) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from server.postgres_store import PostgresStore; "
            f"store = PostgresStore({postgres_url!r}, sole_coordinator=True); "
            "print('claimed', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "claimed\n"
    with pytest.raises(StoreUnavailable, match=f"pid {holder.pid}"):
        PostgresStore(postgres_url, sole_coordinator=True)

    holder.kill()
    holder.wait()
    _wait_until_unclaimed(postgres_url)

    PostgresStore(postgres_url, sole_coordinator=True).close()


def test_an_unreachable_database_is_unavailable_without_its_password() -> None:
    url = "postgresql://overnight:hunter2-secret@/coordinator?host=/nonexistent&port=5999"

    with pytest.raises(StoreUnavailable) as refused:
        PostgresStore(url)

    message = str(refused.value)
    assert "database coordinator on /nonexistent:5999" in message
    assert "hunter2" not in message


def test_a_lost_connection_fails_one_call_and_the_next_one_reconnects(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    store.put_resource("model", b"before")
    assert _terminate_backends(postgres_url, "overnight coordinator%") >= 1

    with pytest.raises(StoreUnavailable, match="the coordinator's store"):
        store.put_resource("model", b"during")
    stored = store.put_resource("model", b"after")

    assert store.get_resource(stored) == b"after"
    assert store.get_resource(hashlib.sha256(b"before").hexdigest()) == b"before"
    store.close()


def test_a_commit_needs_the_claim_and_takes_it_back_if_it_is_free(postgres_url: str) -> None:
    store = PostgresStore(postgres_url, sole_coordinator=True)
    store.put_resource("model", b"m")  # a pooled connection, apart from the claim's
    _terminate_backends(postgres_url, "overnight coordinator%")  # a restart ends every session
    _wait_until_unclaimed(postgres_url)

    store.commit_round(_committed(1, b"w1"), b"w1", ["tok-1"])

    assert store.is_counted("tok-1")
    with pytest.raises(StoreUnavailable, match="in use by another coordinator"):
        PostgresStore(postgres_url, sole_coordinator=True)
    store.close()


def test_a_commit_is_refused_once_another_coordinator_took_the_database(
    postgres_url: str,
) -> None:
    store = PostgresStore(postgres_url, sole_coordinator=True)
    _terminate_backends(postgres_url, "overnight coordinator%")
    _wait_until_unclaimed(postgres_url)
    usurper = PostgresStore(postgres_url, sole_coordinator=True)

    with pytest.raises(StoreUnavailable, match="in use by another coordinator"):
        store.commit_round(_committed(1, b"w1"), b"w1", ["tok-1"])

    assert usurper.rounds("t1") == [] and not usurper.is_counted("tok-1")
    store.close()
    usurper.close()


def test_a_large_model_round_trips_byte_for_byte(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    weights = np.random.default_rng(0).normal(size=1_663_370).astype("<f4").tobytes()

    store.commit_round(_committed(1, weights), weights, [], server_state=weights[:1000])

    assert store.get_resource(hashlib.sha256(weights).hexdigest()) == weights
    assert store.server_state("t1") == weights[:1000]
    store.close()


def test_a_coordinator_commits_on_postgresql_and_a_restart_resumes_after_it(
    postgres_url: str, model_bytes: bytes
) -> None:
    clock = FakeClock()
    coordinator = make_coordinator(PostgresStore(postgres_url), clock)
    coordinator.register_task(task_config(target_reports=2, over_selection=1.0), model_bytes)
    n = coordinator.task("t1").record.num_parameters
    for i in range(2):
        answer = check_in(coordinator, f"d{i}")
        header = device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=answer.assignment.upload_token,
            example_count=10,
            num_elements=n,
            encoding="float32_delta",
            metrics=common_pb2.ClientMetrics(num_examples=10, num_batches=1),
        )
        sign_header(header)
        payload = np.full(n, 0.5, "<f4").tobytes()
        coordinator.accept_upload(header, payload, len(payload))
    coordinator.tick()
    committed = coordinator.task("t1").weights.copy()
    open_round = check_in(coordinator, "d9").assignment.round_number
    coordinator.store.close()

    restarted = make_coordinator(PostgresStore(postgres_url), clock)

    rounds = restarted.store.rounds("t1")
    assert [(r.round_number, r.state) for r in rounds] == [
        (1, RoundState.COMMITTED),
        (open_round, RoundState.ABANDONED),
    ]
    assert rounds[0].reported == 2
    np.testing.assert_array_equal(restarted.task("t1").weights, committed)
    restarted.store.close()


def test_a_takeover_waits_for_a_commit_under_way(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    store.acquire_lease("t1", "replica-a", now=100.0, duration_s=10.0)
    with (
        psycopg.connect(postgres_url) as commit_under_way,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        # What a fenced commit holds from its fence check to its end: a share lock on the row.
        commit_under_way.execute("SELECT epoch FROM task_leases WHERE task_id = 't1' FOR SHARE")
        takeover = pool.submit(store.acquire_lease, "t1", "replica-b", 125.0, 10.0)
        _wait_until_a_session_waits_for_a_lock(postgres_url)
        assert not takeover.done()

        commit_under_way.commit()

        assert takeover.result() == Lease("t1", "replica-b", 2, 135.0)
    store.close()


def _wait_until_a_session_waits_for_a_lock(url: str) -> None:
    deadline = time.monotonic() + 60
    with psycopg.connect(url, autocommit=True) as admin:
        while not admin.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone():
            assert time.monotonic() < deadline, "no session waits for the lease row"
            time.sleep(0.05)
