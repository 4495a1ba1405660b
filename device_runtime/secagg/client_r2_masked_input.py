"""Client R2: decrypt the neighbours' key shares, then send the input under three masks.

y = x + PRG(self seed) + sum over neighbours v that shared keys of +-PRG(s_uv)  (mod 2^b),
with + when this client's id is the smaller of the pair, so each pairwise mask cancels with
its neighbour's copy in the sum. The self mask keeps y secret even if the server learns the
pairwise masks of a device it wrongly claims dropped out.
"""

from __future__ import annotations

import numpy as np

from device_runtime.secagg import key_agreement, masking, share_encryption
from device_runtime.secagg.client_state import ClientSession
from device_runtime.secagg.errors import SecAggError
from protos import secagg_pb2


def _decrypt_shares(session: ClientSession, request: secagg_pb2.MaskedInputRequest) -> None:
    senders = [s.sender_id for s in request.shares]
    if len(set(senders)) != len(senders):
        raise SecAggError("the server forwarded two key shares from one neighbour")
    unknown = set(senders) - set(session.neighbour_keys)
    if unknown:
        raise SecAggError(f"key shares from clients {sorted(unknown)} that advertised no keys")
    if len(senders) < session.threshold:
        raise SecAggError(
            f"only {len(senders)} neighbours shared keys; the threshold is {session.threshold}"
        )
    for encrypted in request.shares:
        key = session.share_keys_by_neighbour[encrypted.sender_id]
        session.received_shares[encrypted.sender_id] = share_encryption.decrypt(
            key, session.session_id, encrypted.sender_id, session.client_id, encrypted.ciphertext
        )


def pairwise_mask_seed(own: key_agreement.KeyPair, peer_public: bytes, session_id: bytes) -> bytes:
    return key_agreement.agree(own, peer_public, session_id, key_agreement.PAIRWISE_MASK_INFO)


def masked_input(
    session: ClientSession, request: secagg_pb2.MaskedInputRequest, quantized: np.ndarray
) -> np.ndarray:
    """The masked vector (uint32, values in Z_(2^b)). Raises SecAggError on bad shares."""
    modulus_bits = session.config.modulus_bits
    if quantized.shape != (session.config.vector_length,):
        raise ValueError(
            f"input has shape {quantized.shape}, the session sums "
            f"{session.config.vector_length} elements"
        )
    if quantized.dtype != np.uint32 or (
        modulus_bits < masking.max_modulus_bits and int(quantized.max(initial=0)) >> modulus_bits
    ):
        raise ValueError(f"input must be uint32 values in Z_(2^{modulus_bits})")
    _decrypt_shares(session, request)
    masked = quantized.copy()
    masking.add_mask(masked, session.self_mask_seed)
    for neighbour in sorted(session.received_shares):
        seed = pairwise_mask_seed(
            session.mask_keys,
            session.neighbour_keys[neighbour].mask_public_key,
            session.session_id,
        )
        if session.client_id < neighbour:
            masking.add_mask(masked, seed)
        else:
            masking.subtract_mask(masked, seed)
    return masking.reduce(masked, modulus_bits)
