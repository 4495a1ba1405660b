"""Check-in throughput over TLS vs plaintext, side by side in one run.

Two coordinators run as separate processes on loopback, identical but for their listeners
(one TLS with a throwaway P-256 CA, one `--insecure`), each with one task for the population.
A load process drives each in turn, alternating (plaintext, TLS, plaintext, TLS, ...), so
that both see the same machine load. Two ways phones connect:
- shared: `connections` long-lived HTTP/2 connections carry all check-ins (the emulator's
  phones behind a carrier NAT; TLS costs only record encryption);
- fresh: every check-in opens its own connection (a phone that checks in hours apart; TLS
  adds a full handshake, ECDHE + ECDSA P-256, to every check-in).
Reported per mode: check-ins per second, p50 and p99 latency, and TLS / plaintext.
Check-ins are signed by enrolled keys, as the coordinator requires (a pool of keys enrolled
before the timed runs; retry windows are not enforced, so a key may come back at once).

Run: .venv/bin/python -m benchmarks.tls_check_in [--seconds 8 --repeats 3 --concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pathlib
import statistics
import tempfile
import time
from typing import Any

from benchmarks.machine import record_section

ENROLLMENT_SECRET = b"tls-check-in-benchmark-enrollment-secret"


def _coordinator_main(model_bytes: bytes, tls: Any, ports: Any, stop: Any) -> None:
    import numpy as np

    from device_runtime.clock import RealClock
    from server.config import TaskConfig
    from server.coordinator import Coordinator, CoordinatorSettings
    from server.device_identity import DeviceIdentities
    from server.enrollment.config import EnrollmentPolicy
    from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
    from server.grpc_service import CoordinatorServer, freeze_startup_heap
    from server.sqlite_store import SqliteStore

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore.in_data_dir(tmp)
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
                CoordinatorSettings(enforce_retry_windows=False),
                rng=np.random.default_rng(0),
                identities=identities,
            )
            # Each of the load's 256 keys takes an assignment once (a store write); after that
            # its check-ins are turned away after the same signature and eligibility checks.
            config = TaskConfig(
                task_id="bench",
                population="digits",
                total_rounds=1_000_000,
                target_reports=1000,
                selection_deadline_s=3600.0,
                reporting_deadline_s=3600.0,
                batch_size=10,
            )
            coordinator.register_task(config.validate(), model_bytes)
            server = CoordinatorServer(coordinator, "127.0.0.1:0", tls=tls)
            await server.start()
            freeze_startup_heap()
            ports.put(server.port)
            while not stop.is_set():
                await asyncio.sleep(0.2)
            await server.stop(0)
            store.close()

    asyncio.run(main())


async def _drive(
    target: str, trust: Any, fresh: bool, seconds: float, concurrency: int, connections: int
) -> list[float]:
    """Check-ins as fast as `concurrency` callers go for `seconds`; returns their latencies."""
    from device_runtime.channel import open_channel
    from device_runtime.identity import DeviceKey
    from device_runtime.transport import CoordinatorClient, channel_options
    from protos import device_pb2_grpc

    latencies: list[float] = []
    shared = [open_channel(target, trust, channel_options()) for _ in range(connections)]
    for channel in shared:
        await channel.channel_ready()
    phones = [
        CoordinatorClient(target, trust, channel=shared[0], key=DeviceKey.from_seed(bytes([i])))
        for i in range(256)
    ]
    for phone in phones:
        await phone.enroll("digits", ENROLLMENT_SECRET)
    end = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def caller(index: int) -> None:
        while time.perf_counter() < end:
            phone = phones[next(counter) % len(phones)]
            request = phone.signed_check_in("digits", 10)
            started = time.perf_counter()
            if fresh:
                async with open_channel(target, trust, channel_options()) as channel:
                    await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(request, timeout=30)
            else:
                channel = shared[index % connections]
                await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(request, timeout=30)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    for channel in shared:
        await channel.close()
    return latencies


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of both modes")
    parser.add_argument("--concurrency", type=int, default=32, help="check-ins in flight")
    parser.add_argument("--connections", type=int, default=4, help="shared: connections")
    parser.add_argument("--no-record", action="store_true", help="do not record in RESULTS.md")
    args = parser.parse_args()

    from benchmarks.emulator_fleet_scale import export_model
    from device_runtime.channel import ServerTrust
    from server.certificates import loopback_security

    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = export_model(10, pathlib.Path(tmp) / "mlp.tflite")
    tls, trust = loopback_security()
    modes = {"plaintext": (None, ServerTrust(insecure=True)), "TLS": (tls, trust)}
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    targets: dict[str, str] = {}
    processes = []
    for name, (server_tls, _) in modes.items():
        ports = context.Queue()
        process = context.Process(
            target=_coordinator_main, args=(model_bytes, server_tls, ports, stop)
        )
        process.start()
        processes.append(process)
        targets[name] = f"127.0.0.1:{ports.get(timeout=120)}"

    results: dict[tuple[str, str], list[tuple[float, list[float]]]] = {}
    try:
        for repeat in range(args.repeats):
            for connecting in ("shared", "fresh"):
                for name, (_, client_trust) in modes.items():
                    print(
                        f"repeat {repeat + 1}/{args.repeats}: {connecting} {name} ...", flush=True
                    )
                    latencies = asyncio.run(
                        _drive(
                            targets[name],
                            client_trust,
                            connecting == "fresh",
                            args.seconds,
                            args.concurrency,
                            args.connections,
                        )
                    )
                    rate = len(latencies) / args.seconds
                    results.setdefault((connecting, name), []).append((rate, latencies))
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=30)

    rows = []
    goal_notes = []
    for connecting in ("shared", "fresh"):
        row: dict[str, tuple[float, float, float]] = {}
        for name in modes:
            runs = results[(connecting, name)]
            pooled = [x for _, latencies in runs for x in latencies]
            row[name] = (
                statistics.median(rate for rate, _ in runs),
                1000 * _quantile(pooled, 0.5),
                1000 * _quantile(pooled, 0.99),
            )
        plain, secure = row["plaintext"], row["TLS"]
        rows.append(
            f"| {connecting} | {plain[0]:,.0f} | {plain[1]:.1f} | {plain[2]:.1f} | "
            f"{secure[0]:,.0f} | {secure[1]:.1f} | {secure[2]:.1f} | {secure[0] / plain[0]:.2f}x |"
        )
        met = secure[0] >= 0.7 * plain[0] and secure[2] <= 50
        goal_notes.append(
            f"{'met' if met else 'not met'} with {connecting} connections "
            f"({secure[0] / plain[0]:.2f}x, p99 {secure[2]:.1f} ms)"
        )
    table = "\n".join(
        [
            "| connections | plaintext check-ins/s | p50 ms | p99 ms | TLS check-ins/s | "
            "p50 ms | p99 ms | TLS / plaintext |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    body = (
        f"Coordinator and load in separate processes on loopback; {args.concurrency} check-ins "
        f"in flight; shared = {args.connections} long-lived connections, fresh = a new "
        f"connection (and TLS handshake) per check-in; throughput the median of "
        f"{args.repeats} alternating {args.seconds:.0f}-second runs per mode, latencies pooled.\n\n"
        + table
    )
    print(body)
    goal = "(issue 11) TLS at least 0.7x plaintext with check-in p99 <= 50 ms: " + "; ".join(
        goal_notes
    )
    print(f"Goal: {goal}")
    if not args.no_record:
        record_section("Check-in throughput: TLS vs plaintext (issue 11)", body, goal=goal)


if __name__ == "__main__":
    main()
