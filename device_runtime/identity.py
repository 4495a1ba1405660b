"""A device's identity: its ECDSA P-256 key, and the bytes it signs for each message.

P-256 is the curve Android's hardware keystore supports, so a phone can keep this key in
secure hardware; this module keeps it in a 0600 file in the device's cache directory. The
device id is the SHA-256 (hex) of the public key's DER SubjectPublicKeyInfo: the coordinator
derives it, the device never chooses it.

The signed bytes of a message are a domain label (one per message kind, so a signature on one
kind is never valid for another) and the message's deterministic protobuf serialization with
its signature field empty. Both sides build them here, from one implementation; the
coordinator imports this module to verify.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import struct
from typing import Protocol, TypeVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protos import device_pb2, secagg_pb2

nonce_bytes = 16
key_file_name = "device_key.pem"

ENROLL_LABEL = b"overnight-enroll-v1\n"
CHECK_IN_LABEL = b"overnight-checkin-v1\n"
UPLOAD_LABEL = b"overnight-upload-v1\n"
FAILURE_LABEL = b"overnight-failure-v1\n"
SECAGG_KEYS_LABEL = b"overnight-secagg-keys-v1\n"

_SIGNATURE = ec.ECDSA(hashes.SHA256())
# The group order of P-256: private scalars are in [1, n - 1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class IdentityError(ValueError):
    """A key that is not a P-256 key, or a key file that cannot be used."""


def device_id_of(public_key_der: bytes) -> str:
    return hashlib.sha256(public_key_der).hexdigest()


class DeviceKey:
    """The device's private key. Sign with it; share only `public_key_der` and `device_id`."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise IdentityError(f"device keys are P-256, not {private_key.curve.name}")
        self._private = private_key
        self.public_key_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.device_id = device_id_of(self.public_key_der)

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceKey:
        """A key derived from `seed` (for emulated fleets: reproducible, and no entropy pool
        drained by 10,000 phones). Never for a real installation."""
        digest = hashlib.sha512(b"overnight-device-key\n" + seed).digest()
        scalar = int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1
        return cls(ec.derive_private_key(scalar, ec.SECP256R1()))

    @classmethod
    def load_or_create(cls, directory: str | pathlib.Path) -> DeviceKey:
        """The installation's key from `directory`, made on first run (file mode 0600)."""
        path = pathlib.Path(directory) / key_file_name
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            key = cls.generate()
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = key._private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # O_EXCL: two processes starting at once cannot both write a key; the loser reads.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return cls.load_or_create(directory)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            return key
        if path.stat().st_mode & 0o077:
            raise IdentityError(f"{path} is readable by others; it must be mode 0600")
        private = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{path} does not hold an EC private key")
        return cls(private)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data, _SIGNATURE)


def load_public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    """Parses a DER SubjectPublicKeyInfo; raises IdentityError unless it is a P-256 key."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"not a DER public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError("the public key is not an EC P-256 key")
    return key


def verifies(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data, _SIGNATURE)
    except (InvalidSignature, ValueError):
        return False
    return True


class _Message(Protocol):
    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


M = TypeVar("M", bound=_Message)


def _without(message: M, field: str) -> bytes:
    copy = type(message)()
    copy.CopyFrom(message)  # type: ignore[attr-defined]
    copy.ClearField(field)  # type: ignore[attr-defined]
    return copy.SerializeToString(deterministic=True)


def enroll_signed_bytes(request: device_pb2.EnrollRequest) -> bytes:
    return ENROLL_LABEL + _without(request, "signature")


def check_in_signed_bytes(request: device_pb2.CheckInRequest) -> bytes:
    return CHECK_IN_LABEL + _without(request, "signature")


def upload_signed_bytes(header: device_pb2.UploadHeader) -> bytes:
    return UPLOAD_LABEL + _without(header, "device_signature")


def failure_signed_bytes(report: device_pb2.FailureReport) -> bytes:
    return FAILURE_LABEL + _without(report, "device_signature")


def secagg_keys_signed_bytes(
    session_id: bytes, client_id: int, keys: secagg_pb2.PairOfPublicKeys
) -> bytes:
    # Each variable-length part is length-prefixed, so no two inputs share signed bytes.
    parts = (session_id, keys.encryption_public_key, keys.mask_public_key)
    framed = b"".join(struct.pack(">I", len(part)) + part for part in parts)
    return SECAGG_KEYS_LABEL + struct.pack(">I", client_id) + framed


def sign_check_in(key: DeviceKey, request: device_pb2.CheckInRequest, now_s: float) -> None:
    """Fills device_id, timestamp, a fresh nonce and the signature of `request`."""
    request.device_id = key.device_id
    request.timestamp_ms = int(now_s * 1000)
    request.nonce = os.urandom(nonce_bytes)
    request.signature = key.sign(check_in_signed_bytes(request))
