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
