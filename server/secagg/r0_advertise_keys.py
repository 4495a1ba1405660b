"""Server R0: collect each device's two public keys.

When the session knows the devices' enrolled keys (coordinator rounds), an advertisement must
be signed by the advertising device's enrolled key (device_runtime/identity.py); the
signature is relayed to its neighbours, who check it themselves.

A device may advertise before the session opens: its keys depend only on the session id and
its client id, both in its Assignment, so a round's devices agree keys while the round still
selects and trains. The pending session (server.SessionEnrollment) checks and keeps such an
advertisement exactly as this state would (`take_advertisement`), and the state opens with it.

Closes into ShareKeys when every enrolled device has advertised or the stage's deadline
passed; aborts if some device that advertised has fewer than t neighbours that did too, since
its secrets could then not be recovered (Bell et al.'s correctness condition failed).
"""

from __future__ import annotations

import logging
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm

from device_runtime import identity
from device_runtime.secagg import key_agreement
from device_runtime.secagg.errors import SecAggError
from protos import secagg_pb2
from server.errors import AlreadyExists, InvalidArgument
from server.secagg.aborted import AbortedState
from server.secagg.r1_share_keys import ShareKeysState
from server.secagg.session_data import SessionData
from server.secagg.state import SecAggState

log = logging.getLogger(__name__)


class KeyBook(Protocol):
    """Where advertisements are kept: the session's data, or a pending session's enrollment."""

    session_id: bytes
    device_keys: dict[int, bytes]
    advertised: dict[int, secagg_pb2.PairOfPublicKeys]
    key_owners: dict[bytes, int]
    key_signatures: dict[int, bytes]


def take_advertisement(book: KeyBook, client_id: int, message: secagg_pb2.AdvertiseKeys) -> None:
    """Checks one authenticated device's advertisement and keeps it. Raises AlreadyExists or
    InvalidArgument, keeping nothing."""
    if client_id in book.advertised:
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
    _check_signature(book, client_id, message)
    for key in pair:
        if key in book.key_owners:
            raise InvalidArgument(
                f"client {client_id} advertised a key client "
                f"{book.key_owners[key]} already advertised"
            )
    book.key_owners.update(dict.fromkeys(pair, client_id))
    book.key_signatures[client_id] = message.signature
    book.advertised[client_id] = secagg_pb2.PairOfPublicKeys(
        encryption_public_key=pair[0], mask_public_key=pair[1]
    )


def _check_signature(book: KeyBook, client_id: int, message: secagg_pb2.AdvertiseKeys) -> None:
    device_key = book.device_keys.get(client_id)
    if device_key is None:
        return  # a session outside coordinator rounds: no enrolled keys to check against
    signed = identity.secagg_keys_signed_bytes(book.session_id, client_id, message.keys)
    if not identity.verifies(identity.load_public_key(device_key), message.signature, signed):
        raise InvalidArgument(
            f"client {client_id}'s advertised keys are not signed by its enrolled key"
        )


class AdvertiseKeysState(SecAggState):
    stage = secagg_pb2.ADVERTISE_KEYS

    def __init__(self, data: SessionData) -> None:
        super().__init__(data)
        # Devices that advertised while the session was pending have spoken already.
        for client in data.advertised:
            self._spoke(client)

    def _initial_participants(self) -> set[int]:
        return set(self.data.token_by_client)

    def handle_advertise_keys(self, client_id: int, message: secagg_pb2.AdvertiseKeys) -> None:
        take_advertisement(self.data, client_id, message)
        self._spoke(client_id)

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
