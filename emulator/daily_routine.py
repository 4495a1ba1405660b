"""A phone's day: when it charges, when its user picks it up, when it is on Wi-Fi.

Each phone draws a profile (time zone, habits, device tier, network) from the fleet config and
its seed; each local day then draws that day's plug-in times, screen sessions and Wi-Fi spells
from a generator seeded by (fleet seed, phone, day). Any instant can be asked about in any
order and always gets the same answer, so a seeded fleet replays the same availability trace.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from device_runtime.clock import Clock
from device_runtime.conditions import ConditionsSnapshot
from device_runtime.identity import DeviceKey
from emulator.fleet_config import DeviceTier, FleetConfig, NetworkProfile

HOUR_S = 3600.0
DAY_S = 86400.0


def _pick(items: tuple, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    shares = np.array([item.share for item in items], dtype=np.float64)
    return items[int(rng.choice(len(items), p=shares / shares.sum()))]


@dataclasses.dataclass(frozen=True)
class PhoneProfile:
    index: int
    utc_offset_h: float
    tier: DeviceTier
    network: NetworkProfile
    night_charge_start_h: float  # may exceed 24: plugged in after midnight
    night_charge_hours: float
    wake_h: float
    has_home_wifi: bool
    has_work_wifi: bool

    def device_key(self, seed: int) -> DeviceKey:
        """The phone's key, derived from the fleet seed: reproducible and cheap (~40 us)."""
        return DeviceKey.from_seed(f"overnight-fleet-{seed}-phone-{self.index}".encode())


def draw_profile(config: FleetConfig, index: int) -> PhoneProfile:
    rng = np.random.default_rng([config.seed, index])
    r = config.routine
    return PhoneProfile(
        index=index,
        utc_offset_h=float(_pick(config.time_zones, rng).utc_offset_h),
        tier=_pick(config.tiers, rng),
        network=_pick(config.networks, rng),
        night_charge_start_h=float(
            np.clip(rng.normal(r.night_charge_start_h, r.night_charge_start_sd_h), 18.0, 27.0)
        ),
        night_charge_hours=float(
            np.clip(rng.normal(r.night_charge_hours, r.night_charge_hours_sd), 2.0, 12.0)
        ),
        wake_h=float(np.clip(rng.normal(r.wake_h, r.wake_sd_h), 4.0, 11.0)),
        has_home_wifi=bool(rng.random() < r.p_home_wifi),
        has_work_wifi=bool(rng.random() < r.p_work_wifi),
    )


