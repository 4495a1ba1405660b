"""Secure-round soak: how often a secure round ends as its survivors allow (issue 12, item 5).

Runs the suite's soak (tests/secagg/soak.py) for longer: seeded rounds of 8 to 20 devices,
each stopping at each SecAgg stage with probability --stop-rate, in process (the
coordinator's objects on one event loop, messages in seeded bursts) and over gRPC on
loopback. A round passes when it committed exactly when its survivors allowed it (every
secret kept t holders and at least min_reports inputs were summed), with the survivors'
FedAvg within 2e-6, and never failed because a close at the round's target cut live devices
off. It prints the pass rate, the commit rate, and why the other rounds could not commit.

Run: .venv/bin/python -m benchmarks.secagg_soak [--rounds 200] [--grpc-rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import pathlib
import tempfile
import time

from tests.secagg.soak import RoundOutcome


def _export_model(path: pathlib.Path) -> bytes:
    from tflite_export.exporter import export_model
    from tflite_export.model_zoo import create_digits_mlp

    export_model(create_digits_mlp(hidden_units=16, seed=1), path, learning_rate=0.1, batch_size=8)
    return path.read_bytes()


async def _in_process(
    store: pathlib.Path, model: bytes, args: argparse.Namespace
) -> list[RoundOutcome]:
    from server.sqlite_store import SqliteStore
    from tests.fakes import FakeClock
    from tests.identities import make_coordinator
    from tests.secagg.soak import soak, soak_task_config
    from tests.secagg.soak_in_process import InProcessSoakDriver

    clock = FakeClock()
    coordinator = make_coordinator(SqliteStore(store), clock)
    coordinator.register_task(soak_task_config(), model)
    driver = InProcessSoakDriver(coordinator, clock)
    return await soak(coordinator, driver, args.rounds, args.seed, args.stop_rate, _progress)


async def _over_grpc(
    store: pathlib.Path, model: bytes, args: argparse.Namespace
) -> list[RoundOutcome]:
    from tests.fakes import FakeClock
    from tests.harness import running_coordinator
    from tests.secagg.soak import soak, soak_task_config
    from tests.secagg.soak_grpc import GrpcSoakDriver

    clock = FakeClock()
    async with running_coordinator(str(store), model, soak_task_config(), clock=clock) as running:
        driver = GrpcSoakDriver(running.coordinator, clock, running.address, running.trust)
        return await soak(
            running.coordinator, driver, args.grpc_rounds, args.seed, args.stop_rate, _progress
        )


def _progress(index: int, outcome: RoundOutcome) -> None:
    if (index + 1) % 50 == 0:
        print(f"  {index + 1} rounds", flush=True)


def _summary(name: str, outcomes: list[RoundOutcome], seconds: float) -> None:
    passed = sum(not o.problems for o in outcomes)
    committed = sum(o.committed for o in outcomes)
    stops = [sum(o.stops[s] for o in outcomes) for s in range(4)]
    devices = sum(o.devices for o in outcomes)
    print(f"{name}: {len(outcomes)} rounds, {devices} devices, {seconds:.0f} s")
    print(f"  pass rate {passed}/{len(outcomes)} = {passed / len(outcomes):.1%}")
    print(f"  committed {committed}/{len(outcomes)} = {committed / len(outcomes):.1%}")
    print(
        "  devices stopped before advertising / after advertising / after sharing keys / "
        f"after the masked input: {' / '.join(map(str, stops))} "
        f"({sum(stops) / devices:.1%} of devices)"
    )
    why = collections.Counter(
        (o.expected_failure or "").split(":")[0] for o in outcomes if o.expected_failure
    )
    for stage, count in sorted(why.items()):
        print(f"  could not commit ({stage}): {count}")
    for i, outcome in enumerate(outcomes):
        for problem in outcome.problems:
            print(f"  PROBLEM round {i + 1}: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200, help="in-process rounds")
    parser.add_argument("--grpc-rounds", type=int, default=200, help="rounds over gRPC")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--stop-rate", type=float, default=0.04, help="per device and stage")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = _export_model(pathlib.Path(tmp) / "mlp.tflite")
        for name, run, rounds in (
            ("in process", _in_process, args.rounds),
            ("over gRPC", _over_grpc, args.grpc_rounds),
        ):
            if rounds <= 0:
                continue
            start = time.perf_counter()
            outcomes = asyncio.run(run(pathlib.Path(tmp) / f"{name[:4]}.sqlite", model, args))
            _summary(name, outcomes, time.perf_counter() - start)


if __name__ == "__main__":
    main()
