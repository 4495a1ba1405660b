import itertools
import os

import pytest

from device_runtime.secagg import shamir
from device_runtime.secagg.errors import SecAggError


def test_any_threshold_subset_reconstructs_the_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])

    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct(list(subset), 3) == secret


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = shamir.split(os.urandom(32), 3, [1, 2, 3, 4])

    with pytest.raises(SecAggError, match="cannot reconstruct"):
        shamir.reconstruct(shares[:2], 3)


def test_fewer_than_threshold_shares_do_not_determine_the_secret() -> None:
    # t-1 shares interpolate to some other field element (usually not even 32 bytes long).
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3])

    try:
        guess = shamir.reconstruct(shares[:2], 2)
    except SecAggError:
        guess = None
    assert guess != secret


def test_an_inconsistent_extra_share_is_detected() -> None:
    shares = shamir.split(os.urandom(32), 3, [1, 2, 3, 4, 5])
    bad = shamir.Share(shares[4].x, (shares[4].y + 1) % shamir.PRIME)

    with pytest.raises(SecAggError, match="client 5 is inconsistent"):
        shamir.reconstruct([*shares[:4], bad], 3)


def test_duplicate_x_coordinates_are_refused() -> None:
    shares = shamir.split(os.urandom(32), 2, [1, 2, 3])

    with pytest.raises(SecAggError, match="same x-coordinate"):
        shamir.reconstruct([shares[0], shares[0]], 2)


def test_share_bytes_round_trip_and_malformed_bytes_are_refused() -> None:
    share = shamir.split(os.urandom(32), 2, [7, 9])[0]

    assert shamir.share_from_bytes(7, share.value_bytes()) == share
    with pytest.raises(SecAggError, match="66 bytes"):
        shamir.share_from_bytes(7, b"\x01" * 10)
    with pytest.raises(SecAggError, match="outside the field"):
        shamir.share_from_bytes(7, b"\xff" * shamir.share_value_bytes)


@pytest.mark.parametrize(
    ("secret", "threshold", "xs"),
    [(b"short", 2, [1, 2]), (bytes(32), 3, [1, 2]), (bytes(32), 2, [1, 1]), (bytes(32), 1, [0])],
)
def test_split_refuses_bad_arguments(secret: bytes, threshold: int, xs: list[int]) -> None:
    with pytest.raises(ValueError):
        shamir.split(secret, threshold, xs)


def test_a_wrong_share_among_those_used_is_detected() -> None:
    shares = shamir.split(os.urandom(32), 3, [1, 2, 3, 4, 5])
    bad = shamir.Share(shares[0].x, (shares[0].y + 1) % shamir.PRIME)

    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.reconstruct([bad, *shares[1:]], 3)
