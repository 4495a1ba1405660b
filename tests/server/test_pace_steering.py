import numpy as np

from server.pace_steering import PaceSteering, PaceSteeringSettings, PopulationActivity

SETTINGS = PaceSteeringSettings(min_delay_s=1.0, jitter_fraction=0.1)


def _window(active: int, next_selection_in_s: float = 0.0, not_before_s: float = 0.0):
    steering = PaceSteering(SETTINGS, np.random.default_rng(0))
    return steering.window(
        active,
        devices_wanted=130,
        fill_time_s=30.0,
        next_selection_in_s=next_selection_in_s,
        not_before_s=not_before_s,
    )


def test_large_population_is_spread_so_arrivals_match_the_need() -> None:
    window = _window(active=100_000)

    spread = window.max_delay_s - window.min_delay_s
    # 100,000 devices returning uniformly over the spread arrive at the rate the round needs:
    # 130 devices in 30 s.
    assert abs(100_000 / spread - 130 / 30) < 1e-6


def test_small_population_bunches_into_the_next_round() -> None:
    window = _window(active=50, next_selection_in_s=200.0)

    assert 200.0 <= window.min_delay_s <= 200.0 + 0.1 * 50 * 30 / 130
    assert window.max_delay_s - window.min_delay_s < 30.0


def test_window_never_starts_before_a_hard_lower_bound() -> None:
    window = _window(active=10, next_selection_in_s=5.0, not_before_s=3600.0)

    assert window.min_delay_s >= 3600.0


def test_jitter_differs_between_devices_answered_together() -> None:
    steering = PaceSteering(SETTINGS, np.random.default_rng(1))

    starts = {steering.window(10_000, 130, 30.0, 60.0).min_delay_s for _ in range(20)}

    assert len(starts) == 20
    assert all(60.0 <= s <= 60.0 + 0.1 * 10_000 * 30 / 130 for s in starts)


def test_population_activity_counts_distinct_devices_within_the_horizon() -> None:
    activity = PopulationActivity(horizon_s=100.0)
    for i in range(5):
        activity.record(f"d{i}", now=float(i))
    activity.record("d0", now=50.0)  # seen again: still one device

    assert activity.active_devices(now=60.0) == 5
    assert activity.active_devices(now=104.5) == 1  # only d0 (seen at 50) is recent enough
