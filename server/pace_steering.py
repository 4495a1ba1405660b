"""Pace steering: retry windows that bring devices back as fast as the coordinator can serve.

Each device that leaves (rejected, or done with an assignment) is told a window
[start, start + spread] to come back in. The start is when the task is next expected to
select (the round cadence: now while a round selects, else when the reporting round is
expected to close), or later if eligibility says so. The spread sets the check-in rate: if a
population holds N active devices and each returns uniformly within `spread`, they arrive at
N / spread per second. The coordinator serves a known number of check-ins per second (its
capacity: configured, or measured from its own check-in handling time), so

    spread = max(min_spread_s, N / (capacity_utilization * capacity))

A small population bunches into the next round: all of it returns within `min_spread_s` of
the moment the round opens, so the round fills its whole quota (over-selection included)
before its first reports arrive. A large population is spread just enough that its arrivals
stay under capacity; each round then fills from the steady stream. The selection deadline is
not a target: a round takes devices as fast as they come.

A population too large to bunch (more than capacity lets arrive within `min_spread_s`),
which would take more than `demand_bound_above` of the check-in budget if it checked in once
a round, is also kept from coming back faster than its task takes devices: its arrivals stay
within `demand_margin` times the rate its rounds take them, a selection quota per reporting
time (measured over recent rounds),

    spread >= N * reporting_s / (demand_margin * quota),

so selection takes about reporting_s / demand_margin, and a round at most (1 + 1/margin)
times its reporting. Without this bound the whole active population checked in once a round
and most of it was turned away: at 10,000 phones (benchmarks/RESULTS.md) two thirds of all
check-ins, whose cost, on the coordinator and on the phones, slowed every call. A population
whose rounds are long (minutes of training) is not bound: turning it away once a round
costs little, and bunching keeps its selection short.

Populations share the capacity max-min fairly: each may take what it needs to bunch, and
the populations that need more than their share split what is left.

N is estimated as the number of distinct devices seen over the last `horizon_s`; past
horizon_s * utilization * capacity devices the estimate saturates (a device spread over more
than the horizon is not seen in it), so keep the horizon above the longest spread.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

import numpy as np

from protos import common_pb2


@dataclasses.dataclass(frozen=True)
class RoundDemand:
    """What a task's rounds take: `quota` devices each (over-selection included), and how
    long a round then reports (the median over recent rounds, from the close of selection to
    the close of the round)."""

    quota: int
    reporting_s: float

    def devices_per_s(self) -> float:
        return self.quota / max(self.reporting_s, 1e-3)


@dataclasses.dataclass(frozen=True)
class PaceSteeringSettings:
    min_delay_s: float = 1.0  # nobody is told to come back sooner
    max_delay_s: float = 24 * 3600.0  # nor later
    min_spread_s: float = 1.0  # a bunched population returns within this
    horizon_s: float = 3600.0  # how far back distinct devices count towards N
    jitter_fraction: float = 0.1  # of the spread, added to the start
    # Check-ins per second this coordinator serves; None measures it (CheckInCapacity).
    capacity_check_ins_per_s: float | None = None
    # The share of the capacity that check-ins may take: the rest is for gRPC's own work per
    # call (not in the measured handling time), downloads, uploads and bursts.
    capacity_utilization: float = 0.5
    # A population larger than capacity lets bunch returns at most this many times as fast
    # as its task's rounds take devices (a quota per reporting time); None: capacity alone.
    demand_margin: float | None = 1.0
    # The bound applies only to a population that, checking in once per reporting time,
    # would take more than this share of the check-in budget: below that, turning most of
    # it away costs little, and bunching keeps selection short.
    demand_bound_above: float = 0.25


class CheckInCapacity:
    """Check-ins per second the coordinator can serve: as configured, or measured as the
    inverse of its mean check-in handling time (exponentially weighted, so it follows load).
    Handling runs on one event loop, so one check-in at a time is what it can do."""

    # Before the first measurement: a conservative figure (a signed check-in takes well
    # under 2 ms on the machines measured in benchmarks/RESULTS.md).
    unmeasured_check_ins_per_s = 500.0
    smoothing = 0.02  # weight of each new measurement

    def __init__(self, configured: float | None) -> None:
        if configured is not None and not configured > 0:
            raise ValueError("check-in capacity must be positive")
        self._configured = configured
        self._mean_s: float | None = None

    @property
    def measured(self) -> bool:
        return self._configured is None

    def observe(self, handling_s: float) -> None:
        if self._configured is not None or not handling_s > 0:
            return
        if self._mean_s is None:
            self._mean_s = handling_s
        else:
            self._mean_s += self.smoothing * (handling_s - self._mean_s)

    def check_ins_per_s(self) -> float:
        if self._configured is not None:
            return self._configured
        if self._mean_s is None:
            return self.unmeasured_check_ins_per_s
        return 1.0 / self._mean_s


def population_rate(
    active_devices: int, other_populations: Iterable[int], budget_per_s: float, min_spread_s: float
) -> float:
    """The check-ins per second one population may take of `budget_per_s`: max-min fair.
    Each population wants all its devices back within `min_spread_s`; the smallest wants
    are met first, and what they leave is split evenly among the rest."""
    wants = sorted(n / min_spread_s for n in other_populations)
    mine = active_devices / min_spread_s
    remaining = budget_per_s
    left = len(wants) + 1
    for want in wants:
        if want >= mine:
            break
        remaining -= min(want, remaining / left)
        left -= 1
    return min(mine, remaining / left)


class PopulationActivity:
    """Distinct devices seen per population over a sliding horizon. O(active devices)."""

    def __init__(self, horizon_s: float) -> None:
        self._horizon_s = horizon_s
        self._last_seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._last_seen)

    def record(self, device_id: str, now: float) -> None:
        self._last_seen.pop(device_id, None)
        self._last_seen[device_id] = now
        self._expire(now)

    def active_devices(self, now: float) -> int:
        self._expire(now)
        return len(self._last_seen)

    def _expire(self, now: float) -> None:
        while self._last_seen:
            device_id, seen = next(iter(self._last_seen.items()))
            if seen >= now - self._horizon_s:
                break
            self._last_seen.popitem(last=False)


class PaceSteering:
    def __init__(self, settings: PaceSteeringSettings, rng: np.random.Generator) -> None:
        if not 0 < settings.capacity_utilization <= 1:
            raise ValueError("capacity_utilization must be in (0, 1]")
        self.settings = settings
        self.capacity = CheckInCapacity(settings.capacity_check_ins_per_s)
        self._rng = rng

    def spread_s(
        self,
        active_devices: int,
        other_populations: Iterable[int] = (),
        rounds: RoundDemand | None = None,
    ) -> float:
        """How widely the population's devices are spread: the shortest spread that keeps
        its share of check-ins under capacity; and, for a population too large to bunch, no
        faster than `demand_margin` times what its task's `rounds` take."""
        s = self.settings
        if active_devices <= 0:
            return s.min_spread_s
        budget = s.capacity_utilization * self.capacity.check_ins_per_s()
        rate = population_rate(active_devices, other_populations, budget, s.min_spread_s)
        if rounds is not None and s.demand_margin is not None:
            bunches = active_devices <= rate * s.min_spread_s
            once_a_round = active_devices / rounds.quota * rounds.devices_per_s()
            if not bunches and once_a_round > s.demand_bound_above * budget:
                rate = min(rate, s.demand_margin * rounds.devices_per_s())
        return max(s.min_spread_s, active_devices / rate)

    def window(
        self,
        active_devices: int,
        next_selection_in_s: float,
        not_before_s: float = 0.0,
        other_populations: Iterable[int] = (),
        rounds: RoundDemand | None = None,
    ) -> common_pb2.RetryWindow:
        """The window for one device of a population with `active_devices`, whose task
        selects next in `next_selection_in_s` and whose recent rounds are `rounds` (None
        before one closed). `not_before_s` is a hard lower bound (e.g. eligibility);
        `other_populations` are the active devices of the others."""
        s = self.settings
        spread = self.spread_s(active_devices, other_populations, rounds)
        start = max(next_selection_in_s, not_before_s, s.min_delay_s)
        start += float(self._rng.uniform(0.0, s.jitter_fraction * spread))
        start = min(start, s.max_delay_s)
        end = min(start + spread, s.max_delay_s)
        return common_pb2.RetryWindow(min_delay_s=start, max_delay_s=max(start, end))
