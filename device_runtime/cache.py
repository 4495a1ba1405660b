"""Content-addressed cache of downloaded resources (models, weights)."""

from __future__ import annotations

import hashlib
import os
import pathlib


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ResourceCache:
    """Keeps resources by SHA-256 in memory and, given a directory, on disk across restarts.

    A corrupted file on disk (hash mismatch) is treated as absent and removed.
    """

    def __init__(self, directory: str | pathlib.Path | None = None, max_memory_entries: int = 4):
        self._directory = pathlib.Path(directory) if directory else None
        if self._directory:
            self._directory.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, bytes] = {}
        self._max_memory_entries = max_memory_entries
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> bytes | None:
        data = self._memory.get(digest)
        if data is None and self._directory:
            path = self._directory / digest
            if path.exists():
                data = path.read_bytes()
                if sha256_hex(data) != digest:
                    path.unlink(missing_ok=True)
                    data = None
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        self._remember(digest, data)
        return data

    def put(self, digest: str, data: bytes) -> None:
        if sha256_hex(data) != digest:
            raise ValueError(f"resource does not match its hash {digest}")
        self._remember(digest, data)
        if self._directory:
            tmp = self._directory / f".{digest}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self._directory / digest)

    def _remember(self, digest: str, data: bytes) -> None:
        self._memory.pop(digest, None)
        self._memory[digest] = data
        while len(self._memory) > self._max_memory_entries:
            self._memory.pop(next(iter(self._memory)))
