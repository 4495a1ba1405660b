"""A device's local examples. They never leave the device; only updates do."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class LocalExamples:
    x: np.ndarray  # float32, [n, *input_shape]
    y: np.ndarray  # int32, [n]

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> LocalExamples:
        """Reads an `.npz` file with arrays `x` (inputs) and `y` (integer labels)."""
        try:
            with np.load(path) as data:
                return cls(x=data["x"].astype(np.float32), y=data["y"].astype(np.int32))
        except KeyError as exc:
            raise ValueError(f"{path}: an examples file needs arrays 'x' and 'y' ({exc})") from exc

    def save(self, path: str | pathlib.Path) -> None:
        np.savez(path, x=self.x, y=self.y)

    def sample(self, max_examples: int, rng: np.random.Generator) -> LocalExamples:
        if max_examples <= 0 or max_examples >= len(self):
            return self
        index = rng.choice(len(self), size=max_examples, replace=False)
        return LocalExamples(self.x[index], self.y[index])
