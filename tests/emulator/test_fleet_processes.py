"""A fleet in two worker processes trains a round against a real coordinator on loopback."""

from __future__ import annotations

import asyncio
import os
import pathlib
import time

import numpy as np
import pytest

from emulator.data import SampledDigits
from emulator.fleet_config import DailyRoutine, FleetConfig, TimeZoneShare
from emulator.fleet_processes import FleetProcesses, FleetReport
from emulator.fleet_worker import FleetSpec
from server.coordinator import CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

# Everyone in one time zone, on the charger and home Wi-Fi all night, nobody looking at a phone.
QUIET_NIGHT = FleetConfig(
    phones=24,
    seed=5,
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_processes_train_rounds_and_report_participation(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    config = task_config(total_rounds=2, target_reports=4, over_selection=1.5)
    settings = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=0.2, horizon_s=30.0))

    async def scenario() -> tuple[list, FleetReport, list[int]]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, config, settings=settings
        ) as running:
            day = 20_000 * 86400.0
            spec = FleetSpec(
                target=running.address,
                population=POPULATION,
                config=QUIET_NIGHT,
                datasets=SampledDigits(seed=0),
                virtual_start_s=day + 2 * 3600.0,  # 2 am everywhere
                speedup=1.0,
                anchor_s=time.time(),
                bin_virtual_s=5.0,
                enrollment_secret=ENROLLMENT_SECRET,
            )
            fleet = FleetProcesses(spec, workers=2, nice=3)
            fleet.start()
            pids = fleet.pids
            deadline = time.monotonic() + 120
            while len(running.store.rounds("t1")) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            priorities = [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids]
            report = await asyncio.to_thread(fleet.stop)
            return running.store.rounds("t1"), report, pids, priorities

    rounds, report, pids, priorities = asyncio.run(scenario())

    assert [r.state.value for r in rounds] == ["committed", "committed"]
    assert all(r.reported == 4 for r in rounds)
    assert report.phones == QUIET_NIGHT.phones
    assert report.participation.outcomes["reported"] >= 8
    rows = report.participation.rows()
    assert sum(r["reported"] for r in rows) == report.participation.outcomes["reported"]
    assert np.nanmax([r["eligible"] for r in rows]) > 0
    assert report.check_in_times.total >= 8
    assert not any(_alive(pid) for pid in pids)
    assert priorities == [os.getpriority(os.PRIO_PROCESS, 0) + 3] * 2


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_priority_outside_what_an_unprivileged_user_may_set_is_refused(nice: int) -> None:
    spec = FleetSpec(
        target="127.0.0.1:1",
        population=POPULATION,
        config=QUIET_NIGHT,
        datasets=SampledDigits(seed=0),
        virtual_start_s=0.0,
        speedup=1.0,
        anchor_s=0.0,
    )

    with pytest.raises(ValueError, match="nice must be within 0..19"):
        FleetProcesses(spec, workers=1, nice=nice)
