"""Check-in throughput: TLS with signed check-ins vs plaintext unsigned, side by side in one run.

Three coordinators run as separate processes on loopback, each with one task for the
population:
- plaintext unsigned: `--insecure`, and a check-in is trusted to be from the device it names
  (the coordinator before issue 11; the benchmark's own stand-in for its identity checks);
- plaintext signed: `--insecure`, with enrolled keys (splits the cost of signatures from TLS);
- TLS signed: a throwaway P-256 CA and enrolled keys, as `overnight serve` runs by default.
A load process drives each in turn, alternating, so that all see the same machine load.
Two ways phones connect:
- shared: `connections` long-lived HTTP/2 connections carry all check-ins (the emulator's
  phones behind a carrier NAT; TLS costs only record encryption);
- fresh: every check-in opens its own connection (a phone that checks in hours apart; TLS
  adds a full handshake, ECDHE + ECDSA P-256, to every check-in).
Reported per mode: check-ins per second, p50 and p99 latency, the coordinator process's
CPU-seconds per 1,000 check-ins, and TLS signed / plaintext unsigned. The load generator
shares the two cores and pays the client half of every handshake, which a real phone pays on
its own CPU; the CPU column is what the coordinator itself spends. Signed check-ins come from
a pool of 256 keys enrolled before the timed runs; retry windows are not enforced, so a key
may come back at once.

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
from benchmarks.process_stats import cpu_seconds, quantile

ENROLLMENT_SECRET = b"tls-check-in-benchmark-enrollment-secret"


def _coordinator_main(model_bytes: bytes, tls: Any, signed: bool, ports: Any, stop: Any) -> None:
    import numpy as np

    from device_runtime.clock import RealClock
    from server.config import TaskConfig
    from server.coordinator import Coordinator, CoordinatorSettings
    from server.device_identity import DeviceIdentities
    from server.enrollment.config import EnrollmentPolicy
    from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
    from server.grpc_service import CoordinatorServer, freeze_startup_heap
    from server.sqlite_store import SqliteStore

    class TrustingIdentities(DeviceIdentities):
        """Takes a check-in's device id at its word: the unsigned baseline."""

        def verify_check_in(self, request: Any) -> str:
            return str(request.device_id)

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore.in_data_dir(tmp)
            clock = RealClock()
            identities = (DeviceIdentities if signed else TrustingIdentities)(
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


def _unsigned_check_in(key: Any) -> Any:
    from device_runtime import constants
    from protos import device_pb2

    return device_pb2.CheckInRequest(
        protocol_version=constants.PROTOCOL_VERSION,
        population="digits",
        runtime_version=constants.RUNTIME_VERSION,
        example_count=10,
        device_id=key.device_id,
    )


async def _drive(
    target: str,
    trust: Any,
    signed: bool,
    fresh: bool,
    seconds: float,
    concurrency: int,
    connections: int,
    coordinator_pid: int,
) -> tuple[list[float], float]:
    """Check-ins as fast as `concurrency` callers go for `seconds`; returns their latencies
    and the coordinator's CPU-seconds over the timed check-ins (enrollment excluded)."""
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
    if signed:
        for phone in phones:
            await phone.enroll("digits", ENROLLMENT_SECRET)
    cpu_before = cpu_seconds(coordinator_pid)
    end = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def caller(index: int) -> None:
        while time.perf_counter() < end:
            phone = phones[next(counter) % len(phones)]
            request = (
                phone.signed_check_in("digits", 10) if signed else _unsigned_check_in(phone.key)
            )
            started = time.perf_counter()
            if fresh:
                async with open_channel(target, trust, channel_options()) as channel:
                    await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(request, timeout=30)
            else:
                channel = shared[index % connections]
                await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(request, timeout=30)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    cpu = cpu_seconds(coordinator_pid) - cpu_before
    for channel in shared:
        await channel.close()
    return latencies, cpu


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
    plain = ServerTrust(insecure=True)
    # name: (server TLS, client trust, signed check-ins)
    modes = {
        "plaintext unsigned": (None, plain, False),
        "plaintext signed": (None, plain, True),
        "TLS signed": (tls, trust, True),
    }
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    targets: dict[str, str] = {}
    pids: dict[str, int] = {}
    processes = []
    for name, (server_tls, _, signed) in modes.items():
        ports = context.Queue()
        process = context.Process(
            target=_coordinator_main, args=(model_bytes, server_tls, signed, ports, stop)
        )
        process.start()
        processes.append(process)
        targets[name] = f"127.0.0.1:{ports.get(timeout=120)}"
        assert process.pid is not None
        pids[name] = process.pid

    # (connecting, mode) -> [(check-ins per second, coordinator CPU-s per 1,000, latencies)]
    results: dict[tuple[str, str], list[tuple[float, float, list[float]]]] = {}
    try:
        for repeat in range(args.repeats):
            for connecting in ("shared", "fresh"):
                for name, (_, client_trust, signed) in modes.items():
                    print(
                        f"repeat {repeat + 1}/{args.repeats}: {connecting} {name} ...", flush=True
                    )
                    latencies, cpu = asyncio.run(
                        _drive(
                            targets[name],
                            client_trust,
                            signed,
                            connecting == "fresh",
                            args.seconds,
                            args.concurrency,
                            args.connections,
                            pids[name],
                        )
                    )
                    rate = len(latencies) / args.seconds
                    per_thousand = 1000 * cpu / max(1, len(latencies))
                    results.setdefault((connecting, name), []).append(
                        (rate, per_thousand, latencies)
                    )
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=30)

    rows = []
    goal_notes = []
    for connecting in ("shared", "fresh"):
        row: dict[str, tuple[float, float, float, float]] = {}
        for name in modes:
            runs = results[(connecting, name)]
            pooled = [x for _, _, latencies in runs for x in latencies]
            row[name] = (
                statistics.median(rate for rate, _, _ in runs),
                1000 * quantile(pooled, 0.5),
                1000 * quantile(pooled, 0.99),
                statistics.median(cpu for _, cpu, _ in runs),
            )
        base = row["plaintext unsigned"]
        for name in modes:
            rate, p50, p99, cpu = row[name]
            rows.append(
                f"| {connecting} | {name} | {rate:,.0f} | {p50:.1f} | {p99:.1f} | {cpu:.2f} | "
                f"{rate / base[0]:.2f}x | {base[3] / cpu:.2f}x |"
            )
        secure = row["TLS signed"]
        met = secure[0] >= 0.7 * base[0] and secure[2] <= 50
        goal_notes.append(
            f"{'met' if met else 'not met'} with {connecting} connections "
            f"({secure[0] / base[0]:.2f}x, p99 {secure[2]:.1f} ms; coordinator CPU per "
            f"check-in {base[3] / secure[3]:.2f}x)"
        )
    table = "\n".join(
        [
            "| connections | mode | check-ins/s | p50 ms | p99 ms | coordinator CPU-s per 1,000 "
            "| throughput vs plaintext unsigned | coordinator capacity vs plaintext unsigned |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    body = (
        f"Coordinators and load in separate processes on loopback; {args.concurrency} "
        f"check-ins in flight; shared = {args.connections} long-lived connections, fresh = a "
        f"new connection (and TLS handshake) per check-in; throughput the median of "
        f"{args.repeats} alternating {args.seconds:.0f}-second runs per mode, latencies pooled. "
        "Capacity = the inverse ratio of the coordinator's own CPU per check-in (the load "
        "generator's half of each handshake excluded).\n\n" + table
    )
    print(body)
    goal = (
        "(issue 11) TLS signed at least 0.7x plaintext unsigned with check-in p99 <= 50 ms: "
        + "; ".join(goal_notes)
    )
    print(f"Goal: {goal}")
    if not args.no_record:
        record_section("Check-in throughput: TLS vs plaintext (issue 11)", body, goal=goal)


if __name__ == "__main__":
    main()
