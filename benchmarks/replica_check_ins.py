"""Check-ins per second with 1, 2 and 3 coordinator replicas on one PostgreSQL (issue 15).

For each replica count, a fresh database on a fresh local PostgreSQL server (durable
defaults, unix socket; tests/postgres_server.py) and that many `ReplicaCoordinator`
processes (as `overnight serve --replica` runs them; plaintext listeners, signed check-ins),
sharing one task. The load spreads check-ins over the replicas round robin, `concurrency` in
flight, from a pool of enrolled keys. The task's rounds select `quota` devices and fail at
their deadline (nobody uploads): check-ins are a production mix of assignments (a global
count in PostgreSQL) and ROUND_FULL rejections; retry windows are not enforced.

Reported per replica count: check-ins per second, p50 and p99 latency, the replicas' own
CPU-seconds per 1,000 check-ins (all replicas together), PostgreSQL's CPU-seconds per 1,000
(its backends), and the replicas a 3,000 check-ins/s population needs if each replica has a
core to itself: ceil(3,000 x replica CPU-s per check-in). On a 2-core machine the replicas,
PostgreSQL and the load share the cores, so throughput cannot grow with replicas here; the
CPU columns are what scales.

Run: .venv/bin/python -m benchmarks.replica_check_ins [--seconds 8 --repeats 3
     --concurrency 32 --keys 2048] (smoke: --seconds 2 --repeats 1 --keys 256 --no-record)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import pathlib
import statistics
import tempfile
import time
from typing import Any

from benchmarks.machine import record_section
from benchmarks.process_stats import children_cpu_seconds, cpu_seconds, quantile

ENROLLMENT_SECRET = b"replica-check-in-benchmark-enrollment-secret"
POPULATION = "digits"


def _replica_main(url: str, name: str, model_bytes: bytes, ports: Any, stop: Any) -> None:
    import numpy as np

    from device_runtime.clock import RealClock
    from server.config import TaskConfig
    from server.coordinator import CoordinatorSettings
    from server.device_identity import DeviceIdentities
    from server.enrollment.config import EnrollmentPolicy
    from server.errors import AlreadyExists
    from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
    from server.grpc_service import CoordinatorServer, freeze_startup_heap
    from server.postgres_store import PostgresStore
    from server.replica_coordinator import ReplicaCoordinator

    async def main() -> None:
        store = PostgresStore(url, replica=True)
        clock = RealClock()
        identities = DeviceIdentities(
            store,
            clock,
            EnrollmentPolicy.shared_secret(ENROLLMENT_SECRET),
            networks=NetworkSettings(exempt=LOOPBACK_NETWORKS),
        )
        coordinator = ReplicaCoordinator(
            store,
            clock,
            name,
            CoordinatorSettings(enforce_retry_windows=False),
            rng=np.random.default_rng(0),
            identities=identities,
        )
        config = TaskConfig(
            task_id="bench",
            population=POPULATION,
            total_rounds=1_000_000,
            target_reports=500,
            over_selection=1.0,
            min_reports=1,
            selection_deadline_s=1.0,
            reporting_deadline_s=1.0,
            batch_size=10,
        )
        with contextlib.suppress(AlreadyExists):
            coordinator.register_task(config.validate(), model_bytes)
        server = CoordinatorServer(coordinator, "127.0.0.1:0", tls=None)
        await server.start()
        freeze_startup_heap()
        ports.put(server.port)
        while not stop.is_set():
            await asyncio.sleep(0.2)
        await server.stop(0)
        store.close()

    asyncio.run(main())


async def _drive(
    targets: list[str], seconds: float, concurrency: int, keys: int, pids: list[int], pg_pid: int
) -> tuple[list[float], float, float]:
    from device_runtime.channel import ServerTrust, open_channel
    from device_runtime.identity import DeviceKey
    from device_runtime.transport import CoordinatorClient, channel_options
    from protos import device_pb2_grpc

    trust = ServerTrust(insecure=True)
    channels = [open_channel(target, trust, channel_options()) for target in targets]
    for channel in channels:
        await channel.channel_ready()
    phones = [
        CoordinatorClient(
            targets[0], trust, channel=channels[0], key=DeviceKey.from_seed(i.to_bytes(4, "big"))
        )
        for i in range(keys)
    ]
    for phone in phones:
        await phone.enroll(POPULATION, ENROLLMENT_SECRET)
    replicas_before = sum(cpu_seconds(pid) for pid in pids)
    pg_before = children_cpu_seconds(pg_pid)
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def caller() -> None:
        while time.perf_counter() < end:
            n = next(counter)
            request = phones[n % keys].signed_check_in(POPULATION, 10)
            stub = device_pb2_grpc.DeviceServiceStub(channels[n % len(channels)])
            started = time.perf_counter()
            await stub.CheckIn(request, timeout=30)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    replicas_cpu = sum(cpu_seconds(pid) for pid in pids) - replicas_before
    pg_cpu = children_cpu_seconds(pg_pid) - pg_before
    for channel in channels:
        await channel.close()
    return latencies, replicas_cpu, pg_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="runs per replica count")
    parser.add_argument("--concurrency", type=int, default=32, help="check-ins in flight")
    parser.add_argument("--keys", type=int, default=2048, help="enrolled device keys")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--no-record", action="store_true", help="do not record in RESULTS.md")
    args = parser.parse_args()

    from benchmarks.emulator_fleet_scale import export_model
    from tests.postgres_server import running_postgres

    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = export_model(10, pathlib.Path(tmp) / "mlp.tflite")
    context = multiprocessing.get_context("spawn")
    rows = []
    with running_postgres(durable=True) as pg:
        for count in args.replicas:
            runs = []
            for repeat in range(args.repeats):
                print(f"{count} replicas, run {repeat + 1}/{args.repeats} ...", flush=True)
                url = pg.create_database()
                stop = context.Event()
                processes, targets = [], []
                for index in range(count):
                    ports = context.Queue()
                    process = context.Process(
                        target=_replica_main,
                        args=(url, f"bench-{index}", model_bytes, ports, stop),
                    )
                    process.start()
                    processes.append(process)
                    targets.append(f"127.0.0.1:{ports.get(timeout=300)}")
                try:
                    runs.append(
                        asyncio.run(
                            _drive(
                                targets,
                                args.seconds,
                                args.concurrency,
                                args.keys,
                                [p.pid for p in processes if p.pid is not None],
                                pg.process.pid,
                            )
                        )
                    )
                finally:
                    stop.set()
                    for process in processes:
                        process.join(timeout=60)
            pooled = [x for latencies, _, _ in runs for x in latencies]
            done = sum(len(latencies) for latencies, _, _ in runs)
            replica_cpu = 1000 * sum(cpu for _, cpu, _ in runs) / max(1, done)
            pg_cpu = 1000 * sum(cpu for _, _, cpu in runs) / max(1, done)
            rate = statistics.median(len(latencies) / args.seconds for latencies, _, _ in runs)
            needed = math.ceil(3000 * replica_cpu / 1000)
            rows.append(
                f"| {count} | {rate:,.0f} | {1000 * quantile(pooled, 0.5):.1f} | "
                f"{1000 * quantile(pooled, 0.99):.1f} | {replica_cpu:.2f} | {pg_cpu:.2f} | "
                f"{needed} |"
            )
    table = "\n".join(
        [
            "| replicas | check-ins/s | p50 ms | p99 ms | replica CPU-s per 1,000 "
            "| PostgreSQL CPU-s per 1,000 | replicas for 3,000/s (a core each) |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    body = (
        f"Replicas, PostgreSQL and the load on one machine, loopback, plaintext, signed "
        f"check-ins from {args.keys} enrolled keys, {args.concurrency} in flight spread round "
        f"robin over the replicas; throughput the median of {args.repeats} runs of "
        f"{args.seconds:.0f} s per replica count, latencies pooled.\n\n" + table
    )
    print(body)
    if not args.no_record:
        record_section("Check-ins with coordinator replicas (issue 15)", body)


if __name__ == "__main__":
    main()
