"""A virtual phone's conditions: charging, idle and Wi-Fi as simple random states.

Each state lasts an exponentially distributed time on the given clock, then is redrawn. Used by
the single-process `Fleet` of the demo and quick tests; realistic days (time zones, overnight
charging, pickups) are `emulator.daily_routine`.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from device_runtime.clock import Clock
from device_runtime.conditions import ConditionsSnapshot


@dataclasses.dataclass(frozen=True)
class RandomConditionsSettings:
    p_charging: float = 0.8
    p_idle: float = 0.9
    p_unmetered: float = 0.9
    mean_state_s: float = 30.0


class RandomConditions:
    """Thread-safe: the training thread polls it while the event loop owns the phone."""

    def __init__(self, clock: Clock, rng: np.random.Generator, settings: RandomConditionsSettings):
        self._clock = clock
        self._rng = rng
        self._settings = settings
        self._lock = threading.Lock()
        self._snapshot = self._draw()
        self._next_change = clock.now() + self._duration()

    def _draw(self) -> ConditionsSnapshot:
        s = self._settings
        return ConditionsSnapshot(
            charging=bool(self._rng.random() < s.p_charging),
            idle=bool(self._rng.random() < s.p_idle),
            unmetered=bool(self._rng.random() < s.p_unmetered),
        )

    def _duration(self) -> float:
        return float(self._rng.exponential(self._settings.mean_state_s))

    def current(self) -> ConditionsSnapshot:
        with self._lock:
            now = self._clock.now()
            while now >= self._next_change:
                self._snapshot = self._draw()
                self._next_change += self._duration()
            return self._snapshot
