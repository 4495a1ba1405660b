"""Benchmark: a year of a 100,000-phone population keeps the coordinator's state bounded.

Issue 14, item 7. The real in-process coordinator (SQLite store in a data directory, signed
check-ins, zero-delta uploads through the real aggregation path, no training) serves a
population on a virtual clock (benchmarks/virtual_fleet.py). Each phone is available for
one session of an hour every `--mean-days` days on average (plugged in, idle, on Wi-Fi):
it checks in when a session starts and follows its retry windows while it lasts. Every
`--sample-days` virtual days the benchmark samples the data directory's size, the rows of
the assignments table, this process's resident memory and the size of each per-device map
the coordinator holds (`Coordinator.tracked_devices`). With retention (the default: a week)
all of them level off; `--retention-days 0` runs without, for comparison.

The phones' own state (100,000 keys and schedules) is in the same process and constant
after the start; the resident memory's growth is the coordinator's.

    .venv/bin/python -m benchmarks.retention_year --phones 100000 --days 365
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sqlite3
import tempfile
import time

from benchmarks.machine import record_section
from benchmarks.virtual_fleet import DAY_S, POPULATION, FleetSettings, VirtualFleet
from server.config import TaskConfig
from server.coordinator import CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from server.retention import RetentionSettings

NEVER_S = 1e12


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def directory_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _export_model(directory: pathlib.Path) -> bytes:
    """Exports in a child process: TensorFlow would otherwise add ~500 MiB to the resident
    memory this benchmark samples."""
    import subprocess
    import sys

    path = directory / "digits_mlp.tflite"
    script = (
        "import sys; from tflite_export.exporter import export_model; "
        "from tflite_export.model_zoo import create_digits_mlp; "
        "export_model(create_digits_mlp(hidden_units=16, seed=1), sys.argv[1], "
        "learning_rate=0.1, batch_size=8)"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True)
    return path.read_bytes()


def simulate(
    model_bytes: bytes, args: argparse.Namespace, retention_days: float, data_dir: pathlib.Path
) -> list[dict[str, float]]:
    task = TaskConfig(
        task_id="t1",
        population=POPULATION,
        total_rounds=1_000_000,
        target_reports=args.target,
        over_selection=1.3,
        min_reports=max(1, args.target // 2),
        selection_deadline_s=120.0,
        reporting_deadline_s=600.0,
        batch_size=8,
    ).validate()
    retention_s = retention_days * DAY_S if retention_days else NEVER_S
    settings = CoordinatorSettings(
        pace=PaceSteeringSettings(capacity_check_ins_per_s=args.capacity),
        retention=RetentionSettings(age_s=retention_s),
    )
    fleet_settings = FleetSettings(
        phones=args.phones,
        train_s=(60.0, 300.0),
        first_check_in_s=args.mean_days * DAY_S,
        mean_days_between_sessions=args.mean_days,
        session_s=3600.0,
        seed=args.seed,
    )
    fleet = VirtualFleet(model_bytes, task, data_dir, fleet_settings, settings, keep_rounds=0)
    start = fleet.clock.time
    samples = []
    started = time.perf_counter()
    for day in range(args.sample_days, args.days + 1, args.sample_days):
        fleet.run_until(start + day * DAY_S)
        # Closed explicitly: `with sqlite3.connect(...)` only commits, and the unclosed
        # connection (its page cache and two file descriptors) lived on until a full garbage
        # collection: the resident memory crept ~2 MiB per sample, read as the coordinator's.
        with contextlib.closing(sqlite3.connect(fleet.store_path)) as db:
            assignments = db.execute("SELECT COUNT(*) FROM assignments").fetchone()[0]
        sample: dict[str, float] = {
            "day": day,
            "check_ins": fleet.check_ins,
            "rounds": fleet.closed_rounds,
            "assignment_rows": assignments,
            "data_dir_mib": directory_bytes(data_dir) / 2**20,
            "rss_mib": resident_bytes() / 2**20,
            "wall_s": time.perf_counter() - started,
        }
        sample.update(fleet.coordinator.tracked_devices())
        samples.append(sample)
        print(
            f"day {day}: {fleet.check_ins} check-ins, {fleet.closed_rounds} rounds, "
            f"{assignments} assignment rows, data dir {sample['data_dir_mib']:.1f} MiB, "
            f"RSS {sample['rss_mib']:.0f} MiB, maps {fleet.coordinator.tracked_devices()}, "
            f"{sample['wall_s']:.0f} s",
            flush=True,
        )
        if args.max_wall_s is not None and sample["wall_s"] > args.max_wall_s:
            break  # the table says how far it got
    fleet.close()
    return samples


COLUMNS = (
    ("day", "day", "{:.0f}"),
    ("check_ins", "check-ins", "{:.0f}"),
    ("rounds", "rounds", "{:.0f}"),
    ("assignment_rows", "assignment rows", "{:.0f}"),
    ("data_dir_mib", "data dir MiB", "{:.1f}"),
    ("rss_mib", "RSS MiB", "{:.0f}"),
    ("population_activity", "activity", "{:.0f}"),
    ("retry_windows", "retry windows", "{:.0f}"),
    ("recent_nonces", "nonces", "{:.0f}"),
    ("cached_keys", "keys", "{:.0f}"),
    ("issued_tokens", "tokens", "{:.0f}"),
)


def _days_run(samples: list[dict[str, float]], args: argparse.Namespace) -> str:
    reached = int(samples[-1]["day"])
    if reached >= args.days:
        return f"{args.days} virtual days"
    return f"{reached} of {args.days} virtual days (stopped by --max-wall-s {args.max_wall_s:g})"


def table(samples: list[dict[str, float]], rows: int) -> str:
    step = max(1, len(samples) // rows)
    picked = samples[::step]
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = [
        "| " + " | ".join(fmt.format(s.get(key, 0)) for key, _, fmt in COLUMNS) + " |"
        for s in picked
    ]
    return "\n".join([head, rule, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phones", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--sample-days", type=int, default=7)
    parser.add_argument("--mean-days", type=float, default=7.0, help="days between sessions")
    parser.add_argument("--target", type=int, default=100, help="reports per round")
    parser.add_argument(
        "--capacity",
        type=float,
        default=0.5,
        help="check-ins/s the operator lets this population make, twice over (pace steering "
        "uses half); low, so a year of sessions is ~one check-in each",
    )
    parser.add_argument("--retention-days", type=float, default=7.0, help="0: no retention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=14, help="table rows printed")
    parser.add_argument("--record", action="store_true", help="write the table to RESULTS.md")
    parser.add_argument(
        "--max-wall-s",
        type=float,
        help="stop at the first sample past this wall time, and report the days reached",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="retention-year-") as tmp:
        model_bytes = _export_model(pathlib.Path(tmp))
        data_dir = pathlib.Path(tmp) / "data"
        data_dir.mkdir()
        samples = simulate(model_bytes, args, args.retention_days, data_dir)
    label = f"retention {args.retention_days:g} days" if args.retention_days else "no retention"
    text = "\n".join(
        [
            f"{args.phones} phones, one 1-hour session every {args.mean_days:g} days on "
            f"average, target {args.target}, check-in capacity {args.capacity:g}/s, {label}; "
            f"{_days_run(samples, args)} in {samples[-1]['wall_s']:.0f} s. Maps: entries held "
            "per device (`Coordinator.tracked_devices`).",
            "",
            table(samples, args.rows),
        ]
    )
    print(text)
    if args.record:
        record_section(
            f"A year of a large population, bounded state (retention_year, {label})",
            text,
            goal="data directory, assignment rows, memory and per-device maps level off",
        )


if __name__ == "__main__":
    main()
