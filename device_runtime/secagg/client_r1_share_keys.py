"""Client R1: Shamir-share the mask key and self-mask seed among neighbours, encrypted.

Each neighbour that advertised keys gets a share of both secrets, encrypted under the key
agreed from the two devices' encryption keys, so the server, which routes them, learns
nothing. The shares are t-of-(neighbours that advertised): any t of them recover a secret.

A device with an enrolled key also checks each neighbour's advertisement signature against
the enrolled key the server relays with it: a relay that swaps a neighbour's keys for its own
(to learn the shares) is caught and the session aborts on this device. The server itself
could swap the enrolled key too; README "Security" says what that leaves open.
"""

from __future__ import annotations

from device_runtime import identity
from device_runtime.secagg import key_agreement, shamir, share_encryption
from device_runtime.secagg.client_state import ClientSession
from device_runtime.secagg.errors import SecAggError
from protos import secagg_pb2


def _check_neighbour_keys(session: ClientSession, request: secagg_pb2.ShareKeysRequest) -> None:
    expected = session.graph.neighbours(session.client_id)
    ids = [n.client_id for n in request.neighbours]
    if len(set(ids)) != len(ids):
        raise SecAggError("the server listed a neighbour twice")
    if not set(ids) <= expected:
        raise SecAggError(f"the server listed non-neighbours {sorted(set(ids) - expected)}")
    own = {session.encryption_keys.public_bytes(), session.mask_keys.public_bytes()}
    seen: set[bytes] = set()
    for neighbour in request.neighbours:
        for key in (neighbour.keys.encryption_public_key, neighbour.keys.mask_public_key):
            key_agreement.check_public_key(key)
            if key in seen or key in own:
                raise SecAggError(f"client {neighbour.client_id} reuses an advertised key")
            seen.add(key)
    if session.device_key is not None:
        _check_signatures(session, request)
    if len(ids) < session.threshold:
        raise SecAggError(
            f"only {len(ids)} neighbours advertised keys; the threshold is {session.threshold}"
        )


def _check_signatures(session: ClientSession, request: secagg_pb2.ShareKeysRequest) -> None:
    assert session.device_key is not None
    for neighbour in request.neighbours:
        try:
            key = identity.load_public_key(neighbour.device_public_key)
        except identity.IdentityError as exc:
            raise SecAggError(
                f"client {neighbour.client_id}'s enrolled key is missing or malformed: {exc}"
            ) from None
        signed = identity.secagg_keys_signed_bytes(
            session.session_id, neighbour.client_id, neighbour.keys
        )
        if not identity.verifies(key, neighbour.signature, signed):
            raise SecAggError(
                f"client {neighbour.client_id}'s keys are not signed by its enrolled key: "
                "the relay substituted them"
            )
        if neighbour.device_public_key == session.device_key.public_key_der:
            raise SecAggError(f"client {neighbour.client_id} claims this device's own key")


def share_keys(
    session: ClientSession, request: secagg_pb2.ShareKeysRequest
) -> secagg_pb2.ShareKeys:
    """Raises SecAggError when the neighbour list is not one an honest server would send."""
    _check_neighbour_keys(session, request)
    session.neighbour_keys = {n.client_id: n.keys for n in request.neighbours}
    recipients = sorted(session.neighbour_keys)
    mask_key_shares = shamir.split(session.mask_keys.private_bytes(), session.threshold, recipients)
    seed_shares = shamir.split(session.self_mask_seed, session.threshold, recipients)
    message = secagg_pb2.ShareKeys()
    for recipient, mask_key_share, seed_share in zip(
        recipients, mask_key_shares, seed_shares, strict=True
    ):
        key = key_agreement.agree(
            session.encryption_keys,
            session.neighbour_keys[recipient].encryption_public_key,
            session.session_id,
            key_agreement.SHARE_ENCRYPTION_INFO,
        )
        session.share_keys_by_neighbour[recipient] = key
        shares = share_encryption.KeyShares(
            session.client_id, recipient, mask_key_share, seed_share
        )
        message.shares.add(
            recipient_id=recipient,
            ciphertext=share_encryption.encrypt(key, session.session_id, shares),
        )
    return message
