"""A real, small disk for fault tests: a tmpfs mounted in the test's directory.

`SmallDisk.filled()` writes a filler file until the disk has no byte left (ENOSPC) and frees
it on exit, so whatever writes inside sees a genuinely full disk. Mounting needs root (these
machines and CI run as root); elsewhere the fixture skips and says why.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
from collections.abc import Iterator

import pytest


class SmallDisk:
    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def filled(self) -> Iterator[None]:
        filler = self.path / ".filler"
        block = b"\0" * (64 << 10)
        with open(filler, "wb", buffering=0) as out:
            with contextlib.suppress(OSError):
                while True:
                    out.write(block)
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0")
        try:
            yield
        finally:
            filler.unlink()


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[SmallDisk]:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a size-limited tmpfs needs root to mount; run the suite as root")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mount_point)],
        check=True,
    )
    try:
        yield SmallDisk(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
