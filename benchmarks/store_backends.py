"""The PostgreSQL store against the SQLite store, side by side in one run (issue 15).

1. Commit latency: `Store.commit_round` of a McMahan-CNN-sized model (1,663,370 float32,
   6.65 MB) with `tokens` counted uploads, on each store in this process, alternating; then
   reading the weights back (what a restart and a download do).
2. Upload ingest: two `overnight serve` processes, one on each store (the SQLite file in its
   data directory, and `--store postgresql://...`), each taking `uploads` uploads of that
   model in 1 MiB chunks, `concurrency` at a time, repeats alternating between them; timed
   until every upload is answered (ingest), and until the round's commit is visible in the
   store (round). Each repeat starts once the previous round is committed.
   Goal: PostgreSQL's ingest throughput at least 0.8x SQLite's.

PostgreSQL runs on this machine as a fresh server (tests/postgres_server.py) with its durable
defaults (fsync, synchronous_commit, full_page_writes on), over a unix socket; SQLite in WAL
mode as `overnight serve` uses it; both on the same disk.

Run: .venv/bin/python -m benchmarks.store_backends [--uploads 100 --concurrency 10
     --repeats 3 --commits 20]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import pathlib
import statistics
import tempfile
import time

import grpc
import numpy as np

from benchmarks import ingest_benchmark as ingest
from benchmarks.machine import record_figures
from device_runtime import identity
from device_runtime.transport import CoordinatorClient
from server.postgres_store import PostgresStore
from server.sqlite_store import SqliteStore
from server.store import RoundRecord, RoundState, Store
from tests.postgres_server import PostgresServer, running_postgres

Rows = list[tuple[str, str]]


def _commit_latency(
    stores: dict[str, Store], commits: int, tokens: int
) -> tuple[Rows, dict[str, float]]:
    base = np.random.default_rng(0).normal(size=ingest.NUM_PARAMETERS).astype("<f4").tobytes()
    commit_ms: dict[str, list[float]] = {name: [] for name in stores}
    read_ms: dict[str, list[float]] = {name: [] for name in stores}
    names = list(stores)
    for i in range(commits):
        weights = i.to_bytes(4, "little") + base[4:]  # a new model each round
        digest = hashlib.sha256(weights).hexdigest()
        record = RoundRecord(
            "bench", i + 1, RoundState.COMMITTED, tokens, tokens, 0, {}, 0.0, 1.0, digest
        )
        counted = [hashlib.sha256(f"{i}/{t}".encode()).hexdigest() for t in range(tokens)]
        for name in names if i % 2 == 0 else reversed(names):  # neither always goes first
            store = stores[name]
            started = time.perf_counter()
            store.commit_round(record, weights, counted)
            commit_ms[name].append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            assert store.get_resource(digest) == weights
            read_ms[name].append((time.perf_counter() - started) * 1e3)
    rows = []
    medians = {}
    for name in names:
        medians[name] = statistics.median(commit_ms[name])
        p90 = statistics.quantiles(commit_ms[name], n=10)[-1] if commits >= 2 else medians[name]
        rows.append(
            (
                f"commit of a 6.65 MB model with {tokens} counted uploads, {name}",
                f"median {medians[name]:.1f} ms, p90 {p90:.1f} ms, "
                f"read back median {statistics.median(read_ms[name]):.1f} ms ({commits} commits)",
            )
        )
    return rows, medians


async def _assignments_when_open(
    address: str, count: int, timeout_s: float = 300.0
) -> list[tuple[bytes, identity.DeviceKey]]:
    """Upload tokens of `count` newly enrolled devices. The previous round commits off the
    request path, so the next one may not be open yet: a device turned away is replaced by
    a new one a moment later (a turned-away device must keep away for its retry window)."""
    deadline = time.monotonic() + timeout_s
    tokens: list[tuple[bytes, identity.DeviceKey]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        while len(tokens) < count:
            client = CoordinatorClient(address, channel=channel)
            await client.enroll("bench", ingest.ENROLLMENT_SECRET)
            answer = await client.check_in("bench", 10)
            if answer.HasField("assignment"):
                tokens.append((answer.assignment.upload_token, client.key))
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"no round opened on {address} within {timeout_s:g} s")
            await asyncio.sleep(0.2)
    return tokens


def _wait_for_commits(store: Store, committed: int, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(r.state is RoundState.COMMITTED for r in store.rounds("ingest")) < committed:
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {committed} not committed within {timeout_s:g} s")
        time.sleep(0.01)


def _ingest(
    pg: PostgresServer, tmp: pathlib.Path, uploads: int, concurrency: int, repeats: int
) -> tuple[Rows, float]:
    model = tmp / "big.tflite"
    print("exporting a model of the McMahan CNN's size ...", flush=True)
    ingest._export_model(model)
    from device_runtime.model_file import read_manifest

    n = read_manifest(model.read_bytes()).num_parameters
    payload = np.resize(np.random.default_rng(1).normal(size=n).astype("<f4"), n).tobytes()
    task = tmp / "task.toml"
    task.write_text(ingest.task_toml(uploads, repeats + 1))
    secret = tmp / "enrollment.secret"
    secret.write_bytes(ingest.ENROLLMENT_SECRET)
    ports = {"SQLite": ingest._free_port(), "PostgreSQL": ingest._free_port()}
    database = pg.create_database()
    stores = {"SQLite": [], "PostgreSQL": ["--store", database]}
    servers = {
        name: ingest._start(
            ingest.serve_command(ports[name], tmp / name, task, model, secret, stores[name])
        )
        for name in ports
    }
    # Each coordinator's store, read beside it: a round's commit runs after its last upload
    # is answered, off the request path; the next repeat waits for it, so one store's slower
    # commit never overlaps the uploads being timed.
    observers: dict[str, Store] = {
        "SQLite": SqliteStore(tmp / "SQLite" / "coordinator.sqlite"),
        "PostgreSQL": PostgresStore(database),
    }
    upload_s: dict[str, list[float]] = {name: [] for name in ports}
    round_s: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for repeat in range(repeats):
            order = list(ports) if repeat % 2 == 0 else list(reversed(ports))
            for name in order:
                address = f"127.0.0.1:{ports[name]}"
                tokens = asyncio.run(_assignments_when_open(address, uploads))
                streams = [ingest._chunks(t, payload, n, key) for t, key in tokens]
                print(f"repeat {repeat + 1}/{repeats}: coordinator on {name} ...", flush=True)
                started = time.perf_counter()
                upload_s[name].append(
                    asyncio.run(ingest._upload_all(address, streams, concurrency))
                )
                _wait_for_commits(observers[name], repeat + 1)
                round_s[name].append(time.perf_counter() - started)
                del streams
    finally:
        for store in observers.values():
            store.close()
        for process in servers.values():
            process.terminate()
            process.wait(timeout=60)
    total_mb = uploads * len(payload) / 1e6
    rows: Rows = []
    for label, seconds in (
        ("ingest (every upload answered)", upload_s),
        ("round (every upload answered and the commit durable)", round_s),
    ):
        for name, times in seconds.items():
            listed = ", ".join(f"{s:.2f}" for s in times)
            rows.append(
                (
                    f"{label}, coordinator on {name}",
                    f"{min(times):.2f} s, {total_mb / min(times):.0f} MB/s (all: {listed} s)",
                )
            )
        best = min(seconds["SQLite"]) / min(seconds["PostgreSQL"])
        per_repeat = statistics.median(
            s / p for s, p in zip(seconds["SQLite"], seconds["PostgreSQL"], strict=True)
        )
        rows.append(
            (
                f"{label}: throughput PostgreSQL / SQLite",
                f"{best:.2f} best of each, {per_repeat:.2f} median per repeat",
            )
        )
    ratio = min(upload_s["SQLite"]) / min(upload_s["PostgreSQL"])
    rows.insert(
        0,
        (
            "ingest setting",
            f"{uploads} uploads of {n:,} float32 ({len(payload) / 1e6:.2f} MB) in 1 MiB chunks, "
            f"{concurrency} concurrent, loopback plaintext, each coordinator in its own process; "
            f"{repeats} alternating repeats",
        ),
    )
    return rows, ratio


def run(
    uploads: int, concurrency: int, repeats: int, commits: int, tokens: int
) -> tuple[Rows, str]:
    with running_postgres(durable=True) as pg, tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        print(f"{commits} commits on each store ...", flush=True)
        stores: dict[str, Store] = {
            "SQLite": SqliteStore(tmp / "commit.sqlite"),
            "PostgreSQL": PostgresStore(pg.create_database()),
        }
        try:
            commit_rows, medians = _commit_latency(stores, commits, tokens)
        finally:
            for store in stores.values():
                store.close()
        ingest_rows, ratio = _ingest(pg, tmp, uploads, concurrency, repeats)
    commit_ratio = medians["PostgreSQL"] / medians["SQLite"]
    figures = [
        *commit_rows,
        ("commit latency PostgreSQL / SQLite (medians)", f"{commit_ratio:.2f}x"),
        *ingest_rows,
        (
            "stores",
            "SQLite WAL, synchronous=NORMAL, 16 KiB pages; PostgreSQL 15 (local, unix socket), "
            "fsync and synchronous_commit on, weights stored uncompressed (STORAGE EXTERNAL)",
        ),
    ]
    goal = (
        "ingest throughput on PostgreSQL at least 0.8x SQLite's (best of each): "
        f"{'met' if ratio >= 0.8 else 'not met'} ({ratio:.2f})"
    )
    return figures, goal


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commits", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=100, help="counted uploads per commit")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    figures, goal = run(args.uploads, args.concurrency, args.repeats, args.commits, args.tokens)
    print("\n".join(f"{name}: {value}" for name, value in [*figures, ("goal", goal)]))
    if not args.no_record:
        record_figures("Stores: PostgreSQL vs SQLite (issue 15)", figures, goal=goal)


if __name__ == "__main__":
    main()
