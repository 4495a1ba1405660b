"""Client datasets for emulated phones: the digits shipped with scikit-learn, split non-IID.

Federated EMNIST and LEAF FEMNIST files load through `emulator.federated_files`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from device_runtime.examples import LocalExamples


@dataclasses.dataclass(frozen=True)
class FederatedDigits:
    clients: list[LocalExamples]
    test: LocalExamples  # held out for the coordinator's evaluation; no phone holds it


def load_digits() -> LocalExamples:
    """The 1,797 8x8 handwritten digits inside scikit-learn's wheel, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return LocalExamples(
        x=(digits.images / 16.0).astype(np.float32), y=digits.target.astype(np.int32)
    )


def dirichlet_label_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_examples: int = 2,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Indices per client: each class spread over clients by proportions ~ Dirichlet(alpha).

    Small alpha gives strong label skew and unequal client sizes (quantity skew); large alpha
    approaches an IID split. Redraws until every client holds at least `min_examples`.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if num_clients * min_examples > len(labels):
        raise ValueError(
            f"{len(labels)} examples cannot give {num_clients} clients {min_examples} each"
        )
    classes = np.unique(labels)
    for _ in range(max_attempts):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_examples:
            return [np.array(sorted(s), dtype=np.int64) for s in shards]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave {num_clients} clients >= {min_examples} examples "
        f"in {max_attempts} draws; raise alpha or lower the number of clients"
    )


def federated_digits(
    num_clients: int, alpha: float = 0.5, test_fraction: float = 0.2, seed: int = 0
) -> FederatedDigits:
    rng = np.random.default_rng(seed)
    digits = load_digits()
    order = rng.permutation(len(digits))
    num_test = int(round(test_fraction * len(digits)))
    test_index, train_index = order[:num_test], order[num_test:]
    train = LocalExamples(digits.x[train_index], digits.y[train_index])
    shards = dirichlet_label_split(train.y, num_clients, alpha, rng)
    clients = [LocalExamples(train.x[s], train.y[s]) for s in shards]
    return FederatedDigits(
        clients=clients, test=LocalExamples(digits.x[test_index], digits.y[test_index])
    )


class ClientDatasets(Protocol):
    """Where each emulated phone's local examples come from. Picklable: workers rebuild it."""

    def client(self, index: int) -> LocalExamples:
        """The examples of phone `index` (any index >= 0; sources wrap around their clients)."""
        ...


@dataclasses.dataclass(frozen=True)
class SampledDigits:
    """Many phones sharing the 1,797 digits: each draws its own sample, skewed two ways.

    Label skew: a phone's class proportions ~ Dirichlet(alpha). Quantity skew: its example
    count ~ LogNormal(log(mean_examples), sigma). Examples are drawn from the training part only
    (the held-out part, `test()`, is for the coordinator), independently per phone, so any
    number of phones can be built and phone i is the same whichever process builds it.
    """

    alpha: float = 0.5
    mean_examples: float = 40.0
    sigma: float = 0.8
    min_examples: int = 5
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not self.mean_examples >= 1:
            raise ValueError(f"mean_examples must be >= 1, got {self.mean_examples}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")

    def _split(self) -> tuple[LocalExamples, LocalExamples]:
        cached = _DIGITS_SPLITS.get((self.test_fraction, self.seed))
        if cached is None:
            digits = load_digits()
            order = np.random.default_rng(self.seed).permutation(len(digits))
            num_test = int(round(self.test_fraction * len(digits)))
            test, train = order[:num_test], order[num_test:]
            cached = (
                LocalExamples(digits.x[train], digits.y[train]),
                LocalExamples(digits.x[test], digits.y[test]),
            )
            _DIGITS_SPLITS[(self.test_fraction, self.seed)] = cached
        return cached

    def test(self) -> LocalExamples:
        return self._split()[1]

    def client(self, index: int) -> LocalExamples:
        train = self._split()[0]
        rng = np.random.default_rng([self.seed, index, 2])
        classes = np.unique(train.y)
        proportions = rng.dirichlet(np.full(len(classes), self.alpha))
        count = max(self.min_examples, int(rng.lognormal(np.log(self.mean_examples), self.sigma)))
        per_class = rng.multinomial(count, proportions)
        index_parts = []
        for cls, n in zip(classes, per_class, strict=True):
            if n:
                members = np.flatnonzero(train.y == cls)
                index_parts.append(rng.choice(members, size=n, replace=n > len(members)))
        chosen = np.concatenate(index_parts)
        return LocalExamples(train.x[chosen], train.y[chosen])


_DIGITS_SPLITS: dict[tuple[float, int], tuple[LocalExamples, LocalExamples]] = {}
