"""Pace steering: retry windows that bring back as many devices as the next round needs.

Each device that leaves (rejected, or done with an assignment) is told a window
[start, start + spread] to come back in. If the population holds N active devices and each
returns uniformly within a window of length `spread`, they arrive at about N / spread per
second. The next round wants `quota` devices within `fill_time_s`, so

    spread = N * fill_time_s / quota

A large population is spread thin (no stampede when a round opens); a small one gets a
short spread that starts when the next round is expected to select, so its check-ins bunch
into that round. The start is jittered so windows of devices answered together differ.
N is estimated as the number of distinct devices seen over the last `horizon_s`.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from protos import common_pb2


@dataclasses.dataclass(frozen=True)
class PaceSteeringSettings:
    min_delay_s: float = 1.0  # nobody is told to come back sooner
    max_delay_s: float = 24 * 3600.0  # nor later
    min_spread_s: float = 1.0
    horizon_s: float = 3600.0  # how far back distinct devices count towards N
    jitter_fraction: float = 0.1  # of the spread, added to the start


class PopulationActivity:
    """Distinct devices seen per population over a sliding horizon. O(active devices)."""

    def __init__(self, horizon_s: float) -> None:
        self._horizon_s = horizon_s
        self._last_seen: collections.OrderedDict[str, float] = collections.OrderedDict()

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
        self.settings = settings
        self._rng = rng

    def window(
        self,
        active_devices: int,
        devices_wanted: int,
        fill_time_s: float,
        next_selection_in_s: float,
        not_before_s: float = 0.0,
    ) -> common_pb2.RetryWindow:
        """The window for one device. `not_before_s` is a hard lower bound (e.g. eligibility)."""
        s = self.settings
        spread = max(s.min_spread_s, active_devices * fill_time_s / max(devices_wanted, 1))
        start = max(next_selection_in_s, not_before_s, s.min_delay_s)
        start += float(self._rng.uniform(0.0, s.jitter_fraction * spread))
        start = min(start, s.max_delay_s)
        end = min(start + spread, s.max_delay_s)
        return common_pb2.RetryWindow(min_delay_s=start, max_delay_s=max(start, end))
