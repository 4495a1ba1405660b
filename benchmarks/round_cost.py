"""Benchmark: per-round cost does not grow with the number of past rounds (issue 14, item 7).

A small always-available fleet runs 2,000 rounds against the real in-process coordinator on
a virtual clock (benchmarks/virtual_fleet.py: real SQLite store, signed check-ins, zero-delta
uploads through the real aggregation path, no training). Per round it measures the mean
handling time of the check-ins served while the round was open and the
latency of its commit; it compares the first and the last 200 rounds. Check-in handling is
CPU time of the coordinator's thread (a shared machine's load would read as growth in wall
time); the commit latency is the round driver's own wall-clock measure. Run once with
retention (the default, an hour of virtual time here so pruning runs throughout) and once
without (`--retention-s 0`), side by side.

    .venv/bin/python -m benchmarks.round_cost --rounds 2000
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

from benchmarks.machine import record_section
from benchmarks.virtual_fleet import POPULATION, FleetSettings, RoundCost, VirtualFleet
from server.config import TaskConfig
from server.coordinator import CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from server.retention import RetentionSettings

# Without retention: an age no run reaches.
NEVER_S = 1e12


def _export_model(directory: pathlib.Path) -> bytes:
    from tflite_export.exporter import export_model
    from tflite_export.model_zoo import create_digits_mlp

    path = directory / "digits_mlp.tflite"
    export_model(create_digits_mlp(hidden_units=16, seed=1), path, learning_rate=0.1, batch_size=8)
    return path.read_bytes()


def run(
    model_bytes: bytes, rounds: int, phones: int, retention_s: float, seed: int = 0
) -> list[RoundCost]:
    task = TaskConfig(
        task_id="t1",
        population=POPULATION,
        total_rounds=rounds,
        target_reports=10,
        over_selection=1.3,
        min_reports=5,
        selection_deadline_s=20.0,
        reporting_deadline_s=60.0,
        batch_size=8,
    ).validate()
    settings = CoordinatorSettings(
        pace=PaceSteeringSettings(capacity_check_ins_per_s=500.0),
        retention=RetentionSettings(age_s=retention_s or NEVER_S, interval_s=60.0),
    )
    fleet_settings = FleetSettings(phones=phones, train_s=(5.0, 15.0), seed=seed)
    with tempfile.TemporaryDirectory(prefix="round-cost-") as tmp:
        fleet = VirtualFleet(model_bytes, task, pathlib.Path(tmp), fleet_settings, settings)
        fleet.run_rounds(rounds, max_virtual_s=rounds * 3600.0)
        fleet.close()
    return list(fleet.rounds)


def _summary(costs: list[RoundCost]) -> tuple[float, float, float, float]:
    """Mean check-in handling (ms), p90 of the per-round means, median and p90 commit (ms)."""
    per_round = [1e3 * c.check_in_s / c.check_ins for c in costs if c.check_ins]
    commits = [1e3 * c.commit_s for c in costs if c.commit_s is not None]
    return (
        statistics.fmean(per_round),
        statistics.quantiles(per_round, n=10)[-1],
        statistics.median(commits),
        statistics.quantiles(commits, n=10)[-1],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--phones", type=int, default=60)
    parser.add_argument("--window", type=int, default=200, help="rounds compared at each end")
    parser.add_argument(
        "--retention-s",
        type=float,
        default=3600.0,
        help="virtual retention age (default %(default)g); 0 runs without retention only",
    )
    parser.add_argument("--record", action="store_true", help="write the table to RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = _export_model(pathlib.Path(tmp))
    ages = [args.retention_s, 0.0] if args.retention_s else [0.0]
    rows = []
    for age in ages:
        started = time.perf_counter()
        costs = run(model_bytes, args.rounds, args.phones, age)
        wall_s = time.perf_counter() - started
        first, last = costs[: args.window], costs[-args.window :]
        f, la = _summary(first), _summary(last)
        label = f"retention {age:g} s" if age else "no retention"
        rows.append(
            f"| {label} | {len(costs)} | {f[0]:.3f} / {la[0]:.3f} ({la[0] / f[0]:.2f}x) | "
            f"{f[1]:.3f} / {la[1]:.3f} | {f[2]:.2f} / {la[2]:.2f} ({la[2] / f[2]:.2f}x) | "
            f"{f[3]:.2f} / {la[3]:.2f} | {wall_s:.0f} s |"
        )
    table = "\n".join(
        [
            f"{args.phones} always-available phones, target 10 (13 selected), virtual training "
            f"5-15 s; first vs last {args.window} rounds (first / last).",
            "",
            "| run | rounds | check-in handling CPU mean, ms, first / last (ratio) "
            "| check-in p90 of round means, ms, first / last "
            "| commit median, ms, first / last (ratio) | commit p90, ms, first / last | wall |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.record:
        record_section(
            "Per-round cost over 2,000 rounds (round_cost)",
            table,
            goal="check-in handling and commit latency flat (last/first within noise)",
        )


if __name__ == "__main__":
    main()
