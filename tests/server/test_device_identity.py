"""Attacks on device identity over real gRPC: each refused with its documented status code
(protos/device.proto) and with nothing changed in the store."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest

from device_runtime import constants, identity
from protos import common_pb2, device_pb2, device_pb2_grpc
from server.errors import PermissionDenied
from server.sqlite_store import SqliteStore
from tests.fakes import FakeClock
from tests.harness import POPULATION, RunningCoordinator, running_coordinator, task_config
from tests.identities import (
    device_key,
    enroll_request,
    identities_for,
    signed_check_in,
)

V = constants.PROTOCOL_VERSION
Body = Callable[[RunningCoordinator, device_pb2_grpc.DeviceServiceStub, FakeClock], Awaitable[None]]


def _rows(path: pathlib.Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, read through a connection of its own."""
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


def _attack(
    tmp_path: pathlib.Path, model_bytes: bytes, prepare: Body, attack: Body
) -> tuple[grpc.StatusCode, str, dict[str, list[tuple[object, ...]]], RunningCoordinator]:
    """Runs `prepare`, snapshots the store, runs `attack` (which must fail) and returns its
    status, details, and the store's rows that changed (empty when nothing did)."""
    path = tmp_path / "s.sqlite"
    clock = FakeClock()
    seen: dict[str, object] = {}

    async def scenario() -> None:
        async with (
            running_coordinator(str(path), model_bytes, task_config(), clock) as running,
            running.device_channel() as channel,
        ):
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            await prepare(running, stub, clock)
            before = _rows(path)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await attack(running, stub, clock)
            after = _rows(path)
            seen["code"], seen["details"] = info.value.code(), info.value.details()
            seen["changed"] = {t: after[t] for t in after if after[t] != before.get(t)}
            seen["running"] = running

    asyncio.run(scenario())
    return seen["code"], seen["details"], seen["changed"], seen["running"]  # type: ignore[return-value]


async def _enroll(stub: device_pb2_grpc.DeviceServiceStub, name: str) -> None:
    await stub.Enroll(enroll_request(device_key(name)))


async def _nothing(running: RunningCoordinator, stub, clock: FakeClock) -> None:
    return None


async def _enrolled_a(running: RunningCoordinator, stub, clock: FakeClock) -> None:
    await _enroll(stub, "a")


def _header(token: bytes, n: int) -> device_pb2.UploadHeader:
    return device_pb2.UploadHeader(
        protocol_version=V,
        upload_token=token,
        example_count=5,
        num_elements=n,
        encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
        metrics=common_pb2.ClientMetrics(num_examples=5, num_batches=1),
    )


# ----- enrollment --------------------------------------------------------------------------


