import dataclasses

import numpy as np
import pytest

from server.pace_steering import (
    CheckInCapacity,
    PaceSteering,
    PaceSteeringSettings,
    PopulationActivity,
    RoundDemand,
    population_rate,
)

# A coordinator that serves 200 check-ins/s lets devices take half: 100/s.
SETTINGS = PaceSteeringSettings(
    min_delay_s=1.0,
    min_spread_s=1.0,
    jitter_fraction=0.1,
    capacity_check_ins_per_s=200.0,
    capacity_utilization=0.5,
)


def _steering(seed: int = 0, settings: PaceSteeringSettings = SETTINGS) -> PaceSteering:
    return PaceSteering(settings, np.random.default_rng(seed))


def _spread(active: int, next_selection_in_s: float = 0.0) -> tuple[float, float]:
    window = _steering().window(active, next_selection_in_s)
    return window.min_delay_s, window.max_delay_s - window.min_delay_s


def test_fifty_devices_bunch_into_the_next_round() -> None:
    start, spread = _spread(active=50, next_selection_in_s=200.0)

    # All fifty come back within the shortest spread, right when the next round selects.
    assert spread == SETTINGS.min_spread_s
    assert 200.0 <= start <= 200.0 + SETTINGS.jitter_fraction * spread


def test_a_thousand_devices_are_spread_just_enough_to_stay_under_capacity() -> None:
    _, spread = _spread(active=1_000)

    assert 1_000 / spread == pytest.approx(100.0)  # arrivals at the capacity's usable half


def test_a_million_devices_are_spread_just_enough_to_stay_under_capacity() -> None:
    _, spread = _spread(active=1_000_000)

    assert 1_000_000 / spread == pytest.approx(100.0)
    assert spread < SETTINGS.max_delay_s


def test_a_large_population_comes_back_no_faster_than_its_rounds_take_it() -> None:
    # 10,000 devices; capacity would let them back at 100/s; rounds take 65 while they
    # report for 13 s, 5 devices a second. Once a round, they would check in at 769/s.
    spread = _steering().spread_s(10_000, rounds=RoundDemand(quota=65, reporting_s=13.0))

    assert 10_000 / spread == pytest.approx(5.0)


def test_a_large_population_with_long_rounds_is_bound_by_capacity_alone() -> None:
    # Rounds of ten minutes: once a round is 17 check-ins a second, under a quarter of the
    # 100/s budget, so bunching (short selections) wins over fewer refusals.
    spread = _steering().spread_s(10_000, rounds=RoundDemand(quota=65, reporting_s=600.0))

    assert 10_000 / spread == pytest.approx(100.0)


def test_the_capacity_still_binds_below_the_demand() -> None:
    spread = _steering().spread_s(10_000, rounds=RoundDemand(quota=650, reporting_s=1.0))

    assert 10_000 / spread == pytest.approx(100.0)


def test_a_population_capacity_lets_bunch_bunches_however_slow_its_rounds() -> None:
    # Capacity lets 100 devices arrive within the 1 s spread: 60 bunch, even for rounds
    # that take 13 devices in ten minutes.
    spread = _steering().spread_s(60, rounds=RoundDemand(quota=13, reporting_s=600.0))

    assert spread == SETTINGS.min_spread_s


def test_before_a_round_closed_or_turned_off_capacity_alone_spreads() -> None:
    off = dataclasses.replace(SETTINGS, demand_margin=None)
    rounds = RoundDemand(quota=65, reporting_s=13.0)

    assert 10_000 / _steering().spread_s(10_000) == pytest.approx(100.0)
    assert 10_000 / _steering(settings=off).spread_s(10_000, rounds=rounds) == pytest.approx(100.0)


def test_the_selection_deadline_plays_no_part_in_the_spread() -> None:
    # The window depends on the population and the capacity only: a round takes devices as
    # fast as they come instead of waiting for stragglers spread over its deadline.
    steering = _steering()

    assert steering.spread_s(60) == SETTINGS.min_spread_s


def test_window_never_starts_before_a_hard_lower_bound() -> None:
    window = _steering().window(10, next_selection_in_s=5.0, not_before_s=3600.0)

    assert window.min_delay_s >= 3600.0


def test_window_is_capped_at_the_longest_delay() -> None:
    window = _steering().window(100_000_000, next_selection_in_s=0.0)

    assert window.max_delay_s == SETTINGS.max_delay_s


def test_jitter_differs_between_devices_answered_together() -> None:
    steering = _steering(seed=1)

    starts = {steering.window(10_000, 60.0).min_delay_s for _ in range(20)}

    assert len(starts) == 20
    assert all(60.0 <= s <= 60.0 + 0.1 * 10_000 / 100.0 for s in starts)


def test_small_populations_keep_their_bunching_beside_a_large_one() -> None:
    # Max-min fair: 50 devices want 50/s, which is less than half of 100/s; the large
    # population takes what is left.
    assert population_rate(50, [1_000_000], 100.0, 1.0) == 50.0
    assert population_rate(1_000_000, [50], 100.0, 1.0) == 50.0


def test_large_populations_split_the_capacity_evenly() -> None:
    assert population_rate(10_000, [1_000_000], 100.0, 1.0) == 50.0


def test_the_capacity_is_measured_from_the_handling_time() -> None:
    capacity = CheckInCapacity(configured=None)
    unmeasured = capacity.check_ins_per_s()

    for _ in range(500):
        capacity.observe(0.004)

    assert unmeasured == CheckInCapacity.unmeasured_check_ins_per_s
    assert capacity.check_ins_per_s() == pytest.approx(250.0)


def test_a_configured_capacity_ignores_measurements() -> None:
    capacity = CheckInCapacity(configured=80.0)

    capacity.observe(0.5)

    assert capacity.check_ins_per_s() == 80.0


def test_population_activity_counts_distinct_devices_within_the_horizon() -> None:
    activity = PopulationActivity(horizon_s=100.0)
    for i in range(5):
        activity.record(f"d{i}", now=float(i))
    activity.record("d0", now=50.0)  # seen again: still one device

    assert activity.active_devices(now=60.0) == 5
    assert activity.active_devices(now=104.5) == 1  # only d0 (seen at 50) is recent enough
