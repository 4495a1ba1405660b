"""Per-writer client data from files a user already has: TFF's federated EMNIST and LEAF FEMNIST.

Nothing is downloaded. Phone i gets writer i modulo the number of writers, in a fixed order,
so a fleet larger than the data set reuses writers.

- TFF (`tff.simulation.datasets.emnist`) ships HDF5 files laid out as
  `examples/<client_id>/pixels` (n, 28, 28) float32 and `examples/<client_id>/label` (n,) int.
- LEAF FEMNIST writes JSON files `{"users": [...], "num_samples": [...],
  "user_data": {user: {"x": [[784 floats], ...], "y": [int, ...]}}}`, one or many per directory.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from device_runtime.examples import LocalExamples

IMAGE_SHAPE = (28, 28)


class FederatedFileError(ValueError):
    """A federated data file is missing, or not in the format its loader reads."""


class EmnistH5Clients:
    """TFF's federated EMNIST `.h5` file; writers are read on demand, never all at once."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self._ids: list[str] | None = None
        self._file: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_ids": self._ids, "_file": None}

    def _open(self) -> Any:
        if self._file is None:
            import h5py

            if not self.path.is_file():
                raise FederatedFileError(f"{self.path}: no such EMNIST .h5 file")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise FederatedFileError(f"{self.path}: not an HDF5 file ({exc})") from exc
            if "examples" not in self._file:
                raise FederatedFileError(
                    f"{self.path}: no 'examples' group; TFF's EMNIST files hold "
                    "examples/<client_id>/{pixels,label}"
                )
            self._ids = sorted(self._file["examples"].keys())
            if not self._ids:
                raise FederatedFileError(f"{self.path}: the 'examples' group holds no writers")
        return self._file

    def client_ids(self) -> list[str]:
        self._open()
        assert self._ids is not None
        return list(self._ids)

    def client(self, index: int) -> LocalExamples:
        ids = self.client_ids()
        writer = ids[index % len(ids)]
        group = self._open()["examples"][writer]
        missing = {"pixels", "label"} - set(group.keys())
        if missing:
            raise FederatedFileError(f"{self.path}: writer {writer!r} lacks {sorted(missing)}")
        pixels = np.asarray(group["pixels"][()], dtype=np.float32)
        labels = np.asarray(group["label"][()]).astype(np.int32)
        return _checked(pixels, labels, f"{self.path}: writer {writer!r}")


class FemnistJsonClients:
    """LEAF FEMNIST JSON, a file or a directory of `*.json`; keeps one file in memory at a time.

    Phones built in index order read each file once, whatever the number of files.
    """

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.json"))
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise FederatedFileError(f"{self.path}: no such LEAF JSON file or directory")
        if not self.files:
            raise FederatedFileError(f"{self.path}: no *.json files")
        self._loaded: tuple[int, dict[str, Any]] | None = None
        self._writers: list[tuple[int, str]] = []
        for number in range(len(self.files)):
            self._writers += [(number, user) for user in self._read(number)["users"]]
        if not self._writers:
            raise FederatedFileError(f"{self.path}: the LEAF files list no users")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    def _read(self, number: int) -> dict[str, Any]:
        if self._loaded is not None and self._loaded[0] == number:
            return self._loaded[1]
        file = self.files[number]
        try:
            content = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FederatedFileError(f"{file}: not valid JSON ({exc})") from exc
        if not isinstance(content, dict) or not {"users", "user_data"} <= set(content):
            raise FederatedFileError(
                f"{file}: a LEAF file needs 'users' and 'user_data' (and 'num_samples')"
            )
        self._loaded = (number, content)
        return content

    @property
    def num_writers(self) -> int:
        return len(self._writers)

    def client(self, index: int) -> LocalExamples:
        number, user = self._writers[index % len(self._writers)]
        content = self._read(number)
        where = f"{self.files[number]}: user {user!r}"
        record = content["user_data"].get(user)
        if not isinstance(record, dict) or not {"x", "y"} <= set(record):
            raise FederatedFileError(f"{where} has no user_data entry with 'x' and 'y'")
        x = np.asarray(record["x"], dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != IMAGE_SHAPE[0] * IMAGE_SHAPE[1]:
            raise FederatedFileError(f"{where}: x must be rows of 784 pixels, got {x.shape}")
        y = np.asarray(record["y"]).astype(np.int32)
        counts = dict(zip(content["users"], content.get("num_samples", []), strict=False))
        if user in counts and counts[user] != len(y):
            raise FederatedFileError(f"{where}: num_samples says {counts[user]}, y has {len(y)}")
        return _checked(x.reshape(-1, *IMAGE_SHAPE), y, where)


def _checked(x: np.ndarray, y: np.ndarray, where: str) -> LocalExamples:
    if x.shape[1:] != IMAGE_SHAPE:
        raise FederatedFileError(f"{where}: images must be 28x28, got {x.shape[1:]}")
    if len(x) != len(y):
        raise FederatedFileError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise FederatedFileError(f"{where}: no examples")
    return LocalExamples(x, y)
