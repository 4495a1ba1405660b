"""How a coordinator paces the devices it turns away, and what it keeps of ended rounds."""

from __future__ import annotations

import dataclasses

from protos import common_pb2
from server.pace_steering import PaceSteeringSettings
from server.retention import RetentionSettings


@dataclasses.dataclass(frozen=True)
class CoordinatorSettings:
    pace: PaceSteeringSettings = PaceSteeringSettings()
    # Devices of a population whose tasks are all done come back rarely.
    no_task_retry_s: tuple[float, float] = (600.0, 1200.0)
    # ... and sooner when a task is only paused: an operator may resume it any minute.
    paused_task_retry_s: tuple[float, float] = (60.0, 300.0)
    # A device back before its retry window opens is turned away (TOO_EARLY), not selected.
    enforce_retry_windows: bool = True
    # A device turned away because the store failed retries in this window.
    store_unavailable_retry_s: tuple[float, float] = (30.0, 60.0)
    retention: RetentionSettings = RetentionSettings()


def fixed_window(bounds: tuple[float, float]) -> common_pb2.RetryWindow:
    return common_pb2.RetryWindow(min_delay_s=bounds[0], max_delay_s=bounds[1])
