"""Server R0: collect each device's two public keys.

When the session knows the devices' enrolled keys (coordinator rounds), an advertisement must
be signed by the advertising device's enrolled key (device_runtime/identity.py); the
signature is relayed to its neighbours, who check it themselves.

Closes into ShareKeys when every enrolled device has advertised or the stage's deadline
passed; aborts if some device that advertised has fewer than t neighbours that did too, since
its secrets could then not be recovered (Bell et al.'s correctness condition failed).
"""

from __future__ import annotations

import logging

from cryptography.exceptions import UnsupportedAlgorithm

from device_runtime import identity
from device_runtime.secagg import key_agreement
from device_runtime.secagg.errors import SecAggError
from protos import secagg_pb2
from server.errors import AlreadyExists, InvalidArgument
from server.secagg.aborted import AbortedState
from server.secagg.r1_share_keys import ShareKeysState
from server.secagg.state import SecAggState

log = logging.getLogger(__name__)


class AdvertiseKeysState(SecAggState):
    stage = secagg_pb2.ADVERTISE_KEYS

    def _initial_participants(self) -> set[int]:
        return set(self.data.token_by_client)

    def handle_advertise_keys(self, client_id: int, message: secagg_pb2.AdvertiseKeys) -> None:
        if client_id in self.data.advertised:
            raise AlreadyExists(f"client {client_id} already advertised its keys")
        keys = message.keys
        pair = (keys.encryption_public_key, keys.mask_public_key)
        try:
            for key in pair:
                key_agreement.check_public_key(key)
        except (SecAggError, ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidArgument(f"client {client_id} advertised a malformed key: {exc}") from exc
        if pair[0] == pair[1]:
            raise InvalidArgument(f"client {client_id} advertised one key for both purposes")
        self._check_signature(client_id, message)
        for key in pair:
            if key in self.data.key_owners:
                raise InvalidArgument(
                    f"client {client_id} advertised a key client "
                    f"{self.data.key_owners[key]} already advertised"
                )
        self.data.key_owners.update(dict.fromkeys(pair, client_id))
        self.data.key_signatures[client_id] = message.signature
        self.data.advertised[client_id] = secagg_pb2.PairOfPublicKeys(
            encryption_public_key=pair[0], mask_public_key=pair[1]
        )
        self._spoke(client_id)

    def _check_signature(self, client_id: int, message: secagg_pb2.AdvertiseKeys) -> None:
        device_key = self.data.device_keys.get(client_id)
        if device_key is None:
            return  # a session outside coordinator rounds: no enrolled keys to check against
        signed = identity.secagg_keys_signed_bytes(self.data.session_id, client_id, message.keys)
        if not identity.verifies(identity.load_public_key(device_key), message.signature, signed):
            raise InvalidArgument(
                f"client {client_id}'s advertised keys are not signed by its enrolled key"
            )

    def close(self) -> SecAggState:
        data = self.data
        for client in sorted(data.advertised):
            alive = len(data.neighbours_in(client, data.advertised))
            if alive < data.threshold:
                reason = (
                    f"client {client} has {alive} neighbours with keys, fewer than the "
                    f"threshold {data.threshold}"
                )
                log.warning("secagg session aborts after R0: %s", reason)
                return AbortedState(data, reason)
        return ShareKeysState(data)
