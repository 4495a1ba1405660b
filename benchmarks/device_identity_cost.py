"""What device identity costs: keys, signing on the device, verification on the coordinator.

Median microseconds per operation over many repetitions (real `cryptography` ECDSA P-256,
real SQLite store). The coordinator's check-in cost is measured in-process, without gRPC, on
a coordinator whose population has a task whose round is full, so each check-in runs the
whole selection path and is rejected ROUND_FULL; "verify" is the identity part of it alone.
Run: `.venv/bin/python -m benchmarks.device_identity_cost [--record]`.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

from benchmarks.machine import record_section
from benchmarks.sybil_flood import SimClock, _export_model
from device_runtime import constants, identity
from protos import common_pb2, device_pb2
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.device_identity import DeviceIdentities
from server.enrollment.config import EnrollmentPolicy
from server.sqlite_store import SqliteStore

SECRET = b"identity-cost-enrollment-secret"


def _median_us(operation: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        operation()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


def _enroll_request(key: identity.DeviceKey) -> device_pb2.EnrollRequest:
    request = device_pb2.EnrollRequest(
        protocol_version=constants.PROTOCOL_VERSION,
        population="p",
        public_key=key.public_key_der,
        enrollment_secret=SECRET,
    )
    request.signature = key.sign(identity.enroll_signed_bytes(request))
    return request


def measure(model_bytes: bytes, data_dir: pathlib.Path, repeats: int) -> list[tuple[str, float]]:
    clock = SimClock()
    store = SqliteStore(data_dir / "cost.sqlite")
    identities = DeviceIdentities(store, clock, EnrollmentPolicy.shared_secret(SECRET))
    coordinator = Coordinator(
        store, clock, CoordinatorSettings(enforce_retry_windows=False), identities=identities
    )
    config = TaskConfig(
        task_id="t", population="p", target_reports=1, over_selection=1.0, batch_size=8
    )
    coordinator.register_task(config, model_bytes)
    seeds = iter(range(10**9))
    keys = [identity.DeviceKey.from_seed(f"k{i}".encode()) for i in range(repeats)]
    for key in keys:
        identities.enroll(_enroll_request(key))
    holder = keys[0]
    coordinator.check_in(_signed(holder, clock.now()))  # takes the round's only seat
    signed = iter([_signed(keys[i % len(keys)], clock.now()) for i in range(4 * repeats)])
    header = device_pb2.UploadHeader(
        protocol_version=constants.PROTOCOL_VERSION,
        upload_token=bytes(32),
        example_count=5,
        num_elements=4810,
        encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        metrics=common_pb2.ClientMetrics(num_examples=5, num_batches=1),
    )
    fresh = [identity.DeviceKey.generate() for _ in range(repeats)]
    fresh_requests = iter([_enroll_request(k) for k in fresh])
    request = device_pb2.CheckInRequest(
        protocol_version=constants.PROTOCOL_VERSION, population="p", example_count=5
    )
    rows = [
        ("device: generate a key (OS entropy)", _median_us(identity.DeviceKey.generate, repeats)),
        (
            "device: derive a key from a seed (emulated phones)",
            _median_us(lambda: identity.DeviceKey.from_seed(str(next(seeds)).encode()), repeats),
        ),
        (
            "device: sign a check-in (fill timestamp, nonce, signature)",
            _median_us(lambda: identity.sign_check_in(holder, request, clock.now()), repeats),
        ),
        (
            "device: sign an upload header",
            _median_us(lambda: holder.sign(identity.upload_signed_bytes(header)), repeats),
        ),
        (
            "coordinator: verify a check-in (key cached)",
            _median_us(lambda: identities.verify_check_in(next(signed)), repeats),
        ),
        (
            "coordinator: whole check-in, signed (verify + selection, rejected ROUND_FULL)",
            _median_us(lambda: coordinator.check_in(next(signed)), repeats),
        ),
        (
            "coordinator: enroll a new key (shared secret, SQLite insert)",
            _median_us(lambda: identities.enroll(next(fresh_requests)), repeats),
        ),
    ]
    identities._keys.clear()
    rows.insert(
        5,
        (
            "coordinator: verify a check-in (key read from SQLite and parsed)",
            _median_us(lambda: _uncached_verify(identities, next(signed)), repeats),
        ),
    )
    store.close()
    return rows


def _uncached_verify(identities: DeviceIdentities, request: device_pb2.CheckInRequest) -> None:
    identities._keys.clear()
    identities.verify_check_in(request)


def _signed(key: identity.DeviceKey, now: float) -> device_pb2.CheckInRequest:
    request = device_pb2.CheckInRequest(
        protocol_version=constants.PROTOCOL_VERSION, population="p", example_count=5
    )
    identity.sign_check_in(key, request, now)
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = _export_model(pathlib.Path(tmp))
        rows = measure(model_bytes, pathlib.Path(tmp), args.repeats)
    phones = 10_000
    derive_s = phones * dict(rows)["device: derive a key from a seed (emulated phones)"] / 1e6
    table = ["| operation | median µs |", "|---|---|"]
    table += [f"| {name} | {us:.1f} |" for name, us in rows]
    body = "\n".join(table) + (
        f"\n\nKeys for {phones:,} emulated phones: {derive_s:.2f} s of one core. "
        f"Median of {args.repeats} repetitions each. Run: "
        "`.venv/bin/python -m benchmarks.device_identity_cost --record`."
    )
    print(body)
    if args.record:
        record_section("Device identity cost (keys, signatures, verification) (issue 11)", body)


if __name__ == "__main__":
    main()
