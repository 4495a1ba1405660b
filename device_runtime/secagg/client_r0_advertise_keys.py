"""Client R0: advertise the session's two public keys (share encryption, masks), signed by
the device's enrolled key when it has one (so neighbours can tell a substituted key).

The advertisement depends only on the session id and the device's client id, both in its
Assignment: a device in a coordinator round advertises while the session is still pending
(client.EarlyAdvertisement), before it knows the session's size.
"""

from __future__ import annotations

from device_runtime import identity
from device_runtime.identity import DeviceKey
from device_runtime.secagg.client_state import ClientSession
from device_runtime.secagg.key_agreement import KeyPair
from protos import secagg_pb2


def signed_advertisement(
    session_id: bytes,
    client_id: int,
    encryption_keys: KeyPair,
    mask_keys: KeyPair,
    device_key: DeviceKey | None,
) -> secagg_pb2.AdvertiseKeys:
    keys = secagg_pb2.PairOfPublicKeys(
        encryption_public_key=encryption_keys.public_bytes(),
        mask_public_key=mask_keys.public_bytes(),
    )
    message = secagg_pb2.AdvertiseKeys(keys=keys)
    if device_key is not None:
        signed = identity.secagg_keys_signed_bytes(session_id, client_id, keys)
        message.signature = device_key.sign(signed)
    return message


def advertise_keys(session: ClientSession) -> secagg_pb2.AdvertiseKeys:
    return signed_advertisement(
        session.session_id,
        session.client_id,
        session.encryption_keys,
        session.mask_keys,
        session.device_key,
    )
