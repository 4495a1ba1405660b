"""X25519 key pairs and the HKDF-SHA256 key agreement every shared secret comes from.

Each device holds two pairs per session: one whose agreements key the share encryption, one
whose agreements seed the pairwise masks. Keeping them apart means revealing a dropped
device's mask key (to remove its masks) reveals nothing about the encrypted shares it sent.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_runtime.secagg.errors import SecAggError

public_key_bytes = 32
private_key_bytes = 32
derived_key_bytes = 32
# HKDF `info` labels: a key derived for one purpose is never valid for another.
SHARE_ENCRYPTION_INFO = b"overnight secagg v1 share encryption"
PAIRWISE_MASK_INFO = b"overnight secagg v1 pairwise mask"


@dataclasses.dataclass(frozen=True)
class KeyPair:
    private_key: X25519PrivateKey

    @staticmethod
    def generate() -> KeyPair:
        return KeyPair(X25519PrivateKey.generate())

    @staticmethod
    def from_private_bytes(data: bytes) -> KeyPair:
        if len(data) != private_key_bytes:
            raise SecAggError(f"an X25519 private key is {private_key_bytes} bytes")
        return KeyPair(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes_raw()

    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public_key(data: bytes) -> None:
    """Raises SecAggError unless `data` is a well-formed X25519 public key."""
    if len(data) != public_key_bytes:
        raise SecAggError(f"an X25519 public key is {public_key_bytes} bytes, got {len(data)}")
    X25519PublicKey.from_public_bytes(data)


def agree(own: KeyPair, peer_public: bytes, session_id: bytes, info: bytes) -> bytes:
    """The 32-byte key two devices share: HKDF(X25519(own, peer)), salted by the session.

    Both ends compute the same key (X25519 is symmetric); the session id as salt keeps keys
    of different sessions apart even if a device reused a key pair by mistake.
    """
    check_public_key(peer_public)
    try:
        shared = own.private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # an all-zero result: a low-order public key
        raise SecAggError(f"unusable peer public key: {exc}") from exc
    return HKDF(
        algorithm=hashes.SHA256(), length=derived_key_bytes, salt=session_id, info=info
    ).derive(shared)
