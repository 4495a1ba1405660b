"""Whole sessions in process: the unmasked sum equals the plaintext sum of the survivors."""

import numpy as np
import pytest

from device_runtime.secagg.client_state import ClientStage
from device_runtime.secagg.parameters import SecAggParameters, choose_parameters
from protos import secagg_pb2
from tests.secagg.driver import (
    STAGES,
    Dropouts,
    plaintext_sum,
    random_dropouts,
    random_inputs,
    run_session,
)

VECTOR_LENGTH = 200


def _check_sum(n: int, modulus_bits: int, stage: str, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    parameters = choose_parameters(n)
    inputs = random_inputs(n, VECTOR_LENGTH, modulus_bits, rng)  # full range: sums wrap
    dropouts = random_dropouts(n, count, stage, rng)

    run = run_session(parameters, inputs, modulus_bits, dropouts)

    assert run.server.stage == secagg_pb2.COMPLETED, run.server.abort_reason
    total, num_summed = run.server.result()
    survivors = set(range(1, n + 1)) - dropouts.silent_from(2)
    assert num_summed == len(survivors)
    assert np.array_equal(total, plaintext_sum(inputs, survivors, modulus_bits))


@pytest.mark.parametrize("stage", STAGES)
def test_five_devices_with_a_dropout_at_each_stage(stage: str) -> None:
    _check_sum(5, 32, stage, 1, seed=5)


@pytest.mark.parametrize("stage", STAGES)
def test_fifty_devices_with_ten_percent_dropouts_at_each_stage(stage: str) -> None:
    _check_sum(50, 24, stage, 5, seed=50)


@pytest.mark.e2e  # about 10 s each on 2 shared cores
@pytest.mark.parametrize("stage", STAGES)
def test_three_hundred_devices_with_ten_percent_dropouts_at_each_stage(stage: str) -> None:
    _check_sum(300, 32, stage, 30, seed=300)


def test_dropouts_spread_over_every_stage_at_once() -> None:
    rng = np.random.default_rng(7)
    n = 50
    inputs = random_inputs(n, VECTOR_LENGTH, 32, rng)
    order = [int(c) for c in rng.permutation(np.arange(1, n + 1))]
    dropouts = Dropouts(set(order[:1]), set(order[1:2]), set(order[2:4]), set(order[4:5]))

    run = run_session(choose_parameters(n), inputs, 32, dropouts)

    total, _ = run.server.result()
    assert np.array_equal(total, plaintext_sum(inputs, set(order[2:]) - set(order[2:4]), 32))


def test_no_dropouts_sums_everyone_and_completes_every_client() -> None:
    rng = np.random.default_rng(1)
    inputs = random_inputs(5, VECTOR_LENGTH, 32, rng)

    run = run_session(choose_parameters(5), inputs, 32)

    assert np.array_equal(run.server.result()[0], plaintext_sum(inputs, set(range(1, 6)), 32))
    assert {c.stage for c in run.clients.values()} == {ClientStage.COMPLETED}


@pytest.mark.parametrize("stage", STAGES)
def test_the_session_aborts_cleanly_below_threshold(stage: str) -> None:
    # 5 devices, threshold 3: with 3 gone nobody keeps 3 live neighbours.
    rng = np.random.default_rng(3)
    inputs = random_inputs(5, VECTOR_LENGTH, 32, rng)

    run = run_session(choose_parameters(5), inputs, 32, Dropouts(**{stage: {1, 2, 3}}))

    assert run.server.stage == secagg_pb2.ABORTED
    assert "threshold" in run.server.abort_reason or "3-of-n" in run.server.abort_reason
    with pytest.raises(Exception, match="no result"):
        run.server.result()


def test_devices_left_when_the_session_aborts_are_told_why() -> None:
    rng = np.random.default_rng(4)
    inputs = random_inputs(5, VECTOR_LENGTH, 32, rng)

    run = run_session(choose_parameters(5), inputs, 32, Dropouts(after_r1={1, 2, 3}))

    for c in (4, 5):
        assert run.clients[c].stage == ClientStage.ABORTED
        assert "server aborted" in run.clients[c].abort_reason


def test_a_sparse_graph_session_with_hand_picked_parameters() -> None:
    # k = 4 neighbours of 12, t = 3: each device shares with a third of the others only.
    rng = np.random.default_rng(12)
    parameters = SecAggParameters(12, 4, 3, 1, 0)
    inputs = random_inputs(12, VECTOR_LENGTH, 16, rng)

    run = run_session(parameters, inputs, 16, Dropouts(after_r1={5}))

    survivors = set(range(1, 13)) - {5}
    assert np.array_equal(run.server.result()[0], plaintext_sum(inputs, survivors, 16))
