"""Enrollment rate limits on replicas: one bucket per network and per credential in
PostgreSQL, drawn on by every replica (server/shared_rate_limits.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.device_identity import DeviceIdentities
from server.enrollment.config import EnrollmentPolicy
from server.errors import ResourceExhausted
from server.flood_limits import NetworkSettings, RateLimit
from server.postgres_store import PostgresStore
from server.shared_rate_limits import SharedRateLimiter, shared_enrollment_limits
from tests.fakes import FakeClock
from tests.identities import ENROLLMENT_SECRET, device_key, enroll_request

PEER = "ipv4:203.0.113.7:5000"  # one /24 network
NETWORKS = NetworkSettings(enroll_per_network=RateLimit(per_s=1 / 360, burst=4))


@pytest.fixture
def stores(postgres_url: str) -> Iterator[list[PostgresStore]]:
    opened = [PostgresStore(postgres_url) for _ in range(2)]
    yield opened
    for store in opened:
        store.close()


def _replica(store: PostgresStore, clock: FakeClock, shared: bool) -> DeviceIdentities:
    return DeviceIdentities(
        store,
        clock,
        EnrollmentPolicy.shared_secret(ENROLLMENT_SECRET),
        networks=NETWORKS,
        shared_limits=shared_enrollment_limits(store, NETWORKS) if shared else None,
    )


def _enroll(identities: DeviceIdentities, name: str) -> None:
    identities.enroll(enroll_request(device_key(name)), PEER)


def test_replicas_draw_on_one_bucket_per_network(stores: list[PostgresStore]) -> None:
    clock = FakeClock()
    a, b = (_replica(store, clock, shared=True) for store in stores)
    for i in range(4):  # the burst, spread over both replicas
        _enroll((a, b)[i % 2], f"d{i}")

    with pytest.raises(ResourceExhausted, match="203.0.113.0/24"):
        _enroll(b, "d4")
    clock.advance(360.0)  # one token back
    _enroll(b, "d4")
    with pytest.raises(ResourceExhausted):
        _enroll(a, "d5")


def test_buckets_in_each_replicas_memory_would_let_a_network_enroll_twice_as_fast(
    stores: list[PostgresStore],
) -> None:
    # What the shared buckets prevent: the same enrollments with the default, per-process
    # buckets all pass.
    clock = FakeClock()
    a, b = (_replica(store, clock, shared=False) for store in stores)
    for i in range(8):
        _enroll((a, b)[i % 2], f"d{i}")


def test_a_bucket_full_again_is_deleted(stores: list[PostgresStore]) -> None:
    limiter = SharedRateLimiter(stores[0], "test", RateLimit(per_s=1.0, burst=2))
    limiter.prune_every = 1
    assert limiter.try_take("old", now=0.0)

    assert limiter.try_take("new", now=10.0)  # "old" has been full since t=1

    with stores[0].relaxed_transaction() as conn:
        keys = conn.execute("SELECT key FROM rate_buckets WHERE scope = 'test'").fetchall()
    assert keys == [("new",)]
