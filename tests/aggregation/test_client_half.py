"""The client half: zeroing, clipping, votes, non-finite updates, and the spec on the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_runtime import constants
from device_runtime.aggregation.client import (
    ClientAggregationSpec,
    NormBound,
    encode_for_upload,
    prepare_update,
)
from device_runtime.aggregation.codec import UpdateFlags
from device_runtime.aggregation.codec_spec import CodecError, CodecSpec
from protos import device_pb2


def _spec(**stages: NormBound) -> ClientAggregationSpec:
    return ClientAggregationSpec(CodecSpec(), seed=3, tensor_sizes=(4,), **stages)


def test_update_above_the_zeroing_bound_is_zeroed_and_flagged() -> None:
    spec = _spec(zeroing=NormBound(2.0, math.inf, estimate=5.0))

    update, flags = prepare_update(spec, np.array([0.5, -3.0, 0.0, 1.0], np.float32))

    np.testing.assert_array_equal(update, 0.0)
    assert flags == UpdateFlags.ZEROED | UpdateFlags.BELOW_ZEROING_ESTIMATE


def test_update_above_the_clipping_bound_is_scaled_onto_it() -> None:
    spec = _spec(clipping=NormBound(1.0, 2.0, estimate=1.0))

    update, flags = prepare_update(spec, np.array([3.0, 4.0, 0.0, 0.0], np.float32))

    np.testing.assert_allclose(update, [0.6, 0.8, 0.0, 0.0], rtol=1e-6)
    assert flags == UpdateFlags.CLIPPED  # norm 5 > estimate 1: votes "above"


def test_update_inside_both_bounds_is_unchanged() -> None:
    spec = _spec(zeroing=NormBound(10.0, math.inf), clipping=NormBound(10.0))
    delta = np.array([1.0, 2.0, 3.0, 4.0], np.float32)

    update, flags = prepare_update(spec, delta)

    np.testing.assert_array_equal(update, delta)
    assert flags == UpdateFlags(0)


def test_non_finite_update_is_sent_as_all_nan() -> None:
    update, flags = prepare_update(_spec(), np.array([1.0, np.inf, 0.0, 0.0], np.float32))

    assert np.all(np.isnan(update)) and flags == UpdateFlags(0)


def test_spec_survives_the_wire() -> None:
    spec = ClientAggregationSpec(
        CodecSpec("sign", threshold=5, keep_fraction=0.5),
        seed=2**64 - 1,
        tensor_sizes=(3, 9),
        zeroing=NormBound(21.0, math.inf, 10.0),
        clipping=NormBound(1.0, 2.0, 1.0),
    )

    wire = device_pb2.AggregationSpec.FromString(spec.to_proto().SerializeToString())

    assert ClientAggregationSpec.from_proto(wire) == spec


def test_unknown_encoding_or_codec_is_refused_on_the_device() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(CodecError, match="unsupported update encoding"):
        encode_for_upload(device_pb2.AggregationSpec(encoding="zip"), np.zeros(4), rng)
    bad_codec = _spec().to_proto()
    bad_codec.codec.name = "gzip"
    with pytest.raises(CodecError, match="unknown codec"):
        encode_for_upload(bad_codec, np.zeros(4), rng)


def test_update_of_the_wrong_size_is_refused_on_the_device() -> None:
    with pytest.raises(CodecError, match="describes 4"):
        encode_for_upload(_spec().to_proto(), np.zeros(5), np.random.default_rng(0))


def test_assignment_without_a_spec_uploads_raw_float32() -> None:
    delta = np.array([1.5, -2.0], np.float32)

    upload = encode_for_upload(device_pb2.AggregationSpec(), delta, np.random.default_rng(0))

    assert upload.encoding == constants.UPDATE_ENCODING_FLOAT32_DELTA
    assert upload.payload == delta.astype("<f4").tobytes()
