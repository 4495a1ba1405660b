"""Server R1: send each device its neighbours' keys; collect and route encrypted key shares.

A device's ShareKeys must hold exactly one well-sized ciphertext per neighbour that
advertised keys, else it is refused whole. Closes into masked-input collection, aborting if a
device that shared keys has fewer than t neighbours that did too.
"""

from __future__ import annotations

import logging

from device_runtime.secagg import share_encryption
from protos import secagg_pb2
from server.errors import AlreadyExists, InvalidArgument
from server.secagg.aborted import AbortedState
from server.secagg.r2_masked_input_collection import MaskedInputCollectionState
from server.secagg.state import SecAggState

log = logging.getLogger(__name__)


class ShareKeysState(SecAggState):
    stage = secagg_pb2.SHARE_KEYS

    def _initial_participants(self) -> set[int]:
        return set(self.data.advertised)

    def message_for(self, client_id: int) -> secagg_pb2.SecAggServerMessage:
        request = secagg_pb2.ShareKeysRequest(session_config=self.data.session_config(client_id))
        for neighbour in sorted(self.data.neighbours_in(client_id, self.data.advertised)):
            request.neighbours.add(
                client_id=neighbour,
                keys=self.data.advertised[neighbour],
                device_public_key=self.data.device_keys.get(neighbour, b""),
                signature=self.data.key_signatures.get(neighbour, b""),
            )
        return secagg_pb2.SecAggServerMessage(share_keys_request=request)

    def handle_share_keys(self, client_id: int, message: secagg_pb2.ShareKeys) -> None:
        if client_id in self.data.shared_keys:
            raise AlreadyExists(f"client {client_id} already shared its keys")
        expected = self.data.neighbours_in(client_id, self.data.advertised)
        recipients = [s.recipient_id for s in message.shares]
        if len(set(recipients)) != len(recipients):
            raise InvalidArgument(f"client {client_id} sent two key shares for one neighbour")
        strangers = set(recipients) - expected
        if strangers:
            raise InvalidArgument(
                f"client {client_id} sent key shares for {sorted(strangers)}, which are not "
                f"its neighbours with keys"
            )
        if set(recipients) != expected:
            raise InvalidArgument(
                f"client {client_id} sent no key shares for neighbours "
                f"{sorted(expected - set(recipients))}"
            )
        for shares in message.shares:
            if len(shares.ciphertext) != share_encryption.ciphertext_bytes:
                raise InvalidArgument(
                    f"client {client_id}'s key shares for {shares.recipient_id} are "
                    f"{len(shares.ciphertext)} bytes, expected {share_encryption.ciphertext_bytes}"
                )
        self.data.shared_keys.add(client_id)
        self._spoke(client_id)
        for shares in message.shares:
            self.data.mailbox.setdefault(shares.recipient_id, []).append(
                secagg_pb2.EncryptedKeyShares(
                    sender_id=client_id,
                    recipient_id=shares.recipient_id,
                    ciphertext=shares.ciphertext,
                )
            )

    def close(self) -> SecAggState:
        data = self.data
        for client in sorted(data.shared_keys):
            alive = len(data.neighbours_in(client, data.shared_keys))
            if alive < data.threshold:
                reason = (
                    f"client {client} has {alive} neighbours that shared keys, fewer than "
                    f"the threshold {data.threshold}"
                )
                log.warning("secagg session aborts after R1: %s", reason)
                return AbortedState(data, reason)
        return MaskedInputCollectionState(data)
