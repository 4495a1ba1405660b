"""A user picking up an emulated phone mid-training reaches the coordinator as a dropout.

The phone's own daily routine decides the pickup; the real device runtime notices it through
its conditions (polled before every batch), stops, and reports INTERRUPTED over real gRPC.
"""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np

from device_runtime.clock import RealClock
from device_runtime.runtime import DeviceRuntime, Outcome
from device_runtime.transport import CoordinatorClient
from emulator.daily_routine import DailyConditions, draw_day, draw_profile
from emulator.data import SampledDigits
from emulator.fleet_config import FleetConfig
from emulator.participation import dropout_cause
from server.rounds.round import AssignmentState
from tests.fakes import FakeClock
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

STEP_S = 20.0  # virtual seconds that pass between two looks at the conditions


class SteppingClock:
    """Virtual time that moves STEP_S forward each time it is read."""

    def __init__(self, start: float) -> None:
        self.time = start

    def now(self) -> float:
        now = self.time
        self.time += STEP_S
        return now

    async def sleep(self, seconds: float) -> None:
        self.time += seconds


def _night_pickup(config: FleetConfig) -> tuple[int, float]:
    """A phone and a virtual instant at which its user picks it up at night, on the charger."""
    for index in range(config.phones):
        profile = draw_profile(config, index)
        conditions = DailyConditions(config, profile, RealClock())
        if not conditions.can_train:
            continue
        for day in range(20_000, 20_010):
            for start, _ in draw_day(config, profile, day).busy:
                utc = start - profile.utc_offset_h * 3600.0
                before = [conditions.at(utc - k * STEP_S) for k in (1.5, 0.5)]
                if all(s.eligible for s in before) and not conditions.at(utc + 0.5 * STEP_S).idle:
                    return index, utc
    raise AssertionError("no night pickup in the fleet")


def test_pickup_mid_training_is_an_interruption_the_coordinator_counts_as_dropout(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    config = FleetConfig(phones=50, seed=21)
    index, pickup = _night_pickup(config)
    profile = draw_profile(config, index)
    # Read 1 (check-in) and read 2 (before batch 1) fall before the pickup, read 3 after it.
    clock = SteppingClock(pickup - 1.5 * STEP_S)
    conditions = DailyConditions(config, profile, clock)
    examples = SampledDigits(mean_examples=40, sigma=0.0, seed=1).client(index)

    async def scenario():  # type: ignore[no-untyped-def]
        # The coordinator's deadlines stay put (fake clock): however slow the machine, the
        # round is still open when the interruption is reported.
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, task_config(), clock=FakeClock()
        ) as running:
            client = CoordinatorClient(
                running.address, running.trust, key=profile.device_key(config.seed)
            )
            runtime = DeviceRuntime(
                client=client,
                population=POPULATION,
                enrollment_secret=ENROLLMENT_SECRET,
                examples=examples,
                conditions=conditions,
                clock=RealClock(),
                rng=np.random.default_rng(0),
            )
            attempt = await runtime.attempt()
            await client.close()
            return attempt, running.coordinator.task("t1").current

    attempt, current = asyncio.run(scenario())

    assert attempt.outcome is Outcome.INTERRUPTED
    assert "interrupted after 1 batches" in attempt.detail
    assert dropout_cause(attempt) == "picked up"
    [assignment] = current.assignments.values()
    assert assignment.device_id == profile.device_key(config.seed).device_id
    assert assignment.state is AssignmentState.FAILED
    assert assignment.failure == "INTERRUPTED"
    assert current.reported == 0
