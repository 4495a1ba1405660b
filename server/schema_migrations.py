"""Versioned schema of the coordinator's store, shared by every store implementation.

Each store keeps a `schema_version` table with one row per migration applied to it (its
version and when). On opening, a store reads the highest version, then:
- applies the migrations after it, in order, in one transaction (the store is upgraded, or
  left exactly as it was if any step fails);
- refuses a store whose version is newer than this code knows (written by a newer
  overnight): an older coordinator must not guess at columns it has never seen.

Every implementation lists the same versions, each written in its own SQL dialect
(tests/server/test_store_migrations.py checks that the lists match). A migration is never
edited once released; a change to the schema is a new migration at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    why: str  # one line for the log and for `schema_version` readers
    statements: tuple[str, ...]


# Version 4 adds tables on PostgreSQL only (several replicas on one database,
# server/replica_ledger.py); SQLite records the version and adds nothing.
REPLICAS_WHY = "replicas: heartbeats, shared rounds and assignments, partial aggregates"
# Version 5, PostgreSQL only as well: where replicas reach each other and which replica hosts
# each secure round (server/secure_routes.py).
SECURE_ROUTES_WHY = "replicas: addresses, secure sessions by task, the forwarding secret"
# Version 6, PostgreSQL only: the nonces of assigned check-ins, until they are too old to
# replay, so a signed check-in replayed to another replica is never assigned twice.
CHECK_IN_NONCES_WHY = "replicas: a check-in's nonce is assigned once in the cluster"
# Version 7, PostgreSQL only: enrollment rate limits in one bucket per network and credential
# for all replicas (server/shared_rate_limits.py).
RATE_BUCKETS_WHY = "replicas: enrollment rate limits shared by every replica"


class IncompatibleStore(Exception):
    """The store cannot be used by this version of the coordinator; the message says why
    and what to do."""


def pending_migrations(
    found_version: int, migrations: Sequence[Migration], store_name: str
) -> list[Migration]:
    """The migrations that bring a store at `found_version` (0: empty) to the newest one.

    Raises IncompatibleStore if the store is newer than `migrations` know."""
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise AssertionError(f"migrations must be numbered 1, 2, ... without gaps: {versions}")
    newest = len(migrations)
    if found_version > newest:
        raise IncompatibleStore(
            f"{store_name} has schema version {found_version}, written by a newer overnight; "
            f"this one knows versions up to {newest}. Run the newer overnight, or restore a "
            "backup taken before it first ran"
        )
    return list(migrations[found_version:])
