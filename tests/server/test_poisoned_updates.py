"""A device that skips the client half of the aggregator (no zeroing, no clipping, no flags)
cannot move the committed model past the aggregator's bounds: the coordinator applies them."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from device_runtime import constants
from device_runtime.aggregation.client import ClientAggregationSpec
from device_runtime.aggregation.codec import UpdateFlags
from protos import common_pb2, device_pb2
from server.coordinator import Coordinator
from server.sqlite_store import SqliteStore
from server.store import RoundState
from tests.fakes import FakeClock
from tests.harness import task_config
from tests.identities import check_in, make_coordinator, sign_header


def _assignment(coordinator: Coordinator, device_id: str) -> device_pb2.Assignment:
    return check_in(coordinator, device_id).assignment


def _upload_raw(
    coordinator: Coordinator, assignment: device_pb2.Assignment, delta: np.ndarray
) -> None:
    """Encodes `delta` with the round's codec as is: no zeroing, no clipping, no flags."""
    spec = ClientAggregationSpec.from_proto(assignment.aggregation)
    codec = spec.codec_for_round()
    draws = codec.uniform_draws(np.random.default_rng(0))
    payload = codec.encode(delta.astype(np.float32), UpdateFlags(0), draws)
    header = device_pb2.UploadHeader(
        protocol_version=constants.PROTOCOL_VERSION,
        upload_token=assignment.upload_token,
        example_count=10,
        num_elements=delta.size,
        encoding=constants.UPDATE_ENCODING_V1,
        metrics=common_pb2.ClientMetrics(loss=1.0, accuracy=0.5, num_examples=10),
    )
    sign_header(header)
    coordinator.accept_upload(header, payload, len(payload))
    coordinator.tick()  # the round driver ends the round if this report completed it


@pytest.mark.parametrize(
    ("aggregator", "poison", "max_step", "enforced"),
    [
        # Zeroed: the honest update is zeros, so the model does not move at all.
        ("robust_aggregator()", 1e30, 0.0, "aggregator/zeroing/enforced_count"),
        ("compression_aggregator()", 1e30, 0.0, "aggregator/zeroing/enforced_count"),
        # Clipped to the bound (1, TFF's initial estimate), averaged with one zero update.
        ("robust_aggregator(zeroing=false)", 1e3, 0.5, "aggregator/clipping/enforced_count"),
        (
            "compression_aggregator(zeroing=false)",
            1e3,
            0.5 * 1.02,  # 8-bit quantization noise the server tolerates
            "aggregator/clipping/enforced_count",
        ),
        # DP's clip (0.1, TFF's initial) is the sensitivity: mean = clipped sum / 2 clients.
        (
            "dp_aggregator(noise_multiplier=0, clients_per_round=2, zeroing=false)",
            1e3,
            0.05,
            "aggregator/dp/enforced_count",
        ),
    ],
)
def test_a_poisoned_update_moves_the_model_at_most_by_the_aggregators_bound(
    tmp_path: pathlib.Path,
    model_bytes: bytes,
    aggregator: str,
    poison: float,
    max_step: float,
    enforced: str,
) -> None:
    coordinator = make_coordinator(SqliteStore(tmp_path / "c.sqlite"), FakeClock())
    coordinator.register_task(
        task_config(target_reports=2, over_selection=1.0, aggregator=aggregator), model_bytes
    )
    task = coordinator.task("t1")
    before = task.weights.astype(np.float64)
    honest, attacker = _assignment(coordinator, "honest"), _assignment(coordinator, "mallory")
    n = task.record.num_parameters

    _upload_raw(coordinator, honest, np.zeros(n))
    _upload_raw(coordinator, attacker, np.full(n, poison))

    [record] = coordinator.rounds("t1")
    step = np.linalg.norm(task.weights.astype(np.float64) - before)
    assert record.state is RoundState.COMMITTED
    assert np.all(np.isfinite(task.weights))
    assert step <= max_step * (1 + 1e-5) + 1e-6
    assert record.metrics[enforced] == 1
