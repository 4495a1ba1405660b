"""A coordinator's data directory: owned by one process, checked before anything is served.

`DataDirectory.open` runs, in order:
1. creates the directory if it is missing, and makes it 0700 (server/private_files.py);
2. takes an exclusive lock (`coordinator.lock`, holding the owner's PID), so a second
   `overnight serve` on the same directory exits at once and changes nothing — the kernel
   drops the lock when its process dies, `kill -9` included;
3. checks that the directory is writable;
4. checks the store: `PRAGMA integrity_check` below `full_check_below_bytes`, the faster
   `PRAGMA quick_check` above. A damaged store stops the start-up with a message that says
   what to do; with `repair=True` it is rebuilt from what is readable (server/store_repair.py).

Every refusal is a DataDirError whose message is one line an operator can act on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pathlib
import sqlite3
import tempfile

from server.private_files import prepare_data_dir

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
    ) -> DataDirectory:
        directory = pathlib.Path(path)
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
            problem = store_problem(data_dir.store_path, full_check_below_bytes)
            if problem is not None and not repair:
                raise DataDirError(
                    f"{data_dir.store_path} is damaged ({problem}); restore the data directory "
                    "from a backup, or start with --repair to keep its last good committed state"
                )
            if problem is not None:
                from server.store_repair import repair_store

                log.warning("store damaged (%s); repairing", problem)
                for line in repair_store(data_dir.store_path):
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


def store_problem(path: pathlib.Path, full_check_below_bytes: int) -> str | None:
    """None if the SQLite file at `path` is missing (a new store) or sound; else the first
    problem SQLite reports."""
    if not path.exists():
        return None
    full = path.stat().st_size < full_check_below_bytes
    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            rows = db.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    problems = [row[0] for row in rows if row[0] != "ok"]
    if not problems:
        return None
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"
