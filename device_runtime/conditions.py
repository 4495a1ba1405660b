"""Device conditions: a device trains only while charging, idle and on an unmetered network."""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class ConditionsSnapshot:
    charging: bool
    idle: bool
    unmetered: bool

    @property
    def eligible(self) -> bool:
        return self.charging and self.idle and self.unmetered

    def describe(self) -> str:
        missing = [
            name
            for name, ok in (
                ("charging", self.charging),
                ("idle", self.idle),
                ("unmetered", self.unmetered),
            )
            if not ok
        ]
        return "eligible" if not missing else "not " + ", not ".join(missing)


class DeviceConditions(Protocol):
    """What the platform tells the runtime. Training stops when `current().eligible` turns false."""

    def current(self) -> ConditionsSnapshot: ...


class AlwaysEligible:
    """For edge boxes that are always powered, idle and on a wired or unmetered network."""

    def current(self) -> ConditionsSnapshot:
        return ConditionsSnapshot(charging=True, idle=True, unmetered=True)
