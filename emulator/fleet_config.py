"""What an emulated fleet looks like: time zones, daily routines, device tiers, networks.

Defaults describe a US-centric Android population (the one behind the 4x day/night swing in
production reports): phones charge mostly overnight, sit on home Wi-Fi at night, and are picked
up often by day and rarely at night. A fleet is reproducible from its seed.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
from typing import Any


class FleetConfigError(ValueError):
    """A fleet configuration value is missing, unknown or out of range."""


@dataclasses.dataclass(frozen=True)
class TimeZoneShare:
    utc_offset_h: float
    share: float


@dataclasses.dataclass(frozen=True)
class DeviceTier:
    name: str
    share: float
    compute_slowdown: float  # training takes this many times the emulator's real training time
    memory_mb: int


@dataclasses.dataclass(frozen=True)
class NetworkProfile:
    """The phone's Wi-Fi link: added to every real transfer as latency plus bytes / bandwidth."""

    name: str
    share: float
    latency_ms: float
    bandwidth_mbps: float


@dataclasses.dataclass(frozen=True)
class DailyRoutine:
    """A user's day in local hours; each phone draws its own habits around these means."""

    night_charge_start_h: float = 22.5
    night_charge_start_sd_h: float = 1.5
    night_charge_hours: float = 7.5
    night_charge_hours_sd: float = 1.0
    p_skip_night_charge: float = 0.1
    p_day_charge: float = 0.7  # a top-up at the desk or in the car
    day_charge_hours: float = 2.5
    p_home_wifi: float = 0.85
    p_work_wifi: float = 0.6
    wake_h: float = 7.0
    wake_sd_h: float = 1.0
    pickups_per_awake_hour: float = 2.5
    pickups_per_night_hour: float = 0.15  # a glance at the alarm, a late message
    mean_screen_minutes: float = 3.0
    idle_after_screen_minutes: float = 3.0  # the OS calls a phone idle a while after use


