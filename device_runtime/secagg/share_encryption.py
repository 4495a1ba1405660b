"""AES-256-GCM encryption of the key shares one device sends another through the server.

The associated data binds a ciphertext to its session, sender and recipient, so the server
cannot replay it to another device or pass it off as coming from someone else: any change
fails authentication at the recipient.
"""

from __future__ import annotations

import dataclasses
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from device_runtime.secagg import shamir
from device_runtime.secagg.errors import SecAggError

nonce_bytes = 12
tag_bytes = 16
_plaintext = struct.Struct(f">II{shamir.share_value_bytes}s{shamir.share_value_bytes}s")
ciphertext_bytes = nonce_bytes + _plaintext.size + tag_bytes


@dataclasses.dataclass(frozen=True)
class KeyShares:
    """What device `sender` gives neighbour `recipient`: its shares of the sender's secrets."""

    sender_id: int
    recipient_id: int
    mask_key_share: shamir.Share  # of the sender's mask private key
    self_mask_seed_share: shamir.Share  # of the sender's self-mask seed


def _associated_data(session_id: bytes, sender_id: int, recipient_id: int) -> bytes:
    return b"overnight secagg v1 shares" + session_id + struct.pack(">II", sender_id, recipient_id)


def encrypt(key: bytes, session_id: bytes, shares: KeyShares) -> bytes:
    plaintext = _plaintext.pack(
        shares.sender_id,
        shares.recipient_id,
        shares.mask_key_share.value_bytes(),
        shares.self_mask_seed_share.value_bytes(),
    )
    nonce = os.urandom(nonce_bytes)
    aad = _associated_data(session_id, shares.sender_id, shares.recipient_id)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(
    key: bytes, session_id: bytes, sender_id: int, recipient_id: int, ciphertext: bytes
) -> KeyShares:
    """Raises SecAggError when the ciphertext was tampered with or is not for this pair."""
    if len(ciphertext) != ciphertext_bytes:
        raise SecAggError(
            f"key shares from client {sender_id} are {len(ciphertext)} bytes, "
            f"expected {ciphertext_bytes}"
        )
    aad = _associated_data(session_id, sender_id, recipient_id)
    try:
        plaintext = AESGCM(key).decrypt(ciphertext[:nonce_bytes], ciphertext[nonce_bytes:], aad)
    except InvalidTag:
        raise SecAggError(
            f"key shares from client {sender_id} fail authentication (tampered or misrouted)"
        ) from None
    sender, recipient, mask_key_value, seed_value = _plaintext.unpack(plaintext)
    if (sender, recipient) != (sender_id, recipient_id):
        raise SecAggError("key shares name another sender or recipient")
    return KeyShares(
        sender_id,
        recipient_id,
        shamir.share_from_bytes(recipient_id, mask_key_value),
        shamir.share_from_bytes(recipient_id, seed_value),
    )
