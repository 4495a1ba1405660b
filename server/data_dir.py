"""A coordinator's data directory: owned by one process, checked before anything is served.

`DataDirectory.open` runs, in order:
1. creates the directory if it is missing, and makes it 0700 (server/private_files.py);
2. takes an exclusive lock (`coordinator.lock`, holding the owner's PID), so a second
   `overnight serve` on the same directory exits at once and changes nothing — the kernel
   drops the lock when its process dies, `kill -9` included;
3. checks that the directory is writable;
4. checks the SQLite store: `PRAGMA integrity_check` below `full_check_below_bytes`, the
   faster `PRAGMA quick_check` above. A damaged store stops the start-up with a message that
   says what to do; with `repair=True` it is rebuilt from what is readable
   (server/store_repair.py).

With the state in PostgreSQL (`sqlite_store=False`), the directory still holds the operator
tokens and TensorBoard logs, and still has its lock; the store's own checks move to the
database: PostgreSQL replays its WAL after a crash by itself, a second coordinator on the
database is refused by an advisory lock (server/postgres_store.py), and damage is for
PostgreSQL's tools (amcheck, a backup), so `repair=True` is refused.

Every refusal is a DataDirError whose message is one line an operator can act on.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pathlib
import tempfile

from server.private_files import prepare_data_dir
from server.store_repair import UnrepairableStore, repair_store, store_problem

log = logging.getLogger(__name__)

store_file_name = "coordinator.sqlite"
lock_file_name = "coordinator.lock"
# Stores under this size get the full integrity check at start-up (about 1 s per 100 MB here).
default_full_check_below_bytes = 256 << 20


class DataDirError(Exception):
    """The data directory cannot be used; the message says why and what to do."""


class DataDirectory:
    def __init__(self, path: pathlib.Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    @property
    def store_path(self) -> pathlib.Path:
        return self.path / store_file_name

    @classmethod
    def open(
        cls,
        path: str | pathlib.Path,
        full_check_below_bytes: int = default_full_check_below_bytes,
        repair: bool = False,
        sqlite_store: bool = True,
    ) -> DataDirectory:
        directory = pathlib.Path(path)
        if repair and not sqlite_store:
            raise DataDirError(
                "--repair rebuilds a damaged SQLite store; PostgreSQL recovers from a crash by "
                "itself, and a damaged database is repaired with its own tools (amcheck, a "
                "backup): start without --repair"
            )
        try:
            prepare_data_dir(directory)
        except OSError as exc:
            if directory.is_dir():
                raise DataDirError(
                    f"data directory {directory} is not writable ({exc.strerror}); the "
                    "coordinator must write its store there"
                ) from None
            raise DataDirError(f"cannot create data directory {directory}: {exc}") from None
        data_dir = cls(directory, _lock(directory))
        try:
            _check_writable(directory)
            if not sqlite_store:
                return data_dir
            problem = store_problem(data_dir.store_path, full_check_below_bytes)
            if problem is not None and not repair:
                raise DataDirError(
                    f"{data_dir.store_path} is damaged ({problem}); restore the data directory "
                    "from a backup, or start with --repair to keep its last good committed state"
                )
            if problem is not None:
                log.warning("store damaged (%s); repairing", problem)
                try:
                    report = repair_store(data_dir.store_path)
                except UnrepairableStore as exc:
                    raise DataDirError(str(exc)) from None
                for line in report:
                    log.warning("repair: %s", line)
        except BaseException:
            data_dir.close()
            raise
        return data_dir

    def close(self) -> None:
        """Releases the lock (also released when the process dies)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _lock(directory: pathlib.Path) -> int:
    lock_path = directory / lock_file_name
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise DataDirError(f"data directory {directory} is not writable: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirError(
            f"data directory {directory} is in use by another coordinator (pid {holder}); "
            "stop that one first, or give this one another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _check_writable(directory: pathlib.Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
        store = directory / store_file_name
        for path in (store, store.with_name(store.name + "-wal")):
            if path.exists():
                with open(path, "r+b"):
                    pass
    except OSError as exc:
        raise DataDirError(
            f"data directory {directory} is not writable ({exc.strerror}: {exc.filename}); "
            "the coordinator must write its store there"
        ) from None
