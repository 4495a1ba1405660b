"""Round cadence on the injected clock (issue 17): with devices to spare, pace steering brings
them back when the next round selects, so rounds stay as short as the first ones and each
selects its whole quota (over-selection holds). Virtual time only; real coordinator."""

from __future__ import annotations

import pathlib
import statistics

from benchmarks.virtual_fleet import FleetSettings, VirtualFleet
from server.coordinator import CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from tests.harness import task_config

ROUNDS = 40


def _fleet(model_bytes: bytes, data_dir: pathlib.Path) -> VirtualFleet:
    task = task_config(
        total_rounds=ROUNDS,
        target_reports=10,
        over_selection=1.3,
        min_reports=5,
        selection_deadline_s=20.0,
        reporting_deadline_s=60.0,
    )
    # A fixed capacity keeps the windows independent of this machine's speed.
    settings = CoordinatorSettings(pace=PaceSteeringSettings(capacity_check_ins_per_s=500.0))
    return VirtualFleet(model_bytes, task, data_dir, FleetSettings(phones=60, seed=3), settings)


def test_sixty_devices_keep_forty_rounds_as_short_as_the_first_ones(
    model_bytes: bytes, tmp_path: pathlib.Path
) -> None:
    fleet = _fleet(model_bytes, tmp_path)

    fleet.run_rounds(ROUNDS)

    durations = [r.record.finished_at - r.record.started_at for r in fleet.rounds]
    assert len(durations) == ROUNDS
    assert max(durations) <= 3 * statistics.median(durations[:5])


def test_every_round_selects_its_full_quota(model_bytes: bytes, tmp_path: pathlib.Path) -> None:
    fleet = _fleet(model_bytes, tmp_path)

    fleet.run_rounds(ROUNDS)

    quota = fleet.coordinator.task(fleet.task_id).config.selection_quota
    assert [r.record.selected for r in fleet.rounds] == [quota] * ROUNDS


def _large_fleet(
    model_bytes: bytes, data_dir: pathlib.Path, demand_margin: float | None
) -> VirtualFleet:
    # 2,000 phones for a quota of 65: capacity alone (250 check-ins/s for devices) would
    # bring all of them back over 8 s while a round takes about 1.4 s.
    task = task_config(
        total_rounds=30,
        target_reports=50,
        over_selection=1.3,
        min_reports=40,
        selection_deadline_s=20.0,
        reporting_deadline_s=60.0,
    )
    pace = PaceSteeringSettings(capacity_check_ins_per_s=500.0, demand_margin=demand_margin)
    return VirtualFleet(
        model_bytes,
        task,
        data_dir,
        FleetSettings(phones=2_000, seed=5),
        CoordinatorSettings(pace=pace),
    )


def test_a_large_population_comes_back_about_as_fast_as_its_rounds_take_it(
    model_bytes: bytes, tmp_path: pathlib.Path
) -> None:
    rounds = {}
    check_ins = {}
    for margin in (1.0, None):
        data_dir = tmp_path / str(margin)
        data_dir.mkdir()
        fleet = _large_fleet(model_bytes, data_dir, margin)
        fleet.run_rounds(30)
        later = list(fleet.rounds)[10:]  # after the first windows were handed out
        rounds[margin] = statistics.median(
            r.record.finished_at - r.record.started_at for r in later
        )
        check_ins[margin] = statistics.mean(r.check_ins for r in later)
        fleet.close()
    quota = 65

    # Arrivals bound by what rounds take: about 165 check-ins a round (the quota of 65,
    # the devices returning from their work and some turned away), where capacity alone
    # brings a quarter of the population back every round (about 490).
    assert check_ins[1.0] <= 3.5 * quota
    assert check_ins[None] >= 6 * quota
    # The price: selection waits for arrivals, so rounds take longer, within the bound of
    # twice their reporting time (measured: 1.6 s against 1.36 s).
    assert rounds[1.0] <= 1.25 * rounds[None]
