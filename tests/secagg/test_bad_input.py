"""Every kind of bad input: refused with a clear status, nothing changes, the session goes on."""

from collections.abc import Callable

import numpy as np
import pytest

from device_runtime.secagg import shamir
from protos import secagg_pb2
from server.errors import (
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    Unauthenticated,
)
from tests.secagg.stepper import LENGTH, MODULUS_BITS, N, Stepper, same_state


def _refused(
    stepper: Stepper, error: type[CoordinatorError], match: str, act: Callable[[], object]
) -> None:
    before = stepper.snapshot()
    stage = stepper.server.stage

    with pytest.raises(error, match=match):
        act()

    assert stepper.server.stage == stage
    assert same_state(before, stepper.snapshot())


def _finish(stepper: Stepper, survivors: set[int]) -> None:
    """The session still completes with the right sum after the refusals."""
    for c in sorted(survivors):
        if stepper.server.stage == secagg_pb2.UNMASKING:
            stepper.server.receive(stepper.unmask(c))
    total, count = stepper.server.result()
    assert count == len(survivors)
    assert np.array_equal(total, stepper.expected_sum(survivors))


def test_a_key_advertised_twice_by_one_device_is_refused() -> None:
    s = Stepper()
    first = s.advertise(1)
    s.server.receive(first)

    _refused(s, AlreadyExists, "already advertised", lambda: s.server.receive(first))


def test_a_key_another_device_advertised_is_refused() -> None:
    s = Stepper()
    s.server.receive(s.advertise(1))
    copycat = s.advertise(2)
    copycat.advertise_keys.keys.mask_public_key = s.server._data.advertised[1].mask_public_key

    _refused(s, InvalidArgument, "client 1 already advertised", lambda: s.server.receive(copycat))


@pytest.mark.parametrize("key", [b"", b"\x01" * 31, b"\x01" * 33])
def test_a_malformed_public_key_is_refused(key: bytes) -> None:
    s = Stepper()
    message = s.advertise(1)
    message.advertise_keys.keys.encryption_public_key = key

    _refused(s, InvalidArgument, "malformed key", lambda: s.server.receive(message))


def test_one_key_for_both_purposes_is_refused() -> None:
    s = Stepper()
    message = s.advertise(1)
    message.advertise_keys.keys.mask_public_key = message.advertise_keys.keys.encryption_public_key

    _refused(s, InvalidArgument, "both purposes", lambda: s.server.receive(message))


def test_a_wrong_token_or_session_is_unauthenticated() -> None:
    s = Stepper()
    forged = s.advertise(1)
    forged.session_token = b"x" * 16
    other_session = s.advertise(2)
    other_session.session_id = b"y" * 16
    stranger = s.advertise(3)
    stranger.client_id = 99

    for message in (forged, other_session, stranger):
        _refused(s, Unauthenticated, "unknown session", lambda m=message: s.server.receive(m))


def test_an_old_protocol_version_or_an_empty_message_is_refused() -> None:
    s = Stepper()
    old = s.advertise(1)
    old.protocol_version = 99
    empty = s.clients[2].envelope()

    _refused(s, FailedPrecondition, "protocol version", lambda: s.server.receive(old))
    _refused(s, InvalidArgument, "no content", lambda: s.server.receive(empty))


def test_a_message_of_another_stage_is_refused() -> None:
    s = Stepper()
    s.to_share_keys()
    late = s.clients[1].envelope()
    late.advertise_keys.CopyFrom(secagg_pb2.AdvertiseKeys())

    _refused(s, FailedPrecondition, "not taken at stage SHARE_KEYS", lambda: s.server.receive(late))
    _refused(
        s,
        FailedPrecondition,
        "not taken at stage SHARE_KEYS",
        lambda: s.send_masked(1, np.zeros(LENGTH, np.uint32)),
    )


def test_a_share_for_a_device_that_is_not_a_neighbour_is_refused() -> None:
    s = Stepper()
    s.to_share_keys(skip={5})  # 5 advertised nothing, so it is nobody's neighbour with keys
    s.server.close_stage(s.server.stage)
    message = s.share(1)
    stray = message.share_keys.shares.add()
    stray.CopyFrom(message.share_keys.shares[0])
    stray.recipient_id = 5

    _refused(s, InvalidArgument, r"for \[5\], which are not", lambda: s.server.receive(message))


