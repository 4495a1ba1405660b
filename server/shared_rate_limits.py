"""Token buckets kept in PostgreSQL, so that every replica draws on the same bucket.

Enrollment is rate-limited per source network and per credential (server/flood_limits.py).
With buckets in each replica's memory, N replicas would let a network enroll N times as
fast. Here a bucket is one row, refilled and drawn from in one statement, so concurrent
replicas take tokens one at a time. Enrollment is rare next to check-ins; one small write
per new identity is its price.

A bucket untouched for long enough to be full again is the same as no bucket: such rows are
deleted every `prune_every` draws, so the table holds only the networks and credentials
that enrolled lately.
"""

from __future__ import annotations

from server.device_identity import SharedLimits
from server.flood_limits import NetworkSettings, RateLimit
from server.postgres_store import PostgresStore


class SharedRateLimiter:
    prune_every = 256  # draws between deletions of full buckets

    def __init__(self, store: PostgresStore, scope: str, limit: RateLimit) -> None:
        if not limit.per_s > 0 or not limit.burst >= 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")
        self._store = store
        self._scope = scope
        self._limit = limit
        self._draws = 0

    def __len__(self) -> int:
        return 0  # nothing per key in this process's memory

    def try_take(self, key: str, now: float) -> bool:
        """Takes a token from `key`'s bucket if it has one. Raises StoreUnavailable."""
        per_s, burst = self._limit.per_s, self._limit.burst
        self._draws += 1
        with self._store.relaxed_transaction() as conn:
            if self._draws % self.prune_every == 0:
                conn.execute(
                    "DELETE FROM rate_buckets WHERE scope = %s AND updated_at < %s",
                    (self._scope, now - burst / per_s),
                )
            # A new bucket starts full; an existing one refills for the time since its last
            # draw. The update happens only if a whole token is there to take.
            taken = conn.execute(
                "INSERT INTO rate_buckets AS b (scope, key, tokens, updated_at) "
                "VALUES (%(scope)s, %(key)s, %(burst)s - 1, %(now)s) "
                "ON CONFLICT (scope, key) DO UPDATE SET "
                "tokens = LEAST(%(burst)s, b.tokens + (%(now)s - b.updated_at) * %(per_s)s) - 1, "
                "updated_at = %(now)s "
                "WHERE LEAST(%(burst)s, b.tokens + (%(now)s - b.updated_at) * %(per_s)s) >= 1 "
                "RETURNING tokens",
                {"scope": self._scope, "key": key, "burst": burst, "now": now, "per_s": per_s},
            ).fetchone()
        return taken is not None


def shared_enrollment_limits(store: PostgresStore, networks: NetworkSettings) -> SharedLimits:
    """The enrollment buckets (per network, per credential) every replica draws on."""
    return (
        SharedRateLimiter(store, "enroll_per_network", networks.enroll_per_network),
        SharedRateLimiter(store, "enroll_per_credential", networks.enroll_per_credential),
    )
