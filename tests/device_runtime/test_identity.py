"""The device's key: made once per installation, kept private, its hash the device id."""

from __future__ import annotations

import pathlib

import pytest

from device_runtime import constants, identity
from protos import device_pb2


def test_the_key_is_made_on_first_run_with_mode_0600_and_reused(tmp_path: pathlib.Path) -> None:
    first = identity.DeviceKey.load_or_create(tmp_path / "cache")

    again = identity.DeviceKey.load_or_create(tmp_path / "cache")

    key_file = tmp_path / "cache" / identity.key_file_name
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert again.device_id == first.device_id
    assert first.device_id == identity.device_id_of(first.public_key_der)


def test_a_key_file_others_can_read_is_refused(tmp_path: pathlib.Path) -> None:
    identity.DeviceKey.load_or_create(tmp_path)
    (tmp_path / identity.key_file_name).chmod(0o644)

    with pytest.raises(identity.IdentityError, match="0600"):
        identity.DeviceKey.load_or_create(tmp_path)


def test_seeded_keys_are_reproducible_and_distinct() -> None:
    a1, a2 = (identity.DeviceKey.from_seed(b"a") for _ in range(2))
    b = identity.DeviceKey.from_seed(b"b")

    assert a1.device_id == a2.device_id != b.device_id


def test_a_check_in_signature_verifies_only_for_the_signed_fields() -> None:
    key = identity.DeviceKey.generate()
    request = device_pb2.CheckInRequest(
        protocol_version=constants.PROTOCOL_VERSION, population="p", example_count=3
    )
    identity.sign_check_in(key, request, now_s=1000.0)
    public = identity.load_public_key(key.public_key_der)

    tampered = device_pb2.CheckInRequest()
    tampered.CopyFrom(request)
    tampered.population = "q"

    assert identity.verifies(public, request.signature, identity.check_in_signed_bytes(request))
    assert not identity.verifies(
        public, request.signature, identity.check_in_signed_bytes(tampered)
    )
    assert request.timestamp_ms == 1_000_000 and len(request.nonce) == identity.nonce_bytes


def test_a_signature_for_one_message_kind_is_not_valid_for_another() -> None:
    key = identity.DeviceKey.generate()
    header = device_pb2.UploadHeader(upload_token=b"t" * 32)
    report = device_pb2.FailureReport(upload_token=b"t" * 32)
    signature = key.sign(identity.upload_signed_bytes(header))

    public = identity.load_public_key(key.public_key_der)
    assert not identity.verifies(public, signature, identity.failure_signed_bytes(report))


def test_a_non_p256_key_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    der = other.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    with pytest.raises(identity.IdentityError, match="P-256"):
        identity.load_public_key(der)
