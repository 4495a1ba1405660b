"""Client R0: advertise the session's two public keys (share encryption, masks), signed by
the device's enrolled key when it has one (so neighbours can tell a substituted key)."""

from __future__ import annotations

from device_runtime import identity
from device_runtime.secagg.client_state import ClientSession
from protos import secagg_pb2


def advertise_keys(session: ClientSession) -> secagg_pb2.AdvertiseKeys:
    keys = secagg_pb2.PairOfPublicKeys(
        encryption_public_key=session.encryption_keys.public_bytes(),
        mask_public_key=session.mask_keys.public_bytes(),
    )
    message = secagg_pb2.AdvertiseKeys(keys=keys)
    if session.device_key is not None:
        signed = identity.secagg_keys_signed_bytes(session.session_id, session.client_id, keys)
        message.signature = session.device_key.sign(signed)
    return message
