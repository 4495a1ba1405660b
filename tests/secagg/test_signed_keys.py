"""Signed secure-aggregation keys: a relay that substitutes a device's keys is caught.

Each device signs its advertised keys with its enrolled key; the server relays each
neighbour's enrolled key and signature, and every device checks them (README, "Security").
"""

import cryptography.hazmat.primitives.asymmetric.x25519 as x25519
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from device_runtime import identity
from device_runtime.secagg.client_state import ClientStage
from device_runtime.secagg.errors import SecAggAborted
from server.errors import InvalidArgument
from tests.secagg.stepper import N, Stepper, device_key_of, same_state


def _fresh_x25519() -> bytes:
    return (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def test_a_signed_session_sums_every_input() -> None:
    s = Stepper(signed=True)
    s.to_unmasking()
    for c in s.clients:
        s.server.receive(s.unmask(c))

    total, count = s.server.result()

    assert count == N
    assert np.array_equal(total, s.expected_sum(set(s.clients)))


def test_a_substituted_neighbour_key_makes_the_device_abort() -> None:
    s = Stepper(signed=True)
    s.to_share_keys()
    request = s.message_to(1).share_keys_request
    # The relay swaps neighbour 2's mask key for one it holds (to learn 1's pairwise mask).
    request.neighbours[0].keys.mask_public_key = _fresh_x25519()

    with pytest.raises(SecAggAborted, match="not signed by its enrolled key"):
        s.clients[1].share_keys(request)
    assert s.clients[1].stage == ClientStage.ABORTED
    assert s.clients[1].abort_message().abort.reason


def test_a_stripped_signature_makes_the_device_abort() -> None:
    s = Stepper(signed=True)
    s.to_share_keys()
    request = s.message_to(1).share_keys_request
    request.neighbours[0].ClearField("signature")

    with pytest.raises(SecAggAborted, match="not signed"):
        s.clients[1].share_keys(request)


def test_a_missing_enrolled_key_makes_the_device_abort() -> None:
    s = Stepper(signed=True)
    s.to_share_keys()
    request = s.message_to(1).share_keys_request
    request.neighbours[0].ClearField("device_public_key")

    with pytest.raises(SecAggAborted, match="enrolled key is missing"):
        s.clients[1].share_keys(request)


def test_keys_signed_for_another_slot_are_refused() -> None:
    s = Stepper(signed=True)
    s.to_share_keys()
    request = s.message_to(1).share_keys_request
    first, second = request.neighbours[0], request.neighbours[1]
    # Neighbour 2's genuine, signed keys presented as neighbour 3's.
    second.keys.CopyFrom(first.keys)
    second.device_public_key, second.signature = first.device_public_key, first.signature

    with pytest.raises(SecAggAborted):
        s.clients[1].share_keys(request)


def test_the_server_refuses_an_advertisement_not_signed_by_the_enrolled_key() -> None:
    s = Stepper(signed=True)
    before = s.snapshot()
    message = s.advertise(1)
    keys = message.advertise_keys.keys
    signed = identity.secagg_keys_signed_bytes(s.server.session_id, 1, keys)
    message.advertise_keys.signature = device_key_of(2).sign(signed)  # wrong device's key

    with pytest.raises(InvalidArgument, match="not signed by its enrolled key"):
        s.server.receive(message)
    assert same_state(before, s.snapshot())


def test_a_server_that_also_swaps_the_enrolled_key_is_not_caught_by_signatures() -> None:
    # The limit of what signatures prove (README, "Security"): the relayed enrolled key is
    # the server's word. A server that enrolls a key of its own and signs its substitute
    # keys with it passes the check; only a trusted identity source (attestation roots, a
    # key transparency log) would tell the device that key is not its neighbour's.
    s = Stepper(signed=True)
    s.to_share_keys()
    request = s.message_to(1).share_keys_request
    forger = identity.DeviceKey.from_seed(b"server-enrolled-sybil")
    neighbour = request.neighbours[0]
    neighbour.keys.mask_public_key = _fresh_x25519()
    neighbour.device_public_key = forger.public_key_der
    neighbour.signature = forger.sign(
        identity.secagg_keys_signed_bytes(s.server.session_id, neighbour.client_id, neighbour.keys)
    )

    s.clients[1].share_keys(request)

    assert s.clients[1].stage == ClientStage.MASKED_INPUT
