"""Upload ingest: the coordinator vs a bare gRPC server receiving the same bytes.

Each server runs as a separate process on loopback. 100 clients upload an update of a
McMahan-CNN-sized model (1,663,370 float32 values, 6.65 MB) in 1 MiB chunks, `concurrency` at
a time. The bare servers implement the same UploadUpdate RPC and discard the bytes (one parses
each chunk with the generated stub, one takes the raw bytes unparsed); the
coordinator validates, decodes and accumulates each update and commits the round when the
last one arrives. Also reported: the coordinator's peak resident memory above idle during the
uploads, in model sizes (goal: under 20; a list of updates would need 100).

`--metrics-overhead` instead runs two coordinators side by side, one serving Prometheus
metrics (`--metrics-address`, scraped each repeat) and one without, interleaved, and reports
what the metrics cost the same uploads in the coordinator's CPU time per upload and in wall
time, each as the median of per-repeat paired ratios (goal: at most 3%).

Run: .venv/bin/python -m benchmarks.ingest_benchmark [--uploads 100 --concurrency 10]
     .venv/bin/python -m benchmarks.ingest_benchmark --metrics-overhead [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.machine import record_figures
from benchmarks.process_stats import cpu_seconds
from device_runtime import constants, identity
from device_runtime.transport import CoordinatorClient
from protos import common_pb2, device_pb2, device_pb2_grpc
from server.data_dir import store_file_name

REPO = pathlib.Path(__file__).resolve().parents[1]
ENROLLMENT_SECRET = b"ingest-benchmark-enrollment-secret"

UPLOAD_METHOD = "/overnight.v1.DeviceService/UploadUpdate"
NUM_PARAMETERS = 1_663_370  # the McMahan et al. CNN for 10 classes

# argv[2] "protobuf": the generated registration, each chunk parsed into an UploadChunk;
# "raw": each chunk's bytes handed over as received, not parsed at all (the floor).
BARE_SERVER = """
import asyncio, sys, grpc
from protos import device_pb2, device_pb2_grpc
from device_runtime import constants

