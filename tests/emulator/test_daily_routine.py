"""The daily phone model: reproducible from its seed, and shaped like a real fleet's day."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from emulator.daily_routine import DAY_S, HOUR_S, DailyConditions, draw_profile
from emulator.fleet_config import FleetConfig, TimeZoneShare
from tests.fakes import FakeClock

DAY0 = 20_000 * DAY_S  # a UTC midnight


def _fleet(config: FleetConfig) -> list[DailyConditions]:
    return [
        DailyConditions(config, draw_profile(config, i), FakeClock()) for i in range(config.phones)
    ]


def _trace(config: FleetConfig, hours: int = 48) -> np.ndarray:
    phones = _fleet(config)
    times = [DAY0 + h * 0.25 * HOUR_S for h in range(4 * hours)]
    return np.array([[p.at(t).eligible for t in times] for p in phones])


def test_seeded_fleet_produces_the_same_availability_trace_twice() -> None:
    config = FleetConfig(phones=200, seed=11)

    first, second = _trace(config), _trace(config)

    assert np.array_equal(first, second)
    assert 0 < first.mean() < 1


def test_trace_does_not_depend_on_the_order_of_questions() -> None:
    config = FleetConfig(phones=30, seed=2)
    forward = _trace(config, hours=30)
    phones = _fleet(config)
    times = [DAY0 + h * 0.25 * HOUR_S for h in range(4 * 30)]

    backward = np.array([[p.at(t).eligible for t in reversed(times)] for p in phones])[:, ::-1]

    assert np.array_equal(forward, backward)


def test_another_seed_gives_another_fleet() -> None:
    assert not np.array_equal(
        _trace(FleetConfig(phones=100, seed=1)), _trace(FleetConfig(phones=100, seed=2))
    )


def test_phones_in_one_time_zone_are_available_mostly_at_night() -> None:
    config = FleetConfig(phones=400, seed=3, time_zones=(TimeZoneShare(0.0, 1.0),))
    phones = _fleet(config)

    def eligible_share(local_hour: float) -> float:
        return float(np.mean([p.at(DAY0 + local_hour * HOUR_S).eligible for p in phones]))

    night, afternoon = eligible_share(3.0), eligible_share(15.0)

    assert night > 0.3
    assert night > 3 * afternoon


def test_time_zone_shifts_the_same_routine() -> None:
    config = FleetConfig(phones=1, seed=8)
    profile = draw_profile(config, 0)
    tokyo = DailyConditions(config, dataclasses.replace(profile, utc_offset_h=9.0), FakeClock())
    london = DailyConditions(config, dataclasses.replace(profile, utc_offset_h=0.0), FakeClock())
    times = [DAY0 + m * 600.0 for m in range(6 * 48)]

    # 03:00 in Tokyo is 18:00 UTC the day before: 9 hours earlier than 03:00 in London.
    assert [tokyo.at(t) for t in times] == [london.at(t + 9 * HOUR_S) for t in times]
    assert any(tokyo.at(t).eligible for t in times)


def test_phones_below_the_memory_floor_never_train() -> None:
    config = FleetConfig(phones=300, seed=4)

    phones = _fleet(config)

    small = [p for p in phones if p.profile.tier.memory_mb < config.min_memory_mb]
    assert small and not any(p.can_train for p in small)
    assert all(p.can_train for p in phones if p not in small)


def test_battery_level_stays_in_range_and_rises_on_the_charger() -> None:
    config = FleetConfig(phones=50, seed=5)
    for phone in _fleet(config):
        levels = [phone.battery_level(DAY0 + h * HOUR_S) for h in range(48)]
        assert all(0.05 <= level <= 1.0 for level in levels)


@pytest.mark.parametrize("field", ["tier", "network"])
def test_shares_pick_every_kind_in_proportion(field: str) -> None:
    config = FleetConfig(phones=2000, seed=6)
    kinds = getattr(config, field + "s")
    shares = np.array([k.share for k in kinds]) / sum(k.share for k in kinds)
    picked = [getattr(draw_profile(config, i), field) for i in range(2000)]

    observed = np.array([picked.count(kind) for kind in kinds]) / len(picked)

    assert np.allclose(observed, shares, atol=0.04)


def test_conditions_hold_until_the_next_change_the_scheduler_is_told_of() -> None:
    config = FleetConfig(phones=20, seed=9)
    for phone in _fleet(config):
        t = DAY0
        for _ in range(30):
            change = phone.next_change_after(t)
            assert change > t
            probes = np.linspace(t, change, 7)[:-1]
            assert len({phone.at(p) for p in probes}) == 1  # nothing changes before `change`
            t = change + 1.0