class Intervals:
    """Disjoint half-open [start, end) spans, sorted, for O(log n) membership tests."""

    def __init__(self, spans: list[tuple[float, float]]) -> None:
        merged: list[list[float]] = []
        for start, end in sorted(s for s in spans if s[1] > s[0]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def __contains__(self, t: float) -> bool:
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and t < self.ends[i]

    def next_edge_after(self, t: float) -> float:
        """The first start or end strictly after t (infinity if none)."""
        i = bisect.bisect_right(self.starts, t)
        candidates = [self.starts[i]] if i < len(self.starts) else []
        if i > 0 and self.ends[i - 1] > t:
            candidates.append(self.ends[i - 1])
        return min(candidates, default=float("inf"))

    def last_edge_before(self, t: float) -> tuple[float, bool] | None:
        """(time, entering) of the latest span edge at or before t."""
        i = bisect.bisect_right(self.starts, t) - 1
        if i < 0:
            return None
        return (self.starts[i], True) if t < self.ends[i] else (self.ends[i], False)


@dataclasses.dataclass(frozen=True)
class DaySchedule:
    """One local day's spans, in local seconds; they may run into the next day."""

    charging: list[tuple[float, float]]
    busy: list[tuple[float, float]]  # screen on, plus the while before the OS calls it idle
    unmetered: list[tuple[float, float]]


def draw_day(config: FleetConfig, profile: PhoneProfile, day: int) -> DaySchedule:
    rng = np.random.default_rng([config.seed, profile.index, day, 1])
    r = config.routine
    midnight = day * DAY_S
    charging: list[tuple[float, float]] = []
    if rng.random() >= r.p_skip_night_charge:
        start_h = profile.night_charge_start_h + rng.normal(0.0, 0.5)
        hours = max(1.0, profile.night_charge_hours + rng.normal(0.0, 0.5))
        charging.append((midnight + start_h * HOUR_S, midnight + (start_h + hours) * HOUR_S))
    if rng.random() < r.p_day_charge:
        start_h = rng.uniform(10.0, 18.0)
        hours = rng.uniform(0.5, 1.5) * r.day_charge_hours
        charging.append((midnight + start_h * HOUR_S, midnight + (start_h + hours) * HOUR_S))

    wake_h = profile.wake_h + rng.normal(0.0, 0.3)
    sleep_h = profile.night_charge_start_h + rng.uniform(0.0, 0.5)
    leave_h = wake_h + rng.uniform(0.5, 1.5)
    home_h = rng.uniform(17.0, 20.0)
    unmetered: list[tuple[float, float]] = []
    if profile.has_home_wifi:
        unmetered.append((midnight, midnight + leave_h * HOUR_S))
        unmetered.append((midnight + home_h * HOUR_S, midnight + DAY_S))
    if profile.has_work_wifi:
        unmetered.append((midnight + (leave_h + 0.5) * HOUR_S, midnight + (home_h - 0.5) * HOUR_S))

    # Screen sessions: a Poisson process at the awake rate, thinned to the night rate while asleep.
    peak = max(r.pickups_per_awake_hour, r.pickups_per_night_hour)
    busy: list[tuple[float, float]] = []
    if peak > 0:
        count = rng.poisson(peak * 24.0)
        starts_h = np.sort(rng.uniform(0.0, 24.0, count))
        keep = rng.random(count)
        minutes = rng.exponential(r.mean_screen_minutes, count)
        for start_h, u, length in zip(starts_h, keep, minutes, strict=True):
            awake = wake_h <= start_h < sleep_h or start_h < sleep_h - 24.0
            rate = r.pickups_per_awake_hour if awake else r.pickups_per_night_hour
            if u < rate / peak:
                start = midnight + start_h * HOUR_S
                busy.append((start, start + (length + r.idle_after_screen_minutes) * 60.0))
        # Waking up: the alarm goes off and the phone comes off the charger.
        wake = midnight + wake_h * HOUR_S
        busy.append((wake, wake + (10.0 + r.idle_after_screen_minutes) * 60.0))
    return DaySchedule(charging, busy, unmetered)


@dataclasses.dataclass(frozen=True)
class _Window:
    charging: Intervals
    busy: Intervals
    unmetered: Intervals


class DailyConditions:
    """A phone's conditions on the emulator's virtual clock (implements DeviceConditions).

    Safe to call from the training thread and the event loop at once: day schedules are
    pure functions of the seed, so a race at worst computes one twice.
    """

    def __init__(self, config: FleetConfig, profile: PhoneProfile, clock: Clock) -> None:
        self._config = config
        self.profile = profile
        self._clock = clock
        self._windows: dict[int, _Window] = {}

    def _window(self, day: int) -> _Window:
        window = self._windows.get(day)
        if window is None:
            # Yesterday's night charge and late sessions run into today.
            days = [draw_day(self._config, self.profile, d) for d in (day - 1, day)]
            window = _Window(
                Intervals([s for d in days for s in d.charging]),
                Intervals([s for d in days for s in d.busy]),
                Intervals([s for d in days for s in d.unmetered]),
            )
            if len(self._windows) > 2:
                self._windows.pop(min(self._windows))
            self._windows[day] = window
        return window

    def at(self, virtual_time_s: float) -> ConditionsSnapshot:
        local = virtual_time_s + self.profile.utc_offset_h * HOUR_S
        window = self._window(int(local // DAY_S))
        return ConditionsSnapshot(
            charging=local in window.charging,
            idle=local not in window.busy,
            unmetered=local in window.unmetered,
        )

    def current(self) -> ConditionsSnapshot:
        return self.at(self._clock.now())

    def next_change_after(self, virtual_time_s: float) -> float:
        """The next virtual instant at which charging, idleness or Wi-Fi may change.

        What a phone's job scheduler knows: the app is woken then, instead of polling.
        """
        local = virtual_time_s + self.profile.utc_offset_h * HOUR_S
        day = int(local // DAY_S)
        window = self._window(day)
        edges = [
            window.charging.next_edge_after(local),
            window.busy.next_edge_after(local),
            window.unmetered.next_edge_after(local),
            (day + 1) * DAY_S,  # tomorrow's spans are drawn then
        ]
        return min(edges) - self.profile.utc_offset_h * HOUR_S

    def battery_level(self, virtual_time_s: float) -> float:
        """Rough state of charge in [0.05, 1]: +40 %/h on the charger, -6 %/h off it."""
        local = virtual_time_s + self.profile.utc_offset_h * HOUR_S
        edge = self._window(int(local // DAY_S)).charging.last_edge_before(local)
        if edge is None:
            return 0.5
        since_h = (local - edge[0]) / HOUR_S
        if edge[1]:
            return float(min(1.0, 0.3 + 0.4 * since_h))
        return float(max(0.05, 1.0 - 0.06 * since_h))

    @property
    def can_train(self) -> bool:
        """Phones below the fleet's memory floor never enable federated training."""
        return self.profile.tier.memory_mb >= self._config.min_memory_mb
