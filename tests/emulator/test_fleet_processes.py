"""A fleet in two worker processes trains a round against a real coordinator on loopback."""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
from typing import Any

import numpy as np
import pytest

from device_runtime.channel import ServerTrust
from emulator.data import SampledDigits
from emulator.fleet_config import DailyRoutine, FleetConfig, TimeZoneShare
from emulator.fleet_processes import FleetProcesses, FleetReport
from emulator.fleet_worker import FleetSpec
from protos import device_pb2
from server.coordinator import Coordinator, CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from tests.fakes import FakeClock
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

HANG_GUARD_S = 600.0  # waits are on events; this only stops a broken build from hanging

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


def _watch_reporters_come_back(coordinator: Coordinator) -> asyncio.Event:
    """Set once the task committed rounds 1 and 2 and each phone whose report the coordinator
    took for them has checked in again (for round 3): a phone logs an attempt before its next
    check-in."""
    settled = asyncio.Event()
    device_by_token: dict[bytes, tuple[str, int]] = {}
    waiting_for: set[str] = set()
    check_in, accept_upload = coordinator.check_in, coordinator.accept_upload

    def settle() -> None:
        if len(coordinator.rounds("t1")) >= 2 and not waiting_for:
            settled.set()

    def watched_check_in(
        request: device_pb2.CheckInRequest, *args: Any
    ) -> device_pb2.CheckInResponse:
        response = check_in(request, *args)  # device_id: the hash of the key that signed it
        waiting_for.discard(request.device_id)
        if response.HasField("assignment"):
            assignment = response.assignment
            device_by_token[assignment.upload_token] = (request.device_id, assignment.round_number)
        settle()
        return response

    def watched_upload(header: device_pb2.UploadHeader, *args: Any) -> Any:
        response = accept_upload(header, *args)
        device, round_number = device_by_token[header.upload_token]
        if round_number <= 2:
            waiting_for.add(device)
        settle()
        return response

    coordinator.check_in = watched_check_in  # type: ignore[method-assign]
    coordinator.accept_upload = watched_upload  # type: ignore[method-assign]
    return settled


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_processes_train_rounds_and_report_participation(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    # Deadlines on a fake clock never pass: rounds close at their quota and target, however
    # slowly the workers start and train on a loaded machine. A third round, so that round
    # 2's phones are asked back (for it) before the fleet stops.
    config = task_config(total_rounds=3, target_reports=4, over_selection=1.5)
    settings = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=0.2, horizon_s=30.0))

    async def scenario() -> tuple[list, FleetReport, list[int], list[int]]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, config, clock=FakeClock(), settings=settings
        ) as running:
            settled = _watch_reporters_come_back(running.coordinator)
            day = 20_000 * 86400.0
            spec = FleetSpec(
                target=running.address,
                trust=running.trust,
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
            # Both rounds committed and every phone that reported has checked in again, so
            # it has logged its report: stopping now loses none of the figures checked below.
            await asyncio.wait_for(settled.wait(), HANG_GUARD_S)
            priorities = [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids]
            report = await asyncio.to_thread(fleet.stop)
            return running.store.rounds("t1"), report, pids, priorities

    rounds, report, pids, priorities = asyncio.run(scenario())

    assert [r.state.value for r in rounds[:2]] == ["committed", "committed"]
    assert all(r.reported == 4 for r in rounds[:2])
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
        trust=ServerTrust(),
        population=POPULATION,
        config=QUIET_NIGHT,
        datasets=SampledDigits(seed=0),
        virtual_start_s=0.0,
        speedup=1.0,
        anchor_s=0.0,
    )

    with pytest.raises(ValueError, match="nice must be within 0..19"):
        FleetProcesses(spec, workers=1, nice=nice)
