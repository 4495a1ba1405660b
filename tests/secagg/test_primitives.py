"""Key agreement, share encryption and masks: the cryptography both sides share."""

import numpy as np
import pytest

from device_runtime.secagg import key_agreement, masking, shamir, share_encryption
from device_runtime.secagg.errors import SecAggError
from device_runtime.secagg.key_agreement import KeyPair

SESSION = b"s" * 16


def _shares(sender: int, recipient: int) -> share_encryption.KeyShares:
    mask_key_share = shamir.split(bytes(range(32)), 2, [recipient, recipient + 1])[0]
    seed_share = shamir.split(bytes(32), 2, [recipient, recipient + 1])[0]
    return share_encryption.KeyShares(sender, recipient, mask_key_share, seed_share)


def test_both_ends_agree_on_the_same_key_and_purposes_differ() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    info = key_agreement.PAIRWISE_MASK_INFO

    ab = key_agreement.agree(alice, bob.public_bytes(), SESSION, info)
    ba = key_agreement.agree(bob, alice.public_bytes(), SESSION, info)
    other = key_agreement.agree(alice, bob.public_bytes(), SESSION, b"another purpose")

    assert ab == ba
    assert len(ab) == 32
    assert other != ab


def test_malformed_public_keys_are_refused() -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        key_agreement.check_public_key(b"\x01" * 31)
    with pytest.raises(SecAggError, match="unusable"):
        key_agreement.agree(KeyPair.generate(), bytes(32), SESSION, b"x")  # low order point


def test_shares_decrypt_for_their_recipient() -> None:
    key = bytes(32)
    shares = _shares(3, 5)

    ciphertext = share_encryption.encrypt(key, SESSION, shares)

    assert len(ciphertext) == share_encryption.ciphertext_bytes
    assert share_encryption.decrypt(key, SESSION, 3, 5, ciphertext) == shares


@pytest.mark.parametrize("byte", [0, 20, share_encryption.ciphertext_bytes - 1])
def test_a_tampered_ciphertext_is_rejected(byte: int) -> None:
    key = bytes(32)
    ciphertext = bytearray(share_encryption.encrypt(key, SESSION, _shares(3, 5)))
    ciphertext[byte] ^= 0x01

    with pytest.raises(SecAggError, match="fail authentication"):
        share_encryption.decrypt(key, SESSION, 3, 5, bytes(ciphertext))


def test_a_ciphertext_replayed_to_another_pair_or_session_is_rejected() -> None:
    key = bytes(32)
    ciphertext = share_encryption.encrypt(key, SESSION, _shares(3, 5))

    with pytest.raises(SecAggError, match="fail authentication"):
        share_encryption.decrypt(key, SESSION, 4, 5, ciphertext)
    with pytest.raises(SecAggError, match="fail authentication"):
        share_encryption.decrypt(key, b"t" * 16, 3, 5, ciphertext)
    with pytest.raises(SecAggError, match="expected"):
        share_encryption.decrypt(key, SESSION, 3, 5, ciphertext[:-1])


def test_masks_are_deterministic_per_seed_and_cancel() -> None:
    seed, other = b"a" * 32, b"b" * 32
    vector = np.arange(1000, dtype=np.uint32)

    masked = vector.copy()
    masking.add_mask(masked, seed)
    assert not np.array_equal(masked, vector)
    assert not np.array_equal(masking.expand_mask(seed, 1000), masking.expand_mask(other, 1000))
    masking.subtract_mask(masked, seed)
    assert np.array_equal(masked, vector)


def test_reduce_keeps_values_in_the_modulus() -> None:
    vector = masking.expand_mask(b"a" * 32, 10_000).copy()

    reduced = masking.reduce(vector, 12)

    assert int(reduced.max()) < 1 << 12


def test_wire_vectors_are_checked_for_size_and_range() -> None:
    vector = np.array([1, 2, 3], np.uint32)

    assert np.array_equal(masking.from_bytes(masking.to_bytes(vector), 3, 4), vector)
    with pytest.raises(SecAggError, match="got 12"):
        masking.from_bytes(masking.to_bytes(vector), 4, 32)
    with pytest.raises(SecAggError, match="outside"):
        masking.from_bytes(masking.to_bytes(vector), 3, 1)
