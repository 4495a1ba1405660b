import numpy as np

from emulator.phone import RandomConditions, RandomConditionsSettings
from tests.fakes import FakeClock


def _trace(seed: int) -> list[bool]:
    clock = FakeClock()
    conditions = RandomConditions(
        clock, np.random.default_rng(seed), RandomConditionsSettings(mean_state_s=10.0)
    )
    trace = []
    for _ in range(200):
        trace.append(conditions.current().eligible)
        clock.advance(1.0)
    return trace


def test_seeded_phone_produces_the_same_trace_twice() -> None:
    assert _trace(5) == _trace(5)


def test_conditions_change_over_time_at_roughly_the_configured_rate() -> None:
    trace = _trace(6)

    assert 0 < sum(trace) < len(trace)
    eligible_share = sum(trace) / len(trace)
    assert 0.3 < eligible_share < 0.95  # 0.8 * 0.9 * 0.9 = 0.65 expected
