"""The SecAgg+ parameters: neighbours k and threshold t from the population and threat model.

The choice follows Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead" (CCS 2020), as FCP's graph parameter finder does for its Harary-graph variant. A
task states how many devices are enrolled (n), the fraction that may drop out over the session
(delta) and the fraction that may be corrupt and collude with the server (gamma). With
D = ceil(delta * n) dropouts and C = ceil(gamma * n) corrupt devices placed at random, a
client's k neighbours are a uniformly random k-subset of the other n - 1, so the dropped or
corrupt among them follow hypergeometric laws. We take the smallest even k, and then the
smallest t, such that:

1. Correctness (failure probability <= 2^-eta, eta = 20): every client keeps at least t
   neighbours that do not drop out, so its masks can be removed or its self mask recovered:
   n * P[Hyp(n-1, D, k) > k - t] <= 2^-eta.
2. Privacy against a server that lies about who dropped out (security 2^-sigma, sigma = 40):
   each honest neighbour reveals one of a client's two secrets, corrupt neighbours reveal
   both, so the server gets both only if c + k >= 2t for the client's c corrupt neighbours:
   n * P[Hyp(n-1, C, k) >= 2t - k] <= 2^-sigma. (This also keeps c < t.)
3. No partial sums (security 2^-sigma): the graph of honest survivors must stay connected,
   or the server would learn the sum of each piece. A Harary ring loses connectivity only if
   k/2 consecutive positions are all removed (dropped or corrupt), in two places; we bound it
   by the union bound over one such run: n * P[k/2 given positions all removed] <= 2^-sigma.

When no k < n - 1 qualifies (small populations), the complete graph k = n - 1 is used, where
the same laws become the worst-case counts of Bonawitz et al.: D <= k - t and C < 2t - k.
"""

from __future__ import annotations

import dataclasses
import functools
import math

security_bits = 40  # sigma: statistical security, as FCP's parameter finder
correctness_bits = 20  # eta: the session fails with probability below 2^-20
default_dropout_rate = 0.1
default_corrupt_rate = 0.05


@dataclasses.dataclass(frozen=True)
class SecAggParameters:
    num_clients: int
    num_neighbours: int  # k
    threshold: int  # t
    max_dropouts: int  # D the parameters were chosen for
    max_corrupt: int  # C the parameters were chosen for

    @property
    def complete_graph(self) -> bool:
        return self.num_neighbours == self.num_clients - 1


def _hypergeometric_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X >= at_least] for X ~ Hypergeometric(population, marked, draws)."""
    total = math.comb(population, draws)
    upper = min(marked, draws)
    tail = sum(
        math.comb(marked, i) * math.comb(population - marked, draws - i)
        for i in range(max(at_least, 0), upper + 1)
    )
    return tail / total


def _run_removed_probability(n: int, removed: int, run: int) -> float:
    """P[`run` given ring positions are all among `removed` random ones of n]."""
    if run > removed:
        return 0.0
    p = 1.0
    for i in range(run):
        p *= (removed - i) / (n - i)
    return p


def _smallest_threshold(n: int, k: int, dropouts: int, corrupt: int) -> int | None:
    complete = k == n - 1
    for t in range(k // 2 + 1, k + 1):
        fails_privacy = n * _hypergeometric_tail(n - 1, corrupt, k, 2 * t - k)
        if fails_privacy > 2.0**-security_bits:
            continue
        fails_correctness = n * _hypergeometric_tail(n - 1, dropouts, k, k - t + 1)
        if fails_correctness > 2.0**-correctness_bits:
            return None  # larger t only fails more often
        if not complete:
            run_removed = _run_removed_probability(n, dropouts + corrupt, k // 2)
            if n * run_removed > 2.0**-security_bits:
                return None
        return t
    return None


def choose_parameters(
    num_clients: int,
    dropout_rate: float = default_dropout_rate,
    corrupt_rate: float = default_corrupt_rate,
) -> SecAggParameters:
    """Smallest k, then smallest t, meeting the three conditions above.

    Raises ValueError when even the complete graph cannot meet them (too many dropouts or
    corrupt devices for so few clients): the task must tolerate less, or enrol more devices.
    """
    if num_clients < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {num_clients}")
    if not (0 <= dropout_rate < 1 and 0 <= corrupt_rate < 1):
        raise ValueError("dropout_rate and corrupt_rate must be in [0, 1)")
    n = num_clients
    dropouts = math.ceil(dropout_rate * n)
    corrupt = math.ceil(corrupt_rate * n)
    candidates = [*range(2, n - 1, 2), n - 1]
    for k in candidates:
        t = _smallest_threshold(n, k, dropouts, corrupt)
        if t is not None:
            return SecAggParameters(n, k, t, dropouts, corrupt)
    raise ValueError(
        f"no neighbour count and threshold protect {n} clients against "
        f"{dropouts} dropouts and {corrupt} corrupt clients; lower the rates or enrol more"
    )


@functools.cache
def fewest_clients(
    dropout_rate: float = default_dropout_rate, corrupt_rate: float = default_corrupt_rate
) -> int:
    """The fewest clients any parameters protect at these rates: a secure round that selects
    fewer cannot open its session."""
    for n in range(2, 1000):
        try:
            choose_parameters(n, dropout_rate, corrupt_rate)
        except ValueError:
            continue
        return n
    raise ValueError("no client count up to 1,000 can be protected at these rates")
