"""The codecs against the golden vectors checked into tests/aggregation/golden/: byte for byte."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from device_runtime.aggregation.codec import UpdateCodec, UpdateFlags
from device_runtime.aggregation.codec_spec import CodecSpec

GOLDEN = sorted((pathlib.Path(__file__).parent / "golden").glob("*.json"))


def _load(path: pathlib.Path) -> tuple[UpdateCodec, dict]:  # type: ignore[type-arg]
    case = json.loads(path.read_text())
    codec = UpdateCodec(CodecSpec(**case["codec"]), case["tensor_sizes"], case["seed"])
    return codec, case


def test_every_codec_has_a_golden_vector() -> None:
    names = {json.loads(p.read_text())["codec"]["name"] for p in GOLDEN}
    assert names == {"float32", "uniform", "sign", "top_k"}


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_encoder_reproduces_the_golden_payload(path: pathlib.Path) -> None:
    codec, case = _load(path)
    update = np.frombuffer(bytes.fromhex(case["update_f32_hex"]), "<f4")

    payload = codec.encode(update, UpdateFlags(case["flags"]), np.array(case["uniform_draws"]))

    assert payload.hex() == case["payload_hex"]


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_decoder_reproduces_the_golden_values(path: pathlib.Path) -> None:
    codec, case = _load(path)
    expected = np.frombuffer(bytes.fromhex(case["decoded_f32_hex"]), "<f4")

    decoded = codec.decode(bytes.fromhex(case["payload_hex"]))

    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-6)
    assert codec.parse(bytes.fromhex(case["payload_hex"])).flags == case["flags"]
