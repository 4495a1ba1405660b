"""The Sybil flood of issue 11 against the real coordinator (virtual time; real keys, store
and signatures): 50 honest phones plus 1,000 identities from one client. The full-length run
is benchmarks/sybil_flood.py."""

from __future__ import annotations

import pytest

from benchmarks.sybil_flood import FloodResult, simulate

HALF_HOUR_S = 1800.0


@pytest.fixture(scope="module")
def baseline(model_bytes: bytes) -> FloodResult:
    return simulate(model_bytes, "baseline", HALF_HOUR_S)


def test_with_the_secret_the_attacker_owns_at_most_a_tenth_of_the_reports(
    model_bytes: bytes, baseline: FloodResult
) -> None:
    attacked = simulate(model_bytes, "defended", HALF_HOUR_S)

    assert attacked.attacker_reports > 0  # it did get in, within its network's share
    assert attacked.attacker_share <= 0.10
    assert attacked.attacker_enrolled < 100  # the per-network enrollment limit held
    assert attacked.honest_reports >= 0.8 * baseline.honest_reports


def test_without_the_secret_the_attacker_enrolls_nothing_and_reports_nothing(
    model_bytes: bytes, baseline: FloodResult
) -> None:
    attacked = simulate(model_bytes, "no-credential", HALF_HOUR_S)

    assert attacked.attacker_enrolled == 0 and attacked.attacker_reports == 0
    assert attacked.honest_reports == baseline.honest_reports


def test_without_the_defences_the_flood_owns_the_rounds(model_bytes: bytes) -> None:
    # The coordinator as it was before issue 11 (no enrollment limit, no network cap, no
    # retry-window enforcement): the same attacker takes most reports.
    attacked = simulate(model_bytes, "undefended", 300.0)

    assert attacked.attacker_share > 0.5
