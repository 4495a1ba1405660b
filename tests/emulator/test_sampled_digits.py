"""Many phones sharing the shipped digits: per-phone samples with label and quantity skew."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.data import SampledDigits


def test_phone_data_is_the_same_whoever_builds_it() -> None:
    first, second = SampledDigits(seed=3), SampledDigits(seed=3)

    a, b = first.client(4321), second.client(4321)

    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)


def test_more_phones_than_images_each_get_their_own_sample() -> None:
    source = SampledDigits(seed=1)

    sizes = [len(source.client(i)) for i in range(3000)]

    assert sum(sizes) > 1797  # the images are shared out many times over
    assert min(sizes) >= source.min_examples
    assert np.percentile(sizes, 90) > 2 * np.percentile(sizes, 10)  # quantity skew


def test_small_alpha_concentrates_labels() -> None:
    def top_label_share(alpha: float) -> float:
        source = SampledDigits(alpha=alpha, mean_examples=60, sigma=0.0, seed=2)
        shares = [np.bincount(source.client(i).y).max() / 60 for i in range(100)]
        return float(np.mean(shares))

    assert top_label_share(0.1) > 2 * top_label_share(100.0)


def test_phones_never_hold_held_out_images() -> None:
    source = SampledDigits(seed=5)
    test_rows = {row.tobytes() for row in source.test().x}
    train_rows = {row.tobytes() for i in range(200) for row in source.client(i).x}

    # The digits contain a few duplicate images; nothing else may overlap.
    assert len(test_rows & train_rows) <= 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"alpha": 0}, "alpha"), ({"mean_examples": 0}, "mean_examples"), ({"sigma": -1}, "sigma")],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SampledDigits(**kwargs)  # type: ignore[arg-type]
