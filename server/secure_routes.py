"""Where a replica sends a device's calls for a secure task: to the replica that hosts the
task's secure rounds, its leader (docs/scaling.md, "Secure aggregation on replicas").

A secure round's protocol state (keys, shares, the masked sum) lives in its host's memory
only. PostgreSQL keeps what every replica must agree on to route a call there, written once
per replica run or per round, never per message:
- each replica's address for other replicas (the `replicas` row, `serve --replica-address`);
- who leads each task (its lease);
- each secure round's session id and task (`secure_sessions`), so a SecAgg message, which
  names only its session, finds its host;
- the cluster's forwarding secret (`cluster_secrets`), with which a forwarding replica
  authenticates what it asserts about the device (its network address) to the host.
"""

from __future__ import annotations

import collections
import secrets

from server.postgres_store import PostgresStore

# Rows of ended sessions kept per task: devices that poll late still reach the host, which
# keeps the last few finished sessions (server/secagg/round_bridge.py) to answer them.
sessions_kept_per_task = 16
# Session ids whose task is known, remembered per replica (a session's task never changes).
known_sessions_cached = 4096
forwarding_secret_name = "forwarding"


class SecureRoutes:
    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._session_tasks: collections.OrderedDict[bytes, str] = collections.OrderedDict()

    def forwarding_secret(self) -> bytes:
        """The cluster's forwarding secret: made by the first replica that asks, the same for
        every replica after. Raises StoreUnavailable."""
        with self._store.durable_transaction() as conn:
            conn.execute(
                "INSERT INTO cluster_secrets VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (forwarding_secret_name, secrets.token_bytes(32)),
            )
            row = conn.execute(
                "SELECT secret FROM cluster_secrets WHERE name = %s", (forwarding_secret_name,)
            ).fetchone()
        assert row is not None
        return bytes(row[0])

    def publish_session(self, session_id: bytes, task_id: str, round_number: int) -> None:
        """Records a secure round's session before any device hears of it; forgets the
        task's sessions too old for any device to still ask about. Raises StoreUnavailable."""
        with self._store.relaxed_transaction() as conn:
            conn.execute(
                "INSERT INTO secure_sessions VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (session_id, task_id, round_number),
            )
            conn.execute(
                "DELETE FROM secure_sessions WHERE task_id = %s AND round_number < %s",
                (task_id, round_number - sessions_kept_per_task),
            )

    def session_task(self, session_id: bytes) -> str | None:
        """The task whose round the session belongs to; None for a session no replica
        published. Raises StoreUnavailable."""
        task_id = self._session_tasks.get(session_id)
        if task_id is not None:
            self._session_tasks.move_to_end(session_id)
            return task_id
        with self._store.relaxed_transaction() as conn:
            row = conn.execute(
                "SELECT task_id FROM secure_sessions WHERE session_id = %s", (session_id,)
            ).fetchone()
        if row is None:
            return None  # not cached: it may be published a moment later
        self._session_tasks[session_id] = str(row[0])
        while len(self._session_tasks) > known_sessions_cached:
            self._session_tasks.popitem(last=False)
        return str(row[0])

    def leader_addresses(self, now: float) -> dict[str, str]:
        """Each task whose lease is live at `now`, with the address of the replica that holds
        it (tasks whose leader publishes no address are left out). Raises StoreUnavailable."""
        with self._store.relaxed_transaction() as conn:
            rows = conn.execute(
                # A holder is a replica's NAME#RUN (server/replica_coordinator.py).
                "SELECT l.task_id, r.address FROM task_leases l JOIN replicas r "
                "ON r.name = regexp_replace(l.holder, '#[^#]*$', '') "
                "WHERE l.expires_at > %s AND r.address <> ''",
                (now,),
            ).fetchall()
        return {str(task_id): str(address) for task_id, address in rows}
