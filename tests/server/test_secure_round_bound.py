"""What one malicious device can do to a secure_aggregator() round: move the mean by at most
2 * clip in L2 norm (device_runtime/secagg/secure_mean.py, README "Security")."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from device_runtime.secagg import masking
from device_runtime.secagg.client import SecAggClient
from device_runtime.secagg.secure_upload import secure_mean_encoding
from protos import device_pb2
from server.coordinator import Coordinator
from server.secagg.server import SecAggServer
from server.store import RoundState
from tests.fakes import FakeClock
from tests.identities import device_key
from tests.server.test_secure_rounds import (
    _coordinator,
    _envelope,
    _report,
    _select,
    _session,
    _share_keys,
)

CLIP = 0.5  # tests.server.test_secure_rounds.AGGREGATOR
EXAMPLES = 40


def _honest_input(
    session: SecAggServer, client_id: int, assignment: device_pb2.Assignment
) -> np.ndarray:
    """A device's quantized input: a delta of L2 norm 0.01 * client id (under the clip)."""
    config = session.session_config(client_id)
    encoding = secure_mean_encoding(assignment.aggregation, config)
    n = config.vector_length - 1
    delta = np.full(n, 0.01 * client_id / np.sqrt(n), np.float32)
    return encoding.encode(delta, float(EXAMPLES), np.random.default_rng(client_id))


def _send(session: SecAggServer, client: SecAggClient, quantized: np.ndarray) -> None:
    e = _envelope(client)
    request = session.server_message(e.session_id, e.client_id, e.session_token)
    masked = client.masked_input(request.masked_input_request, quantized)
    session.receive_masked_input(e.session_id, e.client_id, e.session_token, masked)


def _all_ones(honest: list[np.ndarray], modulus_bits: int) -> np.ndarray:
    return np.full(honest[0].shape, (1 << modulus_bits) - 1, np.uint32)


def _vanishing_weight(honest: list[np.ndarray], modulus_bits: int) -> np.ndarray:
    """The worst case: an attacker who knows the honest inputs makes the summed weight 1e-5
    of one device's (dividing the mean by almost nothing) and every other sum the field's top.
    """
    top = (1 << modulus_bits) - 1
    levels = (1 << (modulus_bits - 3)) - 1  # 8 enrolled devices: 3 bits of headroom
    honest_sum = np.sum([h.astype(np.int64) for h in honest], axis=0)
    attack = (top - honest_sum) % (1 << modulus_bits)
    attack[-1] = (round(1e-5 * levels) - honest_sum[-1]) % (1 << modulus_bits)
    return attack.astype(np.uint32)


def _run_round(
    coordinator: Coordinator, attack: object | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """One secure round of 8 selected devices, 7 summed: client 1 is the attacker (or honest
    when `attack` is None). Returns the committed mean delta, the honest mean, and n."""
    task = coordinator.task("t1")
    before = task.weights.copy()
    assignments = _select(coordinator, 8)
    session = _session(coordinator)
    # Client i + 1 is device d{i} (selected in that order); each signs its keys.
    clients = [SecAggClient(session.session_config(i + 1), device_key(f"d{i}")) for i in range(8)]
    _share_keys(session, clients)
    inputs = [_honest_input(session, i + 1, a) for i, a in enumerate(assignments[:7])]
    if attack is not None:
        assert callable(attack)
        inputs[0] = attack(inputs[1:], session.session_config(1).modulus_bits)
    n = task.record.num_parameters
    for client, assignment, quantized in zip(clients, assignments, inputs, strict=False):
        _send(session, client, quantized)
        coordinator.accept_upload(_report(assignment, n), b"", 0)
    coordinator.tick()
    for client in clients[:7]:
        e = _envelope(client)
        request = session.server_message(e.session_id, e.client_id, e.session_token)
        message = _envelope(client)
        message.unmasking_response.CopyFrom(client.unmasking_response(request.unmasking_request))
        session.receive(message)
    coordinator.tick()
    assert coordinator.rounds("t1")[-1].state is RoundState.COMMITTED
    honest_ids = np.arange(2, 8) if attack is not None else np.arange(1, 8)
    honest_mean = np.full(n, 0.01 * honest_ids.mean() / np.sqrt(n))
    return (task.weights - before).astype(np.float64), honest_mean, n


@pytest.mark.parametrize("attack", [_all_ones, _vanishing_weight])
def test_a_malicious_device_moves_the_secure_mean_by_at_most_twice_the_clip(
    tmp_path: pathlib.Path, model_bytes: bytes, attack: object
) -> None:
    coordinator = _coordinator(tmp_path, FakeClock(), model_bytes)

    committed, honest_mean, _ = _run_round(coordinator, attack)

    assert np.all(np.isfinite(committed))
    assert np.linalg.norm(committed) <= CLIP * (1 + 1e-5)
    assert np.linalg.norm(committed - honest_mean) <= 2 * CLIP * (1 + 1e-5)


def test_without_an_attacker_the_bound_leaves_the_mean_alone(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    coordinator = _coordinator(tmp_path, FakeClock(), model_bytes)

    committed, honest_mean, _ = _run_round(coordinator, None)

    assert np.allclose(committed, honest_mean, rtol=1e-3, atol=1e-7)


def test_decoding_without_the_bound_would_let_the_attack_explode() -> None:
    """Why the bound is needed: decoded without it, the vanishing-weight attack multiplies
    the mean by the field's resolution."""
    from device_runtime.secagg.secure_mean import SecureMeanEncoding

    encoding = SecureMeanEncoding(CLIP, 10_000.0, 8, masking.max_modulus_bits)
    honest = [
        encoding.encode(np.full(100, 0.01, np.float32), 40.0, np.random.default_rng(i))
        for i in range(6)
    ]
    total = np.sum([*honest, _vanishing_weight(honest, encoding.modulus_bits)], axis=0)

    mean, weight = encoding.decode(total.astype(np.uint32), 7)

    quantizer = encoding.quantizer
    sums = quantizer.dequantize_sum(total.astype(np.uint32), 7).astype(np.float64)
    unbounded = sums[:-1] / ((sums[-1] + 7 * CLIP) / (2 * CLIP))
    assert np.linalg.norm(unbounded) > 1e3 * CLIP
    assert np.linalg.norm(mean) <= CLIP * (1 + 1e-6) and 0 <= weight <= 7 * 10_000.0