def test_enrollment_with_a_wrong_secret_is_permission_denied(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        await stub.Enroll(enroll_request(device_key("a"), secret=b"guessed-secret-0123456789"))

    code, details, changed, _ = _attack(tmp_path, model_bytes, _nothing, attack)

    assert code is grpc.StatusCode.PERMISSION_DENIED and "enrollment secret" in details
    assert changed == {}


def test_enrollment_not_signed_by_its_key_is_unauthenticated(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        request = enroll_request(device_key("a"))
        request.public_key = device_key("victim").public_key_der  # someone else's key
        await stub.Enroll(request)

    code, _, changed, _ = _attack(tmp_path, model_bytes, _nothing, attack)

    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert changed == {}


def test_enrollment_of_a_malformed_key_is_invalid_argument(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        request = enroll_request(device_key("a"))
        request.public_key = b"\x30\x03not a key"
        await stub.Enroll(request)

    code, details, changed, _ = _attack(tmp_path, model_bytes, _nothing, attack)

    assert code is grpc.StatusCode.INVALID_ARGUMENT and "public_key" in details
    assert changed == {}


def test_enrolling_twice_returns_the_key_hash_and_stores_it_once(tmp_path, model_bytes) -> None:
    answers = []

    async def scenario():
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes) as running,
            running.device_channel() as channel,
        ):
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            for _ in range(2):
                answers.append(await stub.Enroll(enroll_request(device_key("a"))))
            return running.store.enrolled_devices(POPULATION)

    enrolled = asyncio.run(scenario())

    key = device_key("a")
    assert [a.device_id for a in answers] == [key.device_id] * 2
    assert key.device_id == identity.device_id_of(key.public_key_der)
    assert enrolled == 1


# ----- check-in ----------------------------------------------------------------------------


def test_check_in_of_an_unenrolled_key_is_unauthenticated(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        await stub.CheckIn(signed_check_in("stranger", clock.now()))

    code, details, changed, running = _attack(tmp_path, model_bytes, _enrolled_a, attack)

    assert code is grpc.StatusCode.UNAUTHENTICATED and "not enrolled" in details
    assert changed == {}
    assert running.coordinator.task("t1").current is None  # no round was opened for it


def test_a_forged_check_in_signature_is_unauthenticated(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        # Claims device a's id, signed by another key.
        request = signed_check_in("mallory", clock.now())
        request.device_id = device_key("a").device_id
        await stub.CheckIn(request)

    code, details, changed, running = _attack(tmp_path, model_bytes, _enrolled_a, attack)

    assert code is grpc.StatusCode.UNAUTHENTICATED and "signature" in details
    assert changed == {}
    assert running.coordinator.task("t1").current is None


def test_a_check_in_with_a_changed_field_is_unauthenticated(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        request = signed_check_in("a", clock.now(), example_count=10)
        request.example_count = 10_000  # tampered after signing
        await stub.CheckIn(request)

    code, _, changed, _ = _attack(tmp_path, model_bytes, _enrolled_a, attack)

    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert changed == {}


def test_a_replayed_check_in_is_unauthenticated(tmp_path, model_bytes) -> None:
    recorded: list[device_pb2.CheckInRequest] = []

    async def prepare(running, stub, clock):
        await _enroll(stub, "a")
        recorded.append(signed_check_in("a", clock.now()))
        await stub.CheckIn(recorded[0])  # the genuine one: assigned
        clock.advance(120.0)  # still inside the freshness window, past the retry window

    async def attack(running, stub, clock):
        await stub.CheckIn(recorded[0])

    code, details, changed, running = _attack(tmp_path, model_bytes, prepare, attack)

    assert code is grpc.StatusCode.UNAUTHENTICATED and "replayed" in details
    assert changed == {}
    assert running.coordinator.task("t1").current.selected == 1


@pytest.mark.parametrize("skew_s", [-301.0, 301.0])
def test_a_stale_or_future_timestamp_is_unauthenticated(tmp_path, model_bytes, skew_s) -> None:
    async def attack(running, stub, clock):
        await stub.CheckIn(signed_check_in("a", clock.now() + skew_s))

    code, details, changed, _ = _attack(tmp_path, model_bytes, _enrolled_a, attack)

    assert code is grpc.StatusCode.UNAUTHENTICATED and "timestamp" in details
    assert changed == {}


def test_a_device_id_that_is_not_a_key_hash_is_invalid_argument(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        request = signed_check_in("a", clock.now())
        request.device_id = "phone-00001"
        await stub.CheckIn(request)

    code, details, changed, _ = _attack(tmp_path, model_bytes, _enrolled_a, attack)

    assert code is grpc.StatusCode.INVALID_ARGUMENT and "SHA-256" in details
    assert changed == {}


# ----- upload tokens -----------------------------------------------------------------------


async def _a_and_b_assigned(running, stub, clock) -> None:
    for name in ("a", "b"):
        await _enroll(stub, name)
        response = await stub.CheckIn(signed_check_in(name, clock.now()))
        running.tokens = getattr(running, "tokens", {})
        running.tokens[name] = response.assignment.upload_token


def test_an_upload_with_another_devices_token_is_permission_denied(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        n = running.coordinator.task("t1").record.num_parameters
        header = _header(running.tokens["a"], n)  # a's token, signed by b
        header.device_signature = device_key("b").sign(identity.upload_signed_bytes(header))
        chunks = [device_pb2.UploadChunk(header=header)]
        chunks.append(device_pb2.UploadChunk(data=np.zeros(n, "<f4").tobytes()))
        await stub.UploadUpdate(iter(chunks))

    code, details, changed, running = _attack(tmp_path, model_bytes, _a_and_b_assigned, attack)

    assert code is grpc.StatusCode.PERMISSION_DENIED and "issued to" in details
    assert changed == {}
    assert running.coordinator.task("t1").current.reported == 0


def test_an_unsigned_upload_is_permission_denied(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        n = running.coordinator.task("t1").record.num_parameters
        chunks = [device_pb2.UploadChunk(header=_header(running.tokens["a"], n))]
        await stub.UploadUpdate(iter(chunks))

    code, _, changed, running = _attack(tmp_path, model_bytes, _a_and_b_assigned, attack)

    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert running.coordinator.task("t1").current.reported == 0


def test_a_failure_report_with_another_devices_token_is_permission_denied(
    tmp_path, model_bytes
) -> None:
    async def attack(running, stub, clock):
        report = device_pb2.FailureReport(
            protocol_version=V,
            upload_token=running.tokens["a"],
            cause=device_pb2.FailureReport.INTERRUPTED,
        )
        report.device_signature = device_key("b").sign(identity.failure_signed_bytes(report))
        await stub.ReportFailure(report)

    code, _, changed, running = _attack(tmp_path, model_bytes, _a_and_b_assigned, attack)

    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert changed == {}
    assert running.coordinator.task("t1").current.dropped == 0


def test_the_owner_of_a_token_uploads_with_it(tmp_path, model_bytes) -> None:
    async def scenario():
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes) as running,
            running.device_channel() as channel,
        ):
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            clock_now = (await stub.Enroll(enroll_request(device_key("owner")))).server_time_s
            response = await stub.CheckIn(signed_check_in("owner", clock_now))
            n = running.coordinator.task("t1").record.num_parameters
            header = _header(response.assignment.upload_token, n)
            header.device_signature = device_key("owner").sign(identity.upload_signed_bytes(header))
            chunks = [device_pb2.UploadChunk(header=header)]
            chunks.append(device_pb2.UploadChunk(data=np.zeros(n, "<f4").tobytes()))
            await stub.UploadUpdate(iter(chunks))
            return running.coordinator.task("t1").current.reported

    assert asyncio.run(scenario()) == 1


def test_enrollment_of_a_key_of_an_unsupported_kind_is_invalid_argument(
    tmp_path, model_bytes
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import dsa

    dsa_key = dsa.generate_private_key(key_size=1024).public_key()

    async def attack(running, stub, clock):
        request = enroll_request(device_key("a"))
        request.public_key = dsa_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        await stub.Enroll(request)

    code, _, changed, _ = _attack(tmp_path, model_bytes, _nothing, attack)

    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert changed == {}


def test_enrollment_with_an_oversized_population_is_invalid_argument(tmp_path, model_bytes) -> None:
    async def attack(running, stub, clock):
        await stub.Enroll(enroll_request(device_key("a"), population="p" * 1000))

    code, details, changed, _ = _attack(tmp_path, model_bytes, _nothing, attack)

    assert code is grpc.StatusCode.INVALID_ARGUMENT and "population" in details
    assert changed == {}


def test_a_check_in_replayed_after_a_restart_is_unauthenticated(tmp_path) -> None:
    from server.errors import Unauthenticated
    from server.sqlite_store import SqliteStore
    from tests.identities import identities_for

    clock = FakeClock()
    store = SqliteStore(str(tmp_path / "s.sqlite"))
    before_restart = identities_for(store, clock)
    before_restart.enroll(enroll_request(device_key("a")))
    recorded = signed_check_in("a", clock.now())
    before_restart.verify_check_in(recorded)  # accepted; its nonce dies with the process
    clock.advance(5.0)
    after_restart = identities_for(store, clock)

    with pytest.raises(Unauthenticated, match="signed before the coordinator started"):
        after_restart.verify_check_in(recorded)
    assert (
        after_restart.verify_check_in(signed_check_in("a", clock.now()))
        == device_key("a").device_id
    )


def test_an_upload_header_is_verified_once_and_a_forgery_still_fails(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(str(tmp_path / "s.sqlite"))
    identities = identities_for(store, FakeClock())
    owner, other = device_key("owner"), device_key("other")
    identities.enroll(enroll_request(owner))
    device_id = identity.device_id_of(owner.public_key_der)
    signed = b"an upload header's signed bytes"
    verifications = []
    real = identity.verifies
    monkeypatch.setattr(
        identity,
        "verifies",
        lambda *a: verifications.append(a) or real(*a),  # a spy
    )

    signature = owner.sign(signed)
    # The header is checked before its payload is read and again when it is added.
    identities.verify_report(signature, signed, device_id, POPULATION, checked_again=True)
    identities.verify_report(signature, signed, device_id, POPULATION)

    assert len(verifications) == 1
    assert identities.tracked_devices()["verified_reports"] == 0  # the second check took it
    with pytest.raises(PermissionDenied):
        identities.verify_report(other.sign(signed), signed, device_id, POPULATION)
    store.close()
