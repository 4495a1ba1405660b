"""How busy the event loop is, against how fast a grpc.aio server takes calls and answers them.

    .venv/bin/python -m benchmarks.grpc_loop_occupancy [--seconds 8 --concurrency 64]

Why this exists (issue 11): in the 10,000-phone fleet benchmark the coordinator's check-in
handler took p99 1.6 ms and its event loop lagged p99 15 ms, yet an unloaded probe saw p99
200 ms. This benchmark isolates the gRPC part. A grpc.aio server (in its own process,
plaintext on loopback) answers the standard health Check, a call that does no work of its
own; beside it on the same event loop, a task keeps the loop busy for `busy_ms` per
iteration (the stand-in for the coordinator's other calls). A client process keeps
`--concurrency` calls in flight for `--seconds` and reports calls per second and latency;
the server reports its loop lag (a 10 ms timer). The settings run back to back, in one run.

What it shows: grpc.aio takes each call through several event loop iterations in turn, so
the calls a server answers per second fall with the time one iteration takes, and a call's
latency grows with it, far beyond the loop lag a timer sees.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from typing import Any

from benchmarks.machine import record_figures
from benchmarks.process_stats import quantile

BUSY_MS = (0.0, 0.25, 1.0, 2.0)  # loop time taken per iteration by other work


def _server_main(busy_ms: float, done: Any, port_out: Any, lag_out: Any) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_out.put(port)

        async def other_work() -> None:
            while True:
                until = time.perf_counter() + busy_ms / 1000
                while time.perf_counter() < until:
                    pass
                await asyncio.sleep(0)

        lags: list[float] = []

        async def lag_timer() -> None:
            while True:
                started = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - started - 0.01)

        tasks = [asyncio.create_task(lag_timer())]
        if busy_ms > 0:
            tasks.append(asyncio.create_task(other_work()))
        while not done.is_set():  # until the client has its figures
            await asyncio.sleep(0.1)
        lag_out.put(lags)
        for task in tasks:
            task.cancel()
        await server.stop(None)

    asyncio.run(main())


async def _load(port: int, seconds: float, concurrency: int) -> tuple[int, list[float]]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest())  # connected before the clock runs
        latencies: list[float] = []
        ends = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < ends:
                started = time.perf_counter()
                await stub.Check(health_pb2.HealthCheckRequest())
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), latencies


def measure(busy_ms: float, seconds: float, concurrency: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    port_out, lag_out, done = context.Queue(), context.Queue(), context.Event()
    server = context.Process(target=_server_main, args=(busy_ms, done, port_out, lag_out))
    server.start()
    try:
        calls, latencies = asyncio.run(_load(port_out.get(timeout=60), seconds, concurrency))
        done.set()
        lags = lag_out.get(timeout=60)
    finally:
        server.join(timeout=30)
        if server.is_alive():
            server.kill()
    return {
        "calls_per_s": calls / seconds,
        "p50_ms": 1000 * quantile(latencies, 0.5),
        "p99_ms": 1000 * quantile(latencies, 0.99),
        "lag_p99_ms": 1000 * quantile(lags, 0.99),
        "lag_max_ms": 1000 * max(lags),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-record", action="store_true", help="do not record in RESULTS.md")
    args = parser.parse_args()
    figures = [
        (
            "setting",
            f"grpc.aio health Check, plaintext loopback, {args.concurrency} calls in flight "
            f"for {args.seconds:g} s per row; server and client in their own processes",
        )
    ]
    for busy_ms in BUSY_MS:
        got = measure(busy_ms, args.seconds, args.concurrency)
        line = (
            f"{got['calls_per_s']:,.0f} calls/s, latency p50 {got['p50_ms']:.1f} ms, "
            f"p99 {got['p99_ms']:.1f} ms; loop lag p99 {got['lag_p99_ms']:.1f} ms, "
            f"max {got['lag_max_ms']:.1f} ms"
        )
        print(f"other work {busy_ms:g} ms per loop iteration: {line}", flush=True)
        figures.append((f"other work {busy_ms:g} ms per loop iteration", line))
    if not args.no_record:
        record_figures("gRPC asyncio: loop occupancy against calls served (issue 11)", figures)


if __name__ == "__main__":
    main()