def test_missing_duplicated_or_truncated_shares_are_refused() -> None:
    s = Stepper()
    s.to_share_keys()
    good = s.share(1)
    missing = secagg_pb2.SecAggClientMessage()
    missing.CopyFrom(good)
    del missing.share_keys.shares[-1]
    doubled = secagg_pb2.SecAggClientMessage()
    doubled.CopyFrom(good)
    doubled.share_keys.shares[1].recipient_id = doubled.share_keys.shares[0].recipient_id
    truncated = secagg_pb2.SecAggClientMessage()
    truncated.CopyFrom(good)
    truncated.share_keys.shares[0].ciphertext = truncated.share_keys.shares[0].ciphertext[:-1]

    _refused(s, InvalidArgument, "no key shares for", lambda: s.server.receive(missing))
    _refused(s, InvalidArgument, "two key shares", lambda: s.server.receive(doubled))
    _refused(s, InvalidArgument, "bytes, expected", lambda: s.server.receive(truncated))
    s.server.receive(good)
    _refused(s, AlreadyExists, "already shared", lambda: s.server.receive(good))


def test_a_second_masked_input_from_one_device_is_refused() -> None:
    s = Stepper()
    s.to_masked_input()
    masked = s.masked(1)
    s.send_masked(1, masked)

    _refused(s, AlreadyExists, "already sent its masked input", lambda: s.send_masked(1, masked))
    for c in range(2, N + 1):
        s.send_masked(c, s.masked(c))
    _finish(s, set(range(1, N + 1)))


@pytest.mark.parametrize(
    ("vector", "match"),
    [
        (np.zeros(LENGTH + 1, np.uint32), "expected"),
        (np.zeros(LENGTH, np.uint64), "expected"),
        (np.full(LENGTH, 1 << MODULUS_BITS, np.uint32), "outside"),
    ],
)
def test_a_malformed_masked_input_is_refused(vector: np.ndarray, match: str) -> None:
    s = Stepper()
    s.to_masked_input()

    _refused(s, InvalidArgument, match, lambda: s.send_masked(1, vector))


def test_a_masked_input_from_a_device_that_shared_no_keys_is_refused() -> None:
    s = Stepper()
    s.to_masked_input(skip={5})
    s.server.close_stage(s.server.stage)

    _refused(
        s,
        FailedPrecondition,
        "shared no keys",
        lambda: s.send_masked(5, np.zeros(LENGTH, np.uint32)),
    )


def test_unmasking_shares_for_the_wrong_devices_or_malformed_are_refused() -> None:
    s = Stepper()
    s.to_unmasking(skip={5})
    s.server.close_stage(s.server.stage)
    good = s.unmask(1)
    wrong_kind = secagg_pb2.SecAggClientMessage()
    wrong_kind.CopyFrom(good)
    # Asks the server to take a self-mask seed share of dropped device 5 as well.
    wrong_kind.unmasking_response.self_mask_seed_shares.add(
        owner_id=5, value=good.unmasking_response.mask_key_shares[0].value
    )
    malformed = secagg_pb2.SecAggClientMessage()
    malformed.CopyFrom(good)
    malformed.unmasking_response.self_mask_seed_shares[0].value = b"\xff" * 66

    _refused(s, InvalidArgument, "exactly", lambda: s.server.receive(wrong_kind))
    _refused(s, InvalidArgument, "malformed", lambda: s.server.receive(malformed))
    s.server.receive(good)
    _refused(s, AlreadyExists, "already sent", lambda: s.server.receive(good))
    for c in (2, 3, 4):
        s.server.receive(s.unmask(c))
    total, count = s.server.result()
    assert count == 4
    assert np.array_equal(total, s.expected_sum({1, 2, 3, 4}))


def test_an_inconsistent_share_aborts_the_unmasking() -> None:
    # Well-formed but wrong: detectable only against the other shares at reconstruction.
    s = Stepper()
    s.to_unmasking()
    bad = s.unmask(1)
    share = bad.unmasking_response.self_mask_seed_shares[0]
    share.value = ((int.from_bytes(share.value, "big") + 1) % shamir.PRIME).to_bytes(66, "big")
    s.server.receive(bad)
    for c in range(2, N + 1):
        s.server.receive(s.unmask(c))

    assert s.server.stage == secagg_pb2.ABORTED
    assert "inconsistent" in s.server.abort_reason


def test_mask_key_shares_not_matching_the_advertised_key_abort() -> None:
    # Shares shifted together stay consistent but reconstruct another key: the advertised
    # public key catches it.
    s = Stepper()
    s.to_unmasking(skip={5})
    s.server.close_stage(s.server.stage)
    responses = [s.unmask(c) for c in (1, 2, 3, 4)]
    for response in responses:
        share = response.unmasking_response.mask_key_shares[0]
        value = (int.from_bytes(share.value, "big") + 1) % shamir.PRIME
        share.value = value.to_bytes(66, "big")
        s.server.receive(response)

    assert s.server.stage == secagg_pb2.ABORTED
    assert "do not match its advertised key" in s.server.abort_reason


def test_a_device_that_aborted_is_refused_afterwards() -> None:
    s = Stepper()
    s.server.receive(s.advertise(1))
    abort = s.clients[2].envelope()
    abort.abort.reason = "user picked up the phone"
    s.server.receive(abort)

    _refused(s, FailedPrecondition, "aborted", lambda: s.server.receive(s.advertise(2)))
