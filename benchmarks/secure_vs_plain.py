"""Secure rounds against plain rounds: the same fleet, job and machine, side by side in one run.

    .venv/bin/python -m benchmarks.secure_vs_plain [--phones 60] [--rounds 10] [--pairs 1]

Runs the digits job of `overnight demo` (same split, model, hyperparameters) through the real
stack (TLS gRPC on loopback, SQLite, LiteRT training on every emulated phone) with the plain
`mean` aggregator and with `secure_aggregator()`, alternating (plain, secure) `--pairs` times so
both see the same machine load. Phones are always available and nobody drops out, so every
round should commit. Reports wall time per committed round (fleet start to last commit over
committed rounds), the median round (opened to committed), failed rounds, the ratio, and where
a secure round's time goes (benchmarks/secure_round_phases.py).
Goal (issue 17): secure <= 1.3x plain per committed round, no failed rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import pathlib
import statistics
import tempfile

from benchmarks.fleet_rounds import FleetJob, RoundTimes, export_model, run_job
from benchmarks.machine import record_figures
from benchmarks.secure_round_phases import SessionLog, phase_medians
from overnight.demo import DemoSettings

GOAL_RATIO = 1.3


def summarize(name: str, runs: list[RoundTimes]) -> tuple[str, str]:
    per_round = statistics.median(r.wall_per_round_s for r in runs)
    median = statistics.median(r.median_round_s for r in runs)
    failed = sum(r.failed for r in runs)
    committed = sum(r.committed for r in runs)
    return name, (
        f"{per_round:.3f} s per committed round (wall), median round {median:.3f} s; "
        f"{committed} committed, {failed} failed"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phones", type=int, default=60)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=DemoSettings().epochs)
    parser.add_argument("--pairs", type=int, default=1, help="(plain, secure) runs, alternated")
    parser.add_argument(
        "--tight-windows",
        action="store_true",
        help="retry windows from 0.01 s spread over 0.04 s (default: the demo's, 0.1 s and 1 s)",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    demo = dataclasses.replace(
        DemoSettings(),
        phones=args.phones,
        rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        epochs=args.epochs,
    )
    plain_job = FleetJob(demo=demo)
    if args.tight_windows:
        plain_job = dataclasses.replace(plain_job, min_delay_s=0.01, min_spread_s=0.04)
    secure_job = dataclasses.replace(plain_job, aggregator="secure_aggregator()")
    with tempfile.TemporaryDirectory() as tmp:
        model = export_model(plain_job, pathlib.Path(tmp))
    plain: list[RoundTimes] = []
    secure: list[RoundTimes] = []
    phases: list[list[tuple[str, float]]] = []
    for _ in range(args.pairs):
        plain.append(asyncio.run(run_job(plain_job, model)))
        print(summarize("plain", plain[-1:])[1], flush=True)
        with SessionLog() as log:
            secure.append(asyncio.run(run_job(secure_job, model)))
        phases.append(phase_medians(log, secure[-1]))
        print(summarize("secure", secure[-1:])[1], flush=True)
    ratio = statistics.median(
        s.wall_per_round_s / p.wall_per_round_s for p, s in zip(plain, secure, strict=True)
    )
    median_ratio = statistics.median(
        s.median_round_s / p.median_round_s for p, s in zip(plain, secure, strict=True)
    )
    failed = sum(r.failed for r in secure)
    figures = [
        (
            "setting",
            f"{demo.phones} always-available phones, {demo.clients_per_round} per round "
            f"(over-selection {plain_job.over_selection}), {demo.rounds} rounds, digits MLP "
            f"({demo.hidden_units} hidden), {demo.epochs} epochs, batch {demo.batch_size}; "
            f"{args.pairs} (plain, secure) pair(s); retry windows from {plain_job.min_delay_s} s, "
            f"spread >= {plain_job.min_spread_s} s",
        ),
        summarize("plain (`mean`)", plain),
        summarize("secure (`secure_aggregator()`)", secure),
        (
            "ratio secure / plain",
            f"{ratio:.2f} per committed round (wall), {median_ratio:.2f} median round",
        ),
        (
            "secure round, median phase (ms; median over runs)",
            ", ".join(
                f"{name} {1000 * statistics.median(dict(run)[name] for run in phases):.0f}"
                for name, _ in phases[0]
                if all(name in dict(run) for run in phases)
            ),
        ),
    ]
    met = ratio <= GOAL_RATIO and failed == 0
    goal = f"secure <= {GOAL_RATIO}x plain wall time per committed round, no failed round: " + (
        "met" if met else "not met"
    )
    print("\n".join(f"- {name}: {value}" for name, value in [*figures, ("goal", goal)]))
    if not args.no_record:
        record_figures("Secure rounds vs plain rounds, same fleet (issue 17)", figures, goal=goal)


if __name__ == "__main__":
    main()
