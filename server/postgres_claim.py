"""One coordinator per PostgreSQL database, or replicas only: the counterpart of the data
directory's lock for the PostgreSQL store. A sole coordinator holds the lock exclusively;
replicas (`serve --replica`, server/replica_coordinator.py) hold it shared, and decide who
drives each task by lease (server/task_leadership.py).

The claim is a session advisory lock held on a connection of its own for as long as the
coordinator runs; a second coordinator on the database is refused at start (after waiting
`claim_wait_s` for it), naming the first (its application name: pid and host). PostgreSQL
drops the lock when that connection ends, so a coordinator killed with `kill -9` frees the
database within moments (the kernel closes its socket); one cut off by a network partition
frees it when the server notices the dead connection (TCP keepalive). Before each commit the
store checks that the claim still holds: after a database restart it is taken again if no one
else took it meanwhile, and otherwise the commit fails as StoreUnavailable (another
coordinator now owns the database).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg

from server.errors import StoreUnavailable

lock_key = 0x6F7665726E696702  # "overnig" + 2 (the schema upgrade lock is + 1)
# A coordinator restarted at once after its predecessor was killed may find the claim still
# held for a moment, until PostgreSQL sees the old connection closed; it waits this long.
claim_wait_s = 5.0


class DatabaseClaim:
    def __init__(self, conninfo: str, where: str, shared: bool = False) -> None:
        """Takes the claim, or raises StoreUnavailable naming its holder (psycopg.Error if
        the database cannot be reached). `shared`: a replica's claim (`serve --replica`),
        which other replicas share and a sole coordinator's excludes, both ways."""
        self._conninfo = conninfo
        self._where = where
        self._shared = shared
        # Commits of several tasks may check at once (each in its worker thread); one of them
        # takes a lost claim back, the others then find it held.
        self._checking = threading.Lock()
        self._connection = self._take()

    def _take(self) -> psycopg.Connection:
        connection = psycopg.connect(self._conninfo, autocommit=True)
        connection.execute(f"SET lock_timeout = {round(claim_wait_s * 1000)}")
        try:
            lock = "pg_advisory_lock_shared" if self._shared else "pg_advisory_lock"
            connection.execute(f"SELECT {lock}(%s)", (lock_key,))
            return connection
        except psycopg.errors.LockNotAvailable:
            pass
        holder = connection.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.classid::bigint = %s AND l.objid::bigint = %s",
            (lock_key >> 32, lock_key & 0xFFFFFFFF),
        ).fetchone()
        connection.close()
        holder_name = holder[0] if holder and holder[0] else "unknown"
        if self._shared:
            raise StoreUnavailable(
                f"the {self._where} is in use by a coordinator that is not a replica "
                f"({holder_name}); stop it, or start every coordinator on it with --replica"
            )
        raise StoreUnavailable(
            f"the {self._where} is in use by another coordinator ({holder_name}); stop that "
            "one first, or give this one another database (several coordinators share one "
            "database only as replicas: serve --replica)"
        )

    def hold(self, on_lost: Callable[[], None]) -> None:
        """Returns if the claim still holds, or was taken again; raises StoreUnavailable if
        another coordinator has it now. `on_lost` runs when the claim's connection was found
        dead (what ended it likely ended the store's pooled connections too)."""
        with self._checking:
            try:
                self._connection.execute("SELECT 1")
                return
            except psycopg.Error:
                self._connection.close()
            on_lost()
            try:
                self._connection = self._take()
            except psycopg.Error as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StoreUnavailable(f"lost the claim on the {self._where}: {reason}") from None

    def release(self) -> None:
        """Frees the database for the next coordinator."""
        self._connection.close()
