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

Nor is a whole large population sent to the next round when the round takes a fraction of
it: it is shared out over the task's next K rounds (their cadence measured from recent
rounds, opened to closed), each device to one drawn at random, so that each round's opening
sees about `demand_margin` times its selection quota (K = ceil(N / (margin * quota))). The
devices sent to one round bunch at its opening as a population of N / K would, so selection
stays as fast. Without this the whole active population checked in once a round and most of
it was turned away: at 10,000 phones (benchmarks/RESULTS.md) two thirds of all check-ins,
whose cost, on the coordinator and on the phones, slowed every call.

Populations share the capacity max-min fairly: each may take what it needs to bunch, and
the populations that need more than their share split what is left.

N is estimated as the number of distinct devices seen over the last `horizon_s`; past
horizon_s * utilization * capacity devices the estimate saturates (a device spread over more
than the horizon is not seen in it), so keep the horizon above the longest spread.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from protos import common_pb2


@dataclasses.dataclass(frozen=True)
class RoundDemand:
    """What a task's rounds take: `quota` devices each (over-selection included), one every
    `cadence_s` (recent rounds, opened to closed)."""

    quota: int
    cadence_s: float


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
    # A large population is shared out over the task's next rounds, so that each round sees
    # about this many times its selection quota arrive; None: every device is sent to the
    # next round (capacity alone spreads them).
    demand_margin: float | None = 2.0


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

    def spread_s(self, active_devices: int, other_populations: Iterable[int] = ()) -> float:
        """How widely the population's devices are spread: the shortest spread that keeps
        its share of check-ins under capacity."""
        s = self.settings
        if active_devices <= 0:
            return s.min_spread_s
        budget = s.capacity_utilization * self.capacity.check_ins_per_s()
        rate = population_rate(active_devices, other_populations, budget, s.min_spread_s)
        return max(s.min_spread_s, active_devices / rate)

    def rounds_ahead(self, active_devices: int, rounds: RoundDemand | None) -> int:
        """Over how many of the task's next rounds the population is shared out: enough
        that each sees about `demand_margin` times its quota (1: all go to the next)."""
        margin = self.settings.demand_margin
        if rounds is None or margin is None or active_devices <= 0:
            return 1
        return max(1, math.ceil(active_devices / (margin * rounds.quota)))

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
        ahead = self.rounds_ahead(active_devices, rounds)
        # Those of the population sent to one round share the capacity within its opening.
        spread = self.spread_s(math.ceil(active_devices / ahead), other_populations)
        start = max(next_selection_in_s, not_before_s, s.min_delay_s)
        if ahead > 1:
            assert rounds is not None
            start += int(self._rng.integers(ahead)) * rounds.cadence_s
        start += float(self._rng.uniform(0.0, s.jitter_fraction * spread))
        start = min(start, s.max_delay_s)
        end = min(start + spread, s.max_delay_s)
        return common_pb2.RetryWindow(min_delay_s=start, max_delay_s=max(start, end))