DEFAULT_TIME_ZONES = (
    TimeZoneShare(-8.0, 0.17),
    TimeZoneShare(-7.0, 0.06),
    TimeZoneShare(-6.0, 0.22),
    TimeZoneShare(-5.0, 0.35),
    TimeZoneShare(0.0, 0.06),
    TimeZoneShare(1.0, 0.08),
    TimeZoneShare(5.5, 0.03),
    TimeZoneShare(9.0, 0.03),
)
DEFAULT_TIERS = (
    DeviceTier("high", 0.25, compute_slowdown=1.0, memory_mb=8192),
    DeviceTier("mid", 0.45, compute_slowdown=2.5, memory_mb=4096),
    DeviceTier("low", 0.22, compute_slowdown=6.0, memory_mb=2048),
    DeviceTier("legacy", 0.08, compute_slowdown=12.0, memory_mb=1536),
)
DEFAULT_NETWORKS = (
    NetworkProfile("fiber", 0.3, latency_ms=15.0, bandwidth_mbps=100.0),
    NetworkProfile("cable", 0.5, latency_ms=35.0, bandwidth_mbps=25.0),
    NetworkProfile("dsl", 0.2, latency_ms=80.0, bandwidth_mbps=4.0),
)


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    phones: int = 1000
    seed: int = 0
    time_zones: tuple[TimeZoneShare, ...] = DEFAULT_TIME_ZONES
    tiers: tuple[DeviceTier, ...] = DEFAULT_TIERS
    networks: tuple[NetworkProfile, ...] = DEFAULT_NETWORKS
    routine: DailyRoutine = DailyRoutine()
    # Production FL only trains on phones with at least 2 GB of RAM.
    min_memory_mb: int = 2048
    # Phones first look at their conditions spread over this many virtual seconds, so a fleet
    # does not start in one burst; after that each is woken when its conditions change.
    start_spread_virtual_s: float = 300.0

    def validate(self) -> FleetConfig:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise FleetConfigError(f"fleet config field {field!r}: {why}")

        need(self.phones >= 1, "phones", f"must be >= 1, got {self.phones}")
        need(self.min_memory_mb >= 0, "min_memory_mb", "must be >= 0")
        need(self.start_spread_virtual_s > 0, "start_spread_virtual_s", "must be positive")
        share_lists: dict[str, list[float]] = {
            "time_zones": [z.share for z in self.time_zones],
            "tiers": [t.share for t in self.tiers],
            "networks": [n.share for n in self.networks],
        }
        for field, shares in share_lists.items():
            need(len(shares) > 0, field, "needs at least one entry")
            need(
                all(math.isfinite(s) and s >= 0 for s in shares) and sum(shares) > 0,
                field,
                f"shares must be >= 0 and not all zero, got {shares}",
            )
        for zone in self.time_zones:
            need(-12 <= zone.utc_offset_h <= 14, "time_zones", f"bad offset {zone.utc_offset_h}")
        for tier in self.tiers:
            need(tier.compute_slowdown >= 1.0, "tiers", f"{tier.name}: compute_slowdown < 1")
            need(tier.memory_mb > 0, "tiers", f"{tier.name}: memory_mb must be positive")
        for net in self.networks:
            need(net.latency_ms >= 0, "networks", f"{net.name}: latency_ms must be >= 0")
            need(net.bandwidth_mbps > 0, "networks", f"{net.name}: bandwidth_mbps must be > 0")
        r = self.routine
        for name in (
            "p_skip_night_charge",
            "p_day_charge",
            "p_home_wifi",
            "p_work_wifi",
        ):
            value = getattr(r, name)
            need(0.0 <= value <= 1.0, f"routine.{name}", f"must be in [0, 1], got {value}")
        for name in ("night_charge_start_h", "wake_h"):
            value = getattr(r, name)
            need(0.0 <= value < 24.0, f"routine.{name}", f"must be an hour in [0, 24), got {value}")
        for name in (
            "night_charge_hours",
            "day_charge_hours",
            "mean_screen_minutes",
        ):
            value = getattr(r, name)
            need(value > 0, f"routine.{name}", f"must be positive, got {value}")
        for name in (
            "night_charge_start_sd_h",
            "night_charge_hours_sd",
            "wake_sd_h",
            "pickups_per_awake_hour",
            "pickups_per_night_hour",
            "idle_after_screen_minutes",
        ):
            value = getattr(r, name)
            need(value >= 0, f"routine.{name}", f"must be >= 0, got {value}")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FleetConfig:
        """Builds a config from a parsed TOML/JSON mapping; unknown keys are errors."""
        _reject_unknown(values, cls, "")
        fields: dict[str, Any] = {}
        for key, value in values.items():
            if key == "routine":
                _reject_unknown(value, DailyRoutine, "routine.")
                fields[key] = _build(DailyRoutine, value, "routine")
            elif key in ("time_zones", "tiers", "networks"):
                kind = {
                    "time_zones": TimeZoneShare,
                    "tiers": DeviceTier,
                    "networks": NetworkProfile,
                }
                if not isinstance(value, list):
                    raise FleetConfigError(f"fleet config field {key!r}: expected a list of tables")
                entries = []
                for item in value:
                    _reject_unknown(item, kind[key], f"{key}[].")
                    entries.append(_build(kind[key], item, key))
                fields[key] = tuple(entries)
            else:
                fields[key] = value
        config = _build(cls, fields, "fleet")
        try:
            return config.validate()  # type: ignore[no-any-return]
        except TypeError as exc:  # a string where a number belongs, and the like
            raise FleetConfigError(f"fleet config: a value has the wrong type ({exc})") from None

    @classmethod
    def from_toml(cls, path: str | pathlib.Path) -> FleetConfig:
        try:
            values = tomllib.loads(pathlib.Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise FleetConfigError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(values.get("fleet", values))


def _reject_unknown(values: Any, kind: type, prefix: str) -> None:
    if not isinstance(values, dict):
        raise FleetConfigError(f"fleet config {prefix or 'root'}: expected a table, got {values!r}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FleetConfigError(
            f"unknown fleet config field(s) {[prefix + u for u in unknown]}; "
            f"known: {sorted(prefix + k for k in known)}"
        )


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    try:
        return kind(**values)
    except TypeError as exc:
        raise FleetConfigError(f"fleet config {where}: {exc}") from None
