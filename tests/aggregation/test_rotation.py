"""Randomized Hadamard rotation: orthonormal, seeded from the round, no padding."""

from __future__ import annotations

import numpy as np
import pytest

from device_runtime.aggregation.rotation import RandomizedHadamard, block_sizes


def test_blocks_are_powers_of_two_that_sum_to_the_length() -> None:
    assert block_sizes(100, 64) == [64, 32, 4]
    assert block_sizes(200, 64) == [64, 64, 64, 8]
    assert sum(block_sizes(1_663_370)) == 1_663_370


def test_rotation_preserves_norm_and_inverts_exactly() -> None:
    x = np.random.default_rng(0).standard_normal(1000)
    rotation = RandomizedHadamard(1000, seed=5, max_block_size=256)

    y = rotation.rotate(x)

    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))
    np.testing.assert_allclose(rotation.unrotate(y), x, atol=1e-12)


def test_same_seed_same_rotation_other_seed_other_rotation() -> None:
    x = np.arange(64, dtype=np.float64)

    a = RandomizedHadamard(64, 1).rotate(x)

    np.testing.assert_array_equal(a, RandomizedHadamard(64, 1).rotate(x))
    assert not np.allclose(a, RandomizedHadamard(64, 2).rotate(x))


def test_rotation_spreads_a_spike_over_its_block() -> None:
    x = np.zeros(256)
    x[3] = 1.0

    y = RandomizedHadamard(256, 9).rotate(x)

    np.testing.assert_allclose(np.abs(y), 1 / 16)


def test_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="for 10 values"):
        RandomizedHadamard(10, 1).rotate(np.zeros(11))
