"""`overnight backup`: a consistent copy of a coordinator's store, taken while it runs.

It uses SQLite's online backup API (`sqlite3.Connection.backup`) on a read-only connection:
the copy is the store as of one read transaction, and in WAL mode a reader neither waits for
nor blocks the coordinator's writers. It does not take the data directory's lock
(server/data_dir.py): that lock says who writes, and a backup only reads.

The copy is a single self-contained SQLite file (rollback journal, no -wal beside it),
private (0600), checked with `PRAGMA quick_check`, and written under a temporary name then
renamed, so a backup interrupted half-way never leaves a file that looks complete.

`--to DIR/` (an existing directory, or a path ending in /) writes a data directory that
`overnight serve --data-dir DIR` resumes from: the store and the admin tokens' hashes. Any
other `--to` path is the store file alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import pathlib
import shutil
import sqlite3
import sys
import tempfile

from server.data_dir import lock_file_name, store_file_name
from server.operator_access import TOKENS_FILE
from server.private_files import file_mode, prepare_data_dir


class BackupError(Exception):
    """The backup cannot be made; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Backup:
    store: pathlib.Path  # the copy of coordinator.sqlite
    size_bytes: int
    copied: tuple[pathlib.Path, ...]  # other files of the data directory copied beside it


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    backup = subparsers.add_parser(
        "backup",
        help="copy a coordinator's store while it runs (SQLite online backup)",
        description=(
            "Copies DATA_DIR/coordinator.sqlite with SQLite's online backup API: safe while "
            "`overnight serve` runs on DATA_DIR (it reads, takes no lock and blocks no write). "
            "--to DIR/ (an existing directory or a path ending in /) writes a data directory "
            "to restore from: `overnight serve --data-dir DIR` resumes every task from its "
            "last committed round. Any other --to path is the store file alone."
        ),
    )
    backup.add_argument("--data-dir", required=True, help="the coordinator's data directory")
    backup.add_argument("--to", required=True, metavar="FILE_OR_DIR", help="where to write")
    backup.set_defaults(func=run_backup)


def run_backup(args: argparse.Namespace) -> int:
    try:
        made = back_up(args.data_dir, args.to)
    except BackupError as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return 2
    print(f"backed up {made.size_bytes / (1 << 20):.1f} MiB to {made.store}", flush=True)
    for path in made.copied:
        print(f"copied {path}", flush=True)
    return 0


def back_up(data_dir: str | pathlib.Path, to: str | pathlib.Path) -> Backup:
    """Copies the store of `data_dir` to `to` (see the module's docstring)."""
    source = pathlib.Path(data_dir) / store_file_name
    if not source.is_file():
        raise BackupError(f"no store at {source}; is {data_dir} a coordinator's data directory?")
    as_directory = str(to).endswith(os.sep) or pathlib.Path(to).is_dir()
    if as_directory:
        target_dir = prepare_data_dir(to)
        target = target_dir / store_file_name
        if (target_dir / lock_file_name).exists() and _locked(target_dir):
            raise BackupError(f"{target_dir} is the data directory of a running coordinator")
    else:
        target = pathlib.Path(to)
        if not target.parent.is_dir():
            raise BackupError(f"directory {target.parent} does not exist")
    size = _copy_store(source, target)
    copied: list[pathlib.Path] = []
    if as_directory:
        tokens = pathlib.Path(data_dir) / TOKENS_FILE
        if tokens.is_file():  # hashes only; without them no operator token works after restore
            copied.append(_copy_private(tokens, target.parent / TOKENS_FILE))
    return Backup(target, size, tuple(copied))


def _copy_store(source: pathlib.Path, target: pathlib.Path) -> int:
    descriptor, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".partial"
    )
    os.close(descriptor)
    partial = pathlib.Path(temporary)
    try:
        os.chmod(partial, file_mode)
        try:
            # mode=ro: this process can never write the coordinator's store.
            with (
                contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src,
                contextlib.closing(sqlite3.connect(partial)) as dst,
            ):
                src.backup(dst)  # all pages in one step: one read transaction, one snapshot
                dst.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
                problem = dst.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.Error as exc:
            raise BackupError(f"cannot copy {source}: {exc}") from None
        if problem != "ok":
            raise BackupError(f"the copy of {source} fails SQLite's quick_check: {problem}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size


def _copy_private(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.chmod(partial, file_mode)
    os.replace(partial, target)
    return target


def _locked(directory: pathlib.Path) -> bool:
    """Whether a coordinator holds `directory`'s lock now (server/data_dir.py)."""
    with open(directory / lock_file_name, "rb") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return False
