"""Client R0: advertise the session's two public keys (share encryption, masks)."""

from __future__ import annotations

from device_runtime.secagg.client_state import ClientSession
from protos import secagg_pb2


def advertise_keys(session: ClientSession) -> secagg_pb2.AdvertiseKeys:
    return secagg_pb2.AdvertiseKeys(
        keys=secagg_pb2.PairOfPublicKeys(
            encryption_public_key=session.encryption_keys.public_bytes(),
            mask_public_key=session.mask_keys.public_bytes(),
        )
    )
