"""Bounded state (issue 14, item 7) on the injected clock: however many rounds a task runs,
the store keeps a retention age's worth of assignments and the coordinator's per-device
maps stay within their expiries. Real coordinator and SQLite store; virtual time only."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest

from benchmarks.virtual_fleet import FleetSettings, VirtualFleet
from server.config import TaskConfig
from server.coordinator import CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from server.retention import Retention, RetentionSettings
from tests.harness import task_config

PHONES = 30


def _fleet(model_bytes: bytes, data_dir: pathlib.Path, retention_s: float) -> VirtualFleet:
    task = task_config(
        total_rounds=10_000,
        target_reports=5,
        over_selection=1.4,
        min_reports=3,
        selection_deadline_s=20.0,
        reporting_deadline_s=60.0,
    )
    settings = CoordinatorSettings(
        pace=PaceSteeringSettings(capacity_check_ins_per_s=500.0),
        retention=RetentionSettings(age_s=retention_s, interval_s=60.0),
    )
    fleet = FleetSettings(phones=PHONES, train_s=(10.0, 30.0), seed=5)
    return VirtualFleet(model_bytes, task, data_dir, fleet, settings)


def _rows(fleet: VirtualFleet, table: str) -> int:
    with sqlite3.connect(fleet.store_path) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_store_rows_and_per_device_maps_stay_bounded_over_many_rounds(
    model_bytes: bytes, tmp_path: pathlib.Path
) -> None:
    fleet = _fleet(model_bytes, tmp_path, retention_s=1200.0)
    fleet.run_rounds(100)
    rows_at_100 = {t: _rows(fleet, t) for t in ("assignments", "counted_uploads", "resources")}
    maps_at_100 = fleet.coordinator.tracked_devices()

    fleet.run_rounds(300)

    assert len(fleet.rounds) == 300
    issued = sum(r.record.selected for r in fleet.rounds)
    for table, before in rows_at_100.items():
        after = _rows(fleet, table)
        assert after <= 1.25 * before, f"{table}: {before} rows at round 100, {after} at 300"
    assert _rows(fleet, "assignments") < issued / 3
    for name, size in fleet.coordinator.tracked_devices().items():
        assert size <= max(1.25 * maps_at_100[name], 2 * PHONES), f"{name}: {size} entries"


def test_a_long_minimum_separation_keeps_assignments_past_the_retention_age() -> None:
    retention = Retention(RetentionSettings(age_s=3600.0))
    config = TaskConfig(task_id="t", population="p", min_separation_s=7 * 86400.0)

    assert retention.kept_s(config) == 7 * 86400.0


def test_nothing_is_pruned_within_two_round_lifetimes() -> None:
    retention = Retention(RetentionSettings(age_s=1.0))
    config = TaskConfig(
        task_id="t", population="p", selection_deadline_s=30.0, reporting_deadline_s=90.0
    )

    assert retention.kept_s(config) == 240.0


def test_retention_needs_a_positive_age() -> None:
    with pytest.raises(ValueError):
        Retention(RetentionSettings(age_s=0.0))
