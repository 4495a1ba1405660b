"""An emulated fleet given two coordinator addresses: its phones spread over both, and when one
goes away the fleet goes on through the other."""

from __future__ import annotations

import asyncio
import pathlib
import time

import pytest

from emulator.data import SampledDigits
from emulator.fleet_config import DailyRoutine, FleetConfig, TimeZoneShare
from emulator.fleet_processes import FleetProcesses
from emulator.fleet_worker import FleetSpec
from server.coordinator import Coordinator, CoordinatorSettings, TaskRuntime
from server.pace_steering import PaceSteeringSettings
from server.store import RoundRecord, RoundState
from tests.device_listener import CallLog, device_listener
from tests.fakes import FakeClock
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

HANG_GUARD_S = 600.0  # waits are on events; this only stops a broken build from hanging
DEVICE_CALLS = {"Enroll", "CheckIn", "Download", "UploadUpdate"}

# Everyone on the charger and home Wi-Fi all night, nobody looking at a phone.
QUIET_NIGHT = FleetConfig(
    phones=12,
    seed=9,
    time_zones=(TimeZoneShare(0.0, 1.0),),
    routine=DailyRoutine(
        night_charge_start_h=21.0,
        night_charge_start_sd_h=0.0,
        night_charge_hours=11.0,
        night_charge_hours_sd=0.0,
        p_skip_night_charge=0.0,
        p_home_wifi=1.0,
        pickups_per_night_hour=0.0,
    ),
    start_spread_virtual_s=1.0,
)


def _committed(coordinator: Coordinator, count: int) -> asyncio.Event:
    """Set once the coordinator has committed `count` rounds."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    committed: list[int] = []

    def observe(task: TaskRuntime, record: RoundRecord) -> None:
        if record.state is RoundState.COMMITTED:
            committed.append(record.round_number)
            if len(committed) >= count:
                loop.call_soon_threadsafe(done.set)

    coordinator.observers.append(observe)
    return done


def test_a_fleet_spreads_over_two_coordinators_and_goes_on_when_one_stops(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    # Deadlines on a fake clock never pass: rounds close at their target, however slowly the
    # worker starts and trains on a loaded machine.
    config = task_config(total_rounds=3, target_reports=3, over_selection=1.5)
    settings = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=0.2, horizon_s=30.0))
    first, second = CallLog(), CallLog()

    async def scenario() -> tuple[list[str], list[str], list[RoundRecord]]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"),
            model_bytes,
            config,
            clock=FakeClock(),
            settings=settings,
            interceptors=[first],
        ) as running:
            round_1, round_2 = (_committed(running.coordinator, n) for n in (1, 2))
            async with device_listener(running.coordinator, [second]) as other:
                spec = FleetSpec(
                    target=f"{running.address},{other.address}",
                    trust=running.trust,
                    population=POPULATION,
                    config=QUIET_NIGHT,
                    datasets=SampledDigits(seed=0),
                    virtual_start_s=20_000 * 86400.0 + 2 * 3600.0,  # 2 am everywhere
                    speedup=1.0,
                    anchor_s=time.time(),
                    bin_virtual_s=5.0,
                    enrollment_secret=ENROLLMENT_SECRET,
                )
                fleet = FleetProcesses(spec, workers=1, nice=3)
                fleet.start()
                try:
                    await asyncio.wait_for(round_1.wait(), HANG_GUARD_S)
                    first_before, second_before = list(first.methods), list(second.methods)
                    await other.stop()
                    await asyncio.wait_for(round_2.wait(), HANG_GUARD_S)
                finally:
                    await asyncio.to_thread(fleet.stop)
            return first_before, second_before, running.store.rounds("t1")

    first_before, second_before, rounds = asyncio.run(scenario())

    # Round robin over both addresses while both were up.
    assert set(first_before) & DEVICE_CALLS and set(second_before) & DEVICE_CALLS
    # With one gone, the fleet finished round 2 through the other.
    assert [(r.state, r.reported) for r in rounds[:2]] == [(RoundState.COMMITTED, 3)] * 2
    assert len(first.methods) > len(first_before)