class Bare(device_pb2_grpc.DeviceServiceServicer):
    async def UploadUpdate(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return device_pb2.UploadResponse()

async def main():
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", constants.max_message_bytes)])
    if sys.argv[2] == "raw":
        upload = grpc.stream_unary_rpc_method_handler(
            Bare().UploadUpdate, request_deserializer=bytes,
            response_serializer=device_pb2.UploadResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "overnight.v1.DeviceService", {"UploadUpdate": upload}),))
    device_pb2_grpc.add_DeviceServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    print("listening", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_kib(pid: int, field: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found")


def _reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")


def _export_model(path: pathlib.Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from tflite_export.exporter import export_model

    # A dense model with exactly the CNN's parameter count: 64 -> 25,344 -> 1 -> 10 would be
    # odd; instead 8x8 -> Dense(h) -> Dense(10) with h chosen so the count is within 0.1%.
    hidden = round((NUM_PARAMETERS - 10) / (64 + 1 + 10))
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=(8, 8)),
            tf.keras.layers.Dense(hidden, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    export_model(model, path, batch_size=20)


def _chunks(
    token: bytes, payload: bytes, n: int, key: identity.DeviceKey | None = None
) -> list[device_pb2.UploadChunk]:
    header = device_pb2.UploadHeader(
        protocol_version=constants.PROTOCOL_VERSION,
        upload_token=token,
        example_count=10,
        num_elements=n,
        encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        metrics=common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=10, num_batches=1),
    )
    if key is not None:  # the coordinator takes a token only from the key it was issued to
        header.device_signature = key.sign(identity.upload_signed_bytes(header))
    size = constants.chunk_size_bytes
    return [device_pb2.UploadChunk(header=header)] + [
        device_pb2.UploadChunk(data=payload[i : i + size]) for i in range(0, len(payload), size)
    ]


async def _upload_all(
    address: str, streams: list[list[device_pb2.UploadChunk]], concurrency: int
) -> float:
    options = [("grpc.max_send_message_length", constants.max_message_bytes)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        gate = asyncio.Semaphore(concurrency)

        async def one(stream: list[device_pb2.UploadChunk]) -> None:
            async with gate:
                await stub.UploadUpdate(iter(stream), timeout=300)

        start = time.perf_counter()
        await asyncio.gather(*(one(s) for s in streams))
        return time.perf_counter() - start


async def _assignments(address: str, count: int) -> list[tuple[bytes, identity.DeviceKey]]:
    """Enrolled devices' upload tokens, each with the key it was issued to."""
    async with grpc.aio.insecure_channel(address) as channel:
        tokens = []
        while len(tokens) < count:
            client = CoordinatorClient(address, channel=channel)
            await client.enroll("bench", ENROLLMENT_SECRET)
            answer = await client.check_in("bench", 10)
            if answer.WhichOneof("outcome") != "assignment":
                # The round driver commits the last round off the request path; the next
                # one opens once it has. A new device then, not this one: it must wait.
                await asyncio.sleep(0.05)
                continue
            tokens.append((answer.assignment.upload_token, client.key))
        return tokens


def _start(args: list[str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    for _ in range(3):  # `serve --metrics-address` says where its metrics are first
        line = process.stdout.readline()
        if "listening" in line:
            return process
        if not line.startswith("metrics on "):
            break
    raise RuntimeError(f"server {args} did not start")


def _start_coordinator(
    tmp: str,
    name: str,
    port: int,
    task: pathlib.Path,
    model: pathlib.Path,
    slots: int | None,
    *extra: str,
) -> subprocess.Popen[str]:
    secret = pathlib.Path(tmp) / "enrollment.secret"
    secret.write_bytes(ENROLLMENT_SECRET)
    slot_flags = ["--max-concurrent-uploads", str(slots)] if slots else []
    return _start(
        serve_command(port, pathlib.Path(tmp) / name, task, model, secret, [*slot_flags, *extra])
    )


def _task_file(tmp: str, uploads: int, rounds: int) -> pathlib.Path:
    task = pathlib.Path(tmp) / "task.toml"
    task.write_text(task_toml(uploads, rounds))
    return task


def _payload(model: pathlib.Path) -> tuple[int, bytes]:
    from device_runtime.model_file import read_manifest

    payload = np.random.default_rng(0).normal(size=NUM_PARAMETERS).astype("<f4")
    n = read_manifest(model.read_bytes()).num_parameters
    return n, payload[:n].tobytes() if n <= NUM_PARAMETERS else np.resize(payload, n).tobytes()


def serve_command(
    port: int,
    data_dir: pathlib.Path,
    task: pathlib.Path,
    model: pathlib.Path,
    secret: pathlib.Path,
    extra: list[str],
) -> list[str]:
    """`overnight serve` for the benchmark task (as arguments to the Python interpreter)."""
    return [
        "-m",
        "overnight",
        "serve",
        "--address",
        f"127.0.0.1:{port}",
        # Plaintext like the bare servers: this compares ingest, not TLS (see
        # benchmarks/tls_check_in.py for what TLS costs).
        "--insecure",
        "--admin-address",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--task",
        str(task),
        "--model",
        str(model),
        "--enrollment-secret-file",
        str(secret),
        "--exempt-network",
        "127.0.0.0/8",
        *extra,
    ]


def task_toml(uploads: int, rounds: int) -> str:
    """The benchmark task: one round per repeat, closing at `uploads` reports."""
    return (
        f'[task]\ntask_id = "ingest"\npopulation = "bench"\ntotal_rounds = {rounds}\n'
        f"target_reports = {uploads}\nover_selection = 1.0\nbatch_size = 20\n"
        "selection_deadline_s = 600\nreporting_deadline_s = 600\n"
    )


def run(
    uploads: int, concurrency: int, repeats: int, slots: int | None = None
) -> tuple[list[tuple[str, str]], str]:
    """The figures as (figure, value) rows, and the goals with whether they are met."""
    with tempfile.TemporaryDirectory() as tmp:
        model = pathlib.Path(tmp) / "big.tflite"
        print("exporting a model of the McMahan CNN's size ...", flush=True)
        _export_model(model)
        n, payload_bytes = _payload(model)
        task = _task_file(tmp, uploads, repeats + 1)
        bare_port, raw_port, ours_port = _free_port(), _free_port(), _free_port()
        bare = _start(["-c", BARE_SERVER, f"127.0.0.1:{bare_port}", "protobuf"])
        raw = _start(["-c", BARE_SERVER, f"127.0.0.1:{raw_port}", "raw"])
        ours = _start_coordinator(tmp, "state", ours_port, task, model, slots)
        bare_s: list[float] = []
        raw_s: list[float] = []
        ours_s: list[float] = []
        peaks: list[float] = []
        try:
            for repeat in range(repeats):
                for name, port, times in (("bare", bare_port, bare_s), ("raw", raw_port, raw_s)):
                    print(f"repeat {repeat + 1}/{repeats}: {name} server ...", flush=True)
                    streams = [_chunks(b"t" * 32, payload_bytes, n) for _ in range(uploads)]
                    times.append(
                        asyncio.run(_upload_all(f"127.0.0.1:{port}", streams, concurrency))
                    )
                tokens = asyncio.run(_assignments(f"127.0.0.1:{ours_port}", uploads))
                streams = [_chunks(t, payload_bytes, n, key) for t, key in tokens]
                idle = _memory_kib(ours.pid, "VmRSS")
                _reset_peak(ours.pid)
                print(f"repeat {repeat + 1}/{repeats}: coordinator ...", flush=True)
                ours_s.append(
                    asyncio.run(_upload_all(f"127.0.0.1:{ours_port}", streams, concurrency))
                )
                peak = _memory_kib(ours.pid, "VmHWM")
                peaks.append((peak - idle) * 1024 / len(payload_bytes))
                del streams
        finally:
            for process in (bare, raw, ours):
                process.terminate()
                process.wait(timeout=30)
    total_mb = uploads * len(payload_bytes) / 1e6
    bare_best, raw_best, ours_best = min(bare_s), min(raw_s), min(ours_s)

    def timing(label: str, best: float, all_s: list[float]) -> tuple[str, str]:
        listed = ", ".join(f"{s:.2f}" for s in all_s)
        return label, f"{best:.2f} s, {total_mb / best:.0f} MB/s (all: {listed} s)"

    peak_model_sizes = statistics.median(peaks)
    figures = [
        (
            "setting",
            f"{uploads} uploads of {n:,} float32 ({len(payload_bytes) / 1e6:.2f} MB) in "
            f"1 MiB chunks, {concurrency} concurrent, loopback, each server in its own "
            f"process; {repeats} alternating repeats, best of each",
        ),
        timing("bare gRPC server (generated stub, chunks parsed by protobuf)", bare_best, bare_s),
        timing("bare gRPC server (raw bytes, nothing parsed)", raw_best, raw_s),
        timing("coordinator (validate + accumulate + commit)", ours_best, ours_s),
        (
            "throughput ratio coordinator / bare, best of each",
            f"{bare_best / ours_best:.2f} against the generated-stub server, "
            f"{raw_best / ours_best:.2f} against the raw-bytes server (goal >= 0.8)",
        ),
        # Each repeat runs the three servers back to back: its ratios share the machine's
        # load at that moment, which best-of-each across repeats does not.
        (
            "throughput ratio per repeat (median over repeats)",
            f"{statistics.median(b / o for b, o in zip(bare_s, ours_s, strict=True)):.2f} "
            "against the generated-stub server, "
            f"{statistics.median(r / o for r, o in zip(raw_s, ours_s, strict=True)):.2f} "
            "against the raw-bytes server",
        ),
        (
            "coordinator peak RSS above idle during the uploads",
            f"{peak_model_sizes:.1f} model sizes (median over repeats; goal < 20)",
        ),
    ]
    met = bare_best / ours_best >= 0.8 and raw_best / ours_best >= 0.8 and peak_model_sizes < 20
    goal = (
        "throughput at least 0.8x a bare gRPC server's (best of each, against both bare "
        f"servers) and peak RSS under 20 model sizes: {'met' if met else 'not met'}"
    )
    return figures, goal


def _wait_committed(store: pathlib.Path, rounds: int) -> None:
    """Returns once the coordinator's store holds `rounds` committed rounds: the commit of
    the uploads just sent is durable, and its cost is in the process's CPU time."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            (committed,) = db.execute(
                "SELECT COUNT(*) FROM rounds WHERE state = 'committed'"
            ).fetchone()
        if committed >= rounds:
            return
        time.sleep(0.02)
    raise RuntimeError(f"round {rounds} did not commit in {store}")


def run_metrics_overhead(
    uploads: int, concurrency: int, repeats: int, slots: int | None = None
) -> tuple[list[tuple[str, str]], str]:
    """Two coordinators, metrics on and off, the same uploads interleaved.

    Each repeat runs both back to back, which one first alternating (off-on, on-off, ...), so
    a drift in the machine's load hits both alike; the ratio of the pair shares the load of
    its moment. Two measures per run: wall time of the uploads, and the coordinator process's
    CPU seconds from the first upload until its round's commit is durable. On a shared
    machine the wall time carries other processes' load; the process's own CPU time barely
    does, so it decides the goal.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model = pathlib.Path(tmp) / "big.tflite"
        print("exporting a model of the McMahan CNN's size ...", flush=True)
        _export_model(model)
        n, payload_bytes = _payload(model)
        task = _task_file(tmp, uploads, repeats + 1)
        off_port, on_port, metrics_port = _free_port(), _free_port(), _free_port()
        metrics_address = f"127.0.0.1:{metrics_port}"
        off = _start_coordinator(tmp, "off", off_port, task, model, slots)
        on = _start_coordinator(
            tmp, "on", on_port, task, model, slots, "--metrics-address", metrics_address
        )
        coordinators = {"off": (off, off_port), "on": (on, on_port)}
        wall: dict[str, list[float]] = {"off": [], "on": []}
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        try:
            for repeat in range(repeats):
                order = ["off", "on"] if repeat % 2 == 0 else ["on", "off"]
                for name in order:
                    process, port = coordinators[name]
                    tokens = asyncio.run(_assignments(f"127.0.0.1:{port}", uploads))
                    streams = [_chunks(t, payload_bytes, n, key) for t, key in tokens]
                    print(f"repeat {repeat + 1}/{repeats}: metrics {name} ...", flush=True)
                    cpu_before = cpu_seconds(process.pid)
                    wall[name].append(
                        asyncio.run(_upload_all(f"127.0.0.1:{port}", streams, concurrency))
                    )
                    if name == "on":
                        # A scrape per repeat (far more often than Prometheus would scrape
                        # uploads this fast), inside the measured span: its cost counts.
                        with urllib.request.urlopen(f"http://{metrics_address}/metrics") as page:
                            scraped = page.read().decode()
                    _wait_committed(pathlib.Path(tmp) / name / store_file_name, repeat + 1)
                    cpu[name].append((cpu_seconds(process.pid) - cpu_before) / uploads)
                    del streams
        finally:
            for process, _ in coordinators.values():
                process.terminate()
                process.wait(timeout=30)
    uploads_counted = sum(
        sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "overnight_rpcs_total"
        and sample.labels == {"method": UPLOAD_METHOD, "code": "OK"}
    )
    total_mb = uploads * len(payload_bytes) / 1e6

    def ratios(measure: dict[str, list[float]]) -> list[float]:
        return [on_s / off_s for on_s, off_s in zip(measure["on"], measure["off"], strict=True)]

    def paired(measure: dict[str, list[float]]) -> float:
        return statistics.median(ratios(measure))

    def spread(measure: dict[str, list[float]]) -> str:
        """The middle half of the paired ratios, and how many pairs had metrics on dearer:
        how far the median can be trusted on a machine this loaded."""
        quartiles = statistics.quantiles(ratios(measure), n=4) if repeats > 1 else [1, 1, 1]
        dearer = sum(r > 1 for r in ratios(measure))
        return (
            f"middle half {100 * (quartiles[0] - 1):+.1f}% to {100 * (quartiles[2] - 1):+.1f}%; "
            f"on dearer in {dearer} of {repeats} pairs"
        )

    def listed(all_s: list[float], unit: float = 1.0) -> str:
        return ", ".join(f"{s * unit:.2f}" for s in all_s)

    wall_overhead, cpu_overhead = paired(wall) - 1, paired(cpu) - 1
    best_wall = min(wall["on"]) / min(wall["off"]) - 1
    figures = [
        (
            "setting",
            f"{uploads} uploads of {n:,} float32 ({len(payload_bytes) / 1e6:.2f} MB) in 1 MiB "
            f"chunks, {concurrency} concurrent, loopback, two coordinators in their own "
            f"processes; {repeats} repeats of both back to back, alternating which goes first",
        ),
    ]
    for name, label in (
        ("off", "coordinator, metrics off"),
        ("on", "coordinator, metrics on (--metrics-address, scraped each repeat)"),
    ):
        figures += [
            (
                f"{label}: wall time of the uploads",
                f"median {statistics.median(wall[name]):.2f} s, best {min(wall[name]):.2f} s "
                f"({total_mb / min(wall[name]):.0f} MB/s); all: {listed(wall[name])} s",
            ),
            (
                f"{label}: coordinator CPU per upload, to the round's durable commit",
                f"median {1e3 * statistics.median(cpu[name]):.1f} ms; "
                f"all: {listed(cpu[name], 1e3)} ms",
            ),
        ]
    figures += [
        (
            "metrics overhead, coordinator CPU per upload (median of the paired ratios)",
            f"{100 * cpu_overhead:+.1f}% (goal <= +3%); {spread(cpu)}",
        ),
        (
            "metrics overhead, wall time (median of the paired ratios; best of each)",
            f"{100 * wall_overhead:+.1f}%; {100 * best_wall:+.1f}%; {spread(wall)}",
        ),
        ("uploads the metrics counted", f"{uploads_counted:.0f} of {uploads * repeats}"),
    ]
    met = cpu_overhead <= 0.03 and uploads_counted == uploads * repeats
    goal = (
        "metrics cost at most 3% of the coordinator's CPU per upload (median of paired "
        f"ratios; wall time {100 * wall_overhead:+.1f}%): {'met' if met else 'not met'}"
    )
    return figures, goal


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-concurrent-uploads",
        type=int,
        help="the coordinator's upload slots (default: overnight serve's default)",
    )
    parser.add_argument(
        "--metrics-overhead",
        action="store_true",
        help="compare a coordinator serving Prometheus metrics with one that does not",
    )
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    measure = run_metrics_overhead if args.metrics_overhead else run
    figures, goal = measure(
        args.uploads, args.concurrency, args.repeats, args.max_concurrent_uploads
    )
    print("\n".join(f"{name}: {value}" for name, value in [*figures, ("goal", goal)]))
    if not args.no_record:
        title = (
            "Upload ingest: metrics on vs off (issue 14)"
            if args.metrics_overhead
            else "Upload ingest: coordinator vs bare gRPC server (issue 4)"
        )
        record_figures(title, figures, goal=goal)


if __name__ == "__main__":
    main()
