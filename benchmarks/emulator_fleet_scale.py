"""Benchmark: 10,000 emulated phones, 1,000 reports per round, the digits MLP.

The coordinator runs in its own process (real gRPC server, SQLite store, deadline ticker) with a
server interceptor timing each CheckIn handler; the fleet runs in worker processes, each an
asyncio loop of phones, which also time each CheckIn call client-side on loopback (without the
emulated link delay). Prints seconds per round, check-in latency p50/p99 both ways, and peak
memory of the emulator and the coordinator; records them in benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks.emulator_fleet_scale --phones 10000 --target 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import multiprocessing
import os
import pathlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.machine import record_figures

# The fleet and the probe enroll with this secret; all of them connect from loopback, which
# the coordinator exempts from the per-network limits (as `--exempt-network 127.0.0.0/8`).
ENROLLMENT_SECRET = b"fleet-benchmark-enrollment-secret"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DAY_S = 86400.0


def _coordinator_main(
    model_bytes: bytes,
    task: dict[str, Any],
    pace: dict[str, Any],
    tls: Any,
    ports: Any,
    stop: Any,
    out: Any,
) -> None:
    import grpc
    import numpy as np

    from device_runtime.clock import RealClock
    from emulator.fleet_worker import peak_rss_bytes
    from emulator.slowdowns import LatencyHistogram
    from server.config import TaskConfig
    from server.coordinator import Coordinator, CoordinatorSettings
    from server.device_identity import DeviceIdentities
    from server.enrollment.config import EnrollmentPolicy
    from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
    from server.grpc_service import CoordinatorServer, freeze_startup_heap
    from server.pace_steering import PaceSteeringSettings
    from server.sqlite_store import SqliteStore

    handler_times = LatencyHistogram()
    # Where a slow answer can come from inside the coordinator: the event loop held up (its
    # lag: how late a 10 ms timer fires) and garbage-collection pauses.
    loop_lag = LatencyHistogram()
    gc_pauses = LatencyHistogram()
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.add(time.perf_counter() - gc_started[0])

    gc.callbacks.append(on_gc)

    async def watch_loop_lag() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            loop_lag.add(max(time.perf_counter() - started - 0.01, 0.0))

    class CheckInTimer(grpc.aio.ServerInterceptor):  # type: ignore[misc]
        async def intercept_service(
            self, continuation: Callable[[Any], Awaitable[Any]], details: Any
        ) -> Any:
            handler = await continuation(details)
            if handler is None or not details.method.endswith("/CheckIn"):
                return handler
            inner = handler.unary_unary

            async def timed(request: Any, context: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await inner(request, context)
                finally:
                    handler_times.add(time.perf_counter() - started)

            return grpc.unary_unary_rpc_method_handler(
                timed,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore(pathlib.Path(tmp) / "coordinator.sqlite")
            clock = RealClock()
            identities = DeviceIdentities(
                store,
                clock,
                EnrollmentPolicy.shared_secret(ENROLLMENT_SECRET),
                networks=NetworkSettings(exempt=LOOPBACK_NETWORKS),
            )
            coordinator = Coordinator(
                store,
                clock,
                CoordinatorSettings(pace=PaceSteeringSettings(**pace)),
                rng=np.random.default_rng(0),
                identities=identities,
            )
            coordinator.register_task(TaskConfig(**task).validate(), model_bytes)
            # What `overnight serve` runs, plus the timing interceptor.
            server = CoordinatorServer(
                coordinator, "127.0.0.1:0", interceptors=[CheckInTimer()], tls=tls
            )
            await server.start()
            freeze_startup_heap()
            lag_watcher = asyncio.create_task(watch_loop_lag())
            ports.put(server.port)
            while not stop.is_set():
                await asyncio.sleep(0.2)
            lag_watcher.cancel()
            await server.stop(1.0)
            rounds = [dataclasses.asdict(r) for r in store.rounds(task["task_id"])]
            for r in rounds:
                r["state"] = r["state"].value
            store.close()
            out.put(
                {
                    "rounds": rounds,
                    "handler_counts": np.asarray(handler_times.counts),
                    "loop_lag_counts": np.asarray(loop_lag.counts),
                    "gc_pause_counts": np.asarray(gc_pauses.counts),
                    "peak_rss": peak_rss_bytes(),
                }
            )

    asyncio.run(main())


def _probe_main(
    target: str, trust: Any, population: str, every_s: float, stop: Any, out: Any
) -> None:
    """An unloaded client: CheckIn with no examples (always refused after the full check-in
    path), timed on loopback, so the coordinator's queueing shows without the fleet's own.
    Each probe is a fresh enrolled key (enrolled before the timed call), so no retry window
    turns it away early."""
    import numpy as np

    from device_runtime.channel import open_channel
    from device_runtime.identity import DeviceKey
    from device_runtime.transport import CoordinatorClient, TransportError, channel_options
    from emulator.slowdowns import LatencyHistogram

    async def main() -> None:
        times = LatencyHistogram()
        channel = open_channel(target, trust, channel_options())
        number = 0
        while not stop.is_set():
            key = DeviceKey.from_seed(f"probe-{number}".encode())
            client = CoordinatorClient(target, channel=channel, key=key)
            with contextlib.suppress(TransportError):
                await client.enroll(population, ENROLLMENT_SECRET)
            started = time.perf_counter()
            with contextlib.suppress(TransportError):
                await client.check_in(population, 0)
            times.add(time.perf_counter() - started)
            number += 1
            await asyncio.sleep(every_s)
        await channel.close()
        out.put(np.asarray(times.counts))

    asyncio.run(main())


def export_model(batch_size: int, path: pathlib.Path) -> bytes:
    from tflite_export.exporter import export_model as export
    from tflite_export.model_zoo import create_digits_mlp

    export(create_digits_mlp(64, 0), path, learning_rate=0.2, batch_size=batch_size)
    return path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--phones", type=int, default=10_000)
    parser.add_argument("--target", type=int, default=1000, help="reports per round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--emulator-nice",
        type=int,
        default=10,
        help="CPU priority decrement of the fleet's workers (default 10): on real phones the "
        "emulated load would not compete with the coordinator for its CPUs",
    )
    parser.add_argument("--duration", type=float, default=300.0, help="real seconds to run")
    parser.add_argument("--speedup", type=float, default=20.0, help="virtual s per real s")
    parser.add_argument("--start-hour-utc", type=float, default=5.0)
    parser.add_argument("--report-dir", default=None, help="also write CSV and PNG here")
    parser.add_argument("--no-record", action="store_true", help="do not record in RESULTS.md")
    parser.add_argument("--insecure", action="store_true", help="plaintext instead of TLS")
    args = parser.parse_args()

    import numpy as np

    from device_runtime.channel import ServerTrust
    from emulator.data import SampledDigits
    from emulator.fleet_config import FleetConfig
    from emulator.fleet_processes import FleetProcesses
    from emulator.fleet_worker import FleetSpec
    from emulator.slowdowns import LatencyHistogram
    from server.certificates import loopback_security

    tls, trust = loopback_security()
    if args.insecure:
        tls, trust = None, ServerTrust(insecure=True)
    batch_size = 10
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = export_model(batch_size, pathlib.Path(tmp) / "mlp.tflite")
    task = dict(
        task_id="digits-scale",
        population="digits",
        total_rounds=100_000,
        target_reports=args.target,
        over_selection=1.3,
        min_reports=int(0.8 * args.target),
        selection_deadline_s=30.0,
        reporting_deadline_s=60.0,
        epochs=1,
        batch_size=batch_size,
    )
    # The coordinator's pace steering sizes retry windows from the devices seen over the
    # horizon; a horizon of 5 real minutes is a sizeable part of a virtual night at 20x.
    pace = dict(min_delay_s=1.0, horizon_s=300.0)
    context = multiprocessing.get_context("spawn")
    ports, stop, out = context.Queue(), context.Event(), context.Queue()
    coordinator = context.Process(
        target=_coordinator_main, args=(model_bytes, task, pace, tls, ports, stop, out)
    )
    coordinator.start()
    port = ports.get(timeout=60)
    day = int(time.time() // DAY_S)
    spec = FleetSpec(
        target=f"127.0.0.1:{port}",
        trust=trust,
        population="digits",
        config=FleetConfig(phones=args.phones, seed=0).validate(),
        datasets=SampledDigits(seed=0),
        virtual_start_s=day * DAY_S + args.start_hour_utc * 3600.0,
        speedup=args.speedup,
        anchor_s=time.time(),
        enrollment_secret=ENROLLMENT_SECRET,
    )
    fleet = FleetProcesses(spec, args.workers, args.emulator_nice)
    probe_stop, probe_out = context.Event(), context.Queue()
    probe = context.Process(
        target=_probe_main,
        args=(spec.target, trust, spec.population, 0.1, probe_stop, probe_out),
    )
    started = time.time()
    fleet.start()
    probe.start()
    while time.time() - started < args.duration:
        time.sleep(5)
        print(f"  {time.time() - started:5.0f} s", flush=True)
    probe_stop.set()
    probe_times = LatencyHistogram()
    probe_times.counts = probe_out.get(timeout=60)
    probe.join(timeout=30)
    report = fleet.stop()
    stop.set()
    result = out.get(timeout=120)
    coordinator.join(timeout=30)

    rounds = result["rounds"]
    committed = [r for r in rounds if r["state"] == "committed"]
    durations = np.array([r["finished_at"] - r["started_at"] for r in committed])
    full = [r for r in committed if r["reported"] >= args.target]
    full_durations = np.array([r["finished_at"] - r["started_at"] for r in full])
    handler, lag, pauses = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    handler.counts = result["handler_counts"]
    lag.counts = result["loop_lag_counts"]
    pauses.counts = result["gc_pause_counts"]
    client = report.check_in_times
    selected = sum(r["selected"] for r in rounds)
    dropped = sum(r["dropped"] for r in rounds)
    figures = [
        (
            "setting",
            f"phones {args.phones} ({report.phones} reported back) in {args.workers} worker "
            f"processes at nice {args.emulator_nice}; target {args.target} reports/round, "
            "over-selection 1.3; speedup "
            f"{args.speedup:g}x from {args.start_hour_utc:g}:00 UTC; {args.duration:.0f} s real"
            + ("; plaintext" if args.insecure else "; TLS"),
        ),
        (
            "rounds",
            f"{len(committed)} committed ({len(full)} reached the target), "
            f"{len(rounds) - len(committed)} failed or open at the end",
        ),
        (
            "seconds per committed round",
            f"median {np.median(durations):.1f}, min {durations.min():.1f}, "
            f"max {durations.max():.1f}"
            if len(durations)
            else "n/a",
        ),
        (
            "seconds per round that reached the target",
            f"median {np.median(full_durations):.1f}" if len(full_durations) else "n/a",
        ),
        (
            "dropped / selected over all rounds",
            f"{dropped}/{selected} ({100.0 * dropped / max(selected, 1):.1f} %)",
        ),
        (
            f"check-in latency, server interceptor (handler time), {handler.total} calls",
            f"p50 {1000 * handler.quantile(0.5):.2f} ms, "
            f"p99 {1000 * handler.quantile(0.99):.2f} ms",
        ),
        (
            "check-in latency, client side on loopback (gRPC round trip incl. both event "
            f"loops' queueing), {client.total} calls",
            f"p50 {1000 * client.quantile(0.5):.1f} ms, p99 {1000 * client.quantile(0.99):.1f} ms",
        ),
        (
            "check-in latency, unloaded probe process on loopback (10 calls/s, a check-in with "
            f"no examples, refused after the full check-in path), {probe_times.total} calls",
            f"p50 {1000 * probe_times.quantile(0.5):.1f} ms, "
            f"p99 {1000 * probe_times.quantile(0.99):.1f} ms",
        ),
        (
            f"coordinator event-loop lag (a 10 ms timer, {lag.total} samples)",
            f"p50 {1000 * lag.quantile(0.5):.1f} ms, p99 {1000 * lag.quantile(0.99):.1f} ms, "
            f"max {1000 * lag.quantile(1.0):.0f} ms; GC pauses: {pauses.total}, "
            f"p99 {1000 * pauses.quantile(0.99):.1f} ms, max {1000 * pauses.quantile(1.0):.0f} ms",
        ),
        (
            "peak memory",
            f"emulator {report.peak_rss_bytes / 2**20:.0f} MiB (sum over workers "
            f"{[round(b / 2**20) for b in report.worker_peak_rss_bytes]}), coordinator "
            f"{result['peak_rss'] / 2**20:.0f} MiB",
        ),
        (
            "phone attempts",
            ", ".join(f"{k} {v}" for k, v in sorted(report.participation.outcomes.items())),
        ),
        (
            "dropout causes",
            ", ".join(f"{k} {v}" for k, v in report.participation.causes.most_common()),
        ),
    ]
    print("\n".join(f"- {name}: {value}" for name, value in figures))
    for r in rounds:
        print(
            f"  round {r['round_number']:3d} {r['state']:9s} selected {r['selected']:5d} "
            f"reported {r['reported']:5d} dropped {r['dropped']:4d} "
            f"{r['finished_at'] - r['started_at']:6.1f} s"
        )
    if args.report_dir:
        out_dir = pathlib.Path(args.report_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report.participation.write_csv(out_dir / "participation.csv")
        report.participation.plot(
            out_dir / "participation.png",
            f"{args.phones} emulated phones, {args.target} per round (speedup {args.speedup:g}x)",
        )
    if not args.no_record:
        probe_p99_ms = 1000 * probe_times.quantile(0.99)
        met = len(durations) > 0 and durations.max() <= 60 and probe_p99_ms <= 100
        goal = (
            f"(issue 7) a round of {args.target:,} phones in <= 60 s and probe check-in p99 "
            f"<= 100 ms: {'met' if met else 'not met'}"
        )
        # One section per kind of run (a slice of the morning, a simulated day): the speed-up
        # and start hour name it, so a run replaces only the figures of its own kind.
        kind = f"{args.speedup:g}x from {args.start_hour_utc:g}:00 UTC"
        record_figures(f"Emulator fleet scale (issue 7), {kind}", figures, goal=goal)


if __name__ == "__main__":
    main()
