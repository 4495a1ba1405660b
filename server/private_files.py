"""Files at rest in the data directory: private to the user that runs the coordinator.

The directory is 0700 and everything in it 0600 (subdirectories 0700): the store holds device
ids, upload-token hashes and every model, and the directory may hold an operator token. A
directory or file left by an older version with wider modes is tightened when opened.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

directory_mode = 0o700
file_mode = 0o600


def prepare_data_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Creates the directory (and missing parents) if needed; either way it ends up 0700."""
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True, mode=directory_mode)
    os.chmod(directory, directory_mode)
    return directory


def ensure_private_file(path: str | pathlib.Path) -> pathlib.Path:
    """Creates an empty 0600 file if none exists, else tightens the existing one to 0600.

    SQLite creates its -wal and -shm files with the database file's mode, so creating the
    database this way first keeps all three private."""
    path = pathlib.Path(path)
    descriptor = os.open(path, os.O_CREAT | os.O_WRONLY, file_mode)
    os.close(descriptor)
    os.chmod(path, file_mode)
    return path


def write_private_file(path: str | pathlib.Path, data: bytes) -> pathlib.Path:
    """Writes `data` to a 0600 file, atomically: a reader sees the old content or the new,
    and the content is never readable by others, not even while it is being written."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, file_mode)
    try:
        os.fchmod(descriptor, file_mode)  # an old temporary file may have had wider modes
        with os.fdopen(descriptor, "wb") as out:
            descriptor = -1
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    finally:
        if descriptor >= 0:
            os.close(descriptor)
    os.replace(temporary, path)
    return path


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files and directories created inside are 0600/0700, whoever creates them (for writers
    whose open() we do not control, e.g. TensorBoard's event files). The umask is per
    process: keep the block short; a file another thread creates meanwhile only ends up
    more private than it would have been."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
