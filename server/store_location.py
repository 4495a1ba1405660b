"""Which store `overnight serve` keeps its state in: the SQLite file in its data directory
(the embedded default), or the PostgreSQL database `--store` names."""

from __future__ import annotations

import pathlib

from server.sqlite_store import SqliteStore
from server.store import Store

postgres_schemes = ("postgresql://", "postgres://")


def is_postgres(location: str | None) -> bool:
    return location is not None and location.startswith(postgres_schemes)


def check_location(location: str | None) -> None:
    """Raises ValueError, naming what is accepted, for a --store that names no store."""
    if location is not None and not is_postgres(location):
        raise ValueError(
            "--store takes a PostgreSQL URL, postgresql://USER@HOST:PORT/DATABASE (keep the "
            "password out of it: libpq reads PGPASSWORD or ~/.pgpass); without --store the "
            "state is in DATA_DIR/coordinator.sqlite"
        )


def open_store(location: str | None, data_dir: pathlib.Path, replica: bool = False) -> Store:
    """The store for a coordinator that serves: one coordinator per store (the data
    directory's lock for SQLite, the database's advisory lock for PostgreSQL), or replicas
    only on a PostgreSQL database."""
    check_location(location)
    if location is None:
        if replica:
            raise ValueError(
                "--replica needs --store postgresql://...: replicas share their state in a "
                "PostgreSQL database; a SQLite data directory has one coordinator"
            )
        return SqliteStore.in_data_dir(data_dir)
    from server.postgres_store import PostgresStore  # psycopg loads only when asked for

    return PostgresStore(location, sole_coordinator=not replica, replica=replica)
