"""When a device is told to come back: its retry window per population, the population's
recent activity, and pace steering's windows from both. Every map here is bounded by an
expiry or a capacity (`tracked_devices`)."""

from __future__ import annotations

import numpy as np

from protos import common_pb2, device_pb2
from server.flood_limits import RetryWindowMemory
from server.pace_steering import PaceSteering, PaceSteeringSettings, PopulationActivity
from server.task_runtime import TaskRuntime


class CheckInPacing:
    def __init__(self, settings: PaceSteeringSettings, jitter: np.random.Generator) -> None:
        self._horizon_s = settings.horizon_s
        self._retry_windows = RetryWindowMemory()
        self._pace = PaceSteering(settings, jitter)
        self._activity: dict[str, PopulationActivity] = {}

    def too_early(self, remembered_as: str, now: float) -> float:
        """Seconds until the device's retry window opens; 0 when it is open."""
        return self._retry_windows.too_early(remembered_as, now)

    def answered(self, remembered_as: str, now: float, min_delay_s: float, took_s: float) -> None:
        """A check-in was answered in `took_s` (pace steering's capacity is measured from
        these) with a window opening after `min_delay_s`."""
        self._retry_windows.remember(remembered_as, now, min_delay_s)
        self._pace.capacity.observe(took_s)

    def activity(self, population: str) -> PopulationActivity:
        return self._activity.setdefault(population, PopulationActivity(self._horizon_s))

    def active_devices(self, population: str, now: float) -> int:
        activity = self._activity.get(population)
        return activity.active_devices(now) if activity else 0

    def window(
        self, task: TaskRuntime, active: int, now: float, not_before_s: float = 0.0
    ) -> common_pb2.RetryWindow:
        population = task.config.population
        return self._pace.window(
            active_devices=active,
            next_selection_in_s=task.next_selection_in_s(now),
            not_before_s=not_before_s,
            other_populations=[
                a.active_devices(now) for p, a in self._activity.items() if p != population
            ],
            rounds=task.round_demand(),
        )

    def tracked_devices(self) -> dict[str, int]:
        return {
            "retry_windows": self._retry_windows.entries(),
            "population_activity": sum(len(a) for a in self._activity.values()),
        }


def rejection(
    reason: device_pb2.Rejection.Reason, message: str, window: common_pb2.RetryWindow
) -> device_pb2.CheckInResponse:
    return device_pb2.CheckInResponse(
        rejection=device_pb2.Rejection(reason=reason, message=message), retry_window=window
    )
