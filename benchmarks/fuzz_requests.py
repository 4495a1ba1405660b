"""Longer fuzzing of every RPC: seeded malformed requests against a real coordinator.

The suite's test (tests/server/test_request_fuzzing.py) sends 10,000; this sends as many as
asked (default 200,000) over several seeds, on one connection, `--concurrency` at a time, and
prints the status codes per method and the request rate. It fails (exit 1) if any answer is
UNKNOWN, INTERNAL or a code the method's .proto does not document, or if a round no longer
commits afterwards.

Run: .venv/bin/python -m benchmarks.fuzz_requests [--requests 200000 --seeds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import pathlib
import sys
import tempfile
import time

import grpc

from benchmarks.machine import record_section
from tests.harness import POPULATION, RoutedChannel, running_coordinator, task_config
from tests.request_fuzzer import RequestFuzzer, fuzz
from tests.server.test_request_fuzzing import _a_round_commits, _token, fuzzed_rpcs


def _model() -> bytes:
    from tflite_export.exporter import export_model
    from tflite_export.model_zoo import create_digits_mlp

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "mlp.tflite"
        export_model(create_digits_mlp(hidden_units=16, seed=1), path, batch_size=8)
        return path.read_bytes()


async def run(requests: int, seeds: int, concurrency: int) -> tuple[list[str], bool]:
    model = _model()
    lines: list[str] = []
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            running_coordinator(
                str(pathlib.Path(tmp) / "s.sqlite"), model, task_config(total_rounds=100_000)
            ) as running,
            RoutedChannel(running) as channel,
        ):
            started = time.perf_counter()
            total = 0
            for seed in range(seeds):
                tokens = [await _token(channel, POPULATION, f"s{seed}-{i}") for i in range(3)]
                seeds_of = await fuzzed_rpcs(channel, running, model, tokens, f"fuzz{seed}")
                fuzzer = RequestFuzzer(seeds_of, seed)
                report = await fuzz(channel, fuzzer, requests // seeds, concurrency)
                total += report.sent
                for method, code in sorted(set(report.undocumented)):
                    ok = False
                    lines.append(f"UNDOCUMENTED seed {seed}: {method} answered {code}")
                for (method, code), count in sorted(report.codes.items()):
                    lines.append(f"seed {seed} | {method} | {code} | {count}")
            elapsed = time.perf_counter() - started
            lines.append(f"{total} requests in {elapsed:.1f} s: {total / elapsed:.0f} per second")
            try:
                await _a_round_commits(channel, running, model)
                lines.append("a round committed afterwards")
            except (AssertionError, grpc.aio.AioRpcError) as exc:
                ok = False
                lines.append(f"NO ROUND COMMITTED afterwards: {exc!r}")
    return lines, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--record", action="store_true", help="record in RESULTS.md")
    args = parser.parse_args()
    lines, ok = asyncio.run(run(args.requests, args.seeds, args.concurrency))
    print("\n".join(lines))
    if args.record:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for line in lines:
            if line.startswith("seed "):
                _, method, code, count = (part.strip() for part in line.split("|"))
                counts[(method, code)] += int(count)
        summary = [line for line in lines if not line.startswith("seed ")]
        body = (
            "\n".join(f"- {line}" for line in summary)
            + "\n\n| method | status | count (all seeds) |\n|---|---|---|\n"
            + "\n".join(f"| {m} | {c} | {n} |" for (m, c), n in sorted(counts.items()))
        )
        goal = (
            "(issue 11) only documented status codes, never UNKNOWN or INTERNAL, and a round "
            f"still commits afterwards: {'met' if ok else 'not met'}"
        )
        record_section("Request fuzzing: malformed requests on every RPC", body, goal=goal)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
