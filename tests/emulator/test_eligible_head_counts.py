"""A worker's head counts of eligible phones do not depend on when its loop gets to run."""

from __future__ import annotations

import asyncio

import pytest

from device_runtime.channel import ServerTrust
from emulator.daily_routine import DailyConditions, draw_profile
from emulator.data import SampledDigits
from emulator.fleet_config import FleetConfig
from emulator.fleet_worker import FleetSpec, FleetWorker
from emulator.virtual_clock import VirtualClock

DAY_S = 86400.0
START_S = 20_000 * DAY_S
BIN_S = 900.0
CONFIG = FleetConfig(phones=30, seed=4)


class FrozenWallClock:
    def __init__(self, time_s: float) -> None:
        self.time_s = time_s

    def __call__(self) -> float:
        return self.time_s


def _worker(wall: FrozenWallClock) -> FleetWorker:
    spec = FleetSpec(
        target="127.0.0.1:9",
        trust=ServerTrust(insecure=True),  # nothing listens there
        population="digits",
        config=CONFIG,
        datasets=SampledDigits(seed=0),
        virtual_start_s=START_S,
        speedup=60.0,
        anchor_s=0.0,
        bin_virtual_s=BIN_S,
    )
    worker = FleetWorker(spec, list(range(CONFIG.phones)))
    worker.clock = VirtualClock(START_S, 60.0, anchor_s=0.0, real_time=wall)
    worker.conditions = [
        DailyConditions(CONFIG, draw_profile(CONFIG, i), worker.clock) for i in range(30)
    ]
    return worker


def test_a_worker_whose_loop_ran_late_still_counts_every_instant_since_the_start() -> None:
    # Prepare: the worker's loop first runs 10 bins (2.5 virtual hours) after the fleet's
    # start, and is told to stop right away.
    wall = FrozenWallClock(10 * BIN_S / 60.0)
    worker = _worker(wall)
    stop = asyncio.Event()
    stop.set()

    # Execute
    asyncio.run(worker.sample_eligible(stop))

    # Assert: three head counts in each of the 10 bins and one at the stop, each the count
    # of phones eligible at that virtual instant.
    log = worker.participation
    assert [log.eligible_samples[b] for b in range(10)] == [3] * 10
    assert log.eligible_samples[10] == 1
    expected = [
        sum(
            c.can_train and c.at(START_S + b * BIN_S + k * BIN_S / 3).eligible
            for c in worker.conditions
        )
        for b in range(10)
        for k in range(3)
    ]
    means = [log.bins[b]["eligible"] for b in range(10)]
    assert means == pytest.approx([sum(expected[3 * b : 3 * b + 3]) / 3 for b in range(10)])
