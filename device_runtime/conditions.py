"""Device conditions: a device trains only while charging, idle and on an unmetered network."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Protocol

log = logging.getLogger(__name__)


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


class LinuxConditions:
    """A Linux device's conditions, read from sysfs and procfs on every call.

    - charging: a mains/USB supply under /sys/class/power_supply is online, or a battery
      reports Charging/Full; a machine with no power-supply entries is mains-powered.
    - idle: the 1-minute load average per CPU (/proc/loadavg) is below `max_load_per_cpu`.
    - unmetered: the default route (/proc/net/route) goes through an interface that is not a
      cellular modem (DEVTYPE=wwan in its uevent, or named wwan*, rmnet*, ppp*).
    A file that cannot be read counts against eligibility: training waits rather than risk a
    phone's battery or data plan. `root` exists for tests.
    """

    cellular_prefixes = ("wwan", "rmnet", "ppp", "ccmni")

    def __init__(
        self,
        root: str | pathlib.Path = "/",
        max_load_per_cpu: float = 0.5,
        cpu_count: int | None = None,
    ) -> None:
        self._root = pathlib.Path(root)
        self._max_load_per_cpu = max_load_per_cpu
        self._cpu_count = cpu_count or os.cpu_count() or 1

    def _read(self, relative: str) -> str | None:
        try:
            return (self._root / relative).read_text().strip()
        except OSError:
            return None

    def charging(self) -> bool:
        supplies = self._root / "sys/class/power_supply"
        if not supplies.is_dir():
            return True
        entries = sorted(supplies.iterdir())
        if not entries:
            return True
        for supply in entries:
            kind = self._read(f"sys/class/power_supply/{supply.name}/type")
            if kind == "Battery":
                status = self._read(f"sys/class/power_supply/{supply.name}/status")
                if status in ("Charging", "Full"):
                    return True
            elif self._read(f"sys/class/power_supply/{supply.name}/online") == "1":
                return True
        return False

    def idle(self) -> bool:
        loadavg = self._read("proc/loadavg")
        try:
            load = float(loadavg.split()[0]) if loadavg else None
        except ValueError:
            load = None
        if load is None:
            log.warning("cannot read the load average under %s; not idle", self._root)
            return False
        return load / self._cpu_count < self._max_load_per_cpu

    def default_interface(self) -> str | None:
        routes = self._read("proc/net/route")
        for line in (routes or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
        return None

    def unmetered(self) -> bool:
        interface = self.default_interface()
        if interface is None:
            return False
        if interface.startswith(self.cellular_prefixes):
            return False
        uevent = self._read(f"sys/class/net/{interface}/uevent") or ""
        return "DEVTYPE=wwan" not in uevent.splitlines()

    def current(self) -> ConditionsSnapshot:
        return ConditionsSnapshot(
            charging=self.charging(), idle=self.idle(), unmetered=self.unmetered()
        )
