"""Writes the golden vectors of every codec: `python -m tests.aggregation.golden.make_golden`.

Each JSON file holds a codec spec, the model's tensor sizes, the round seed, the flags, the
input update, the stochastic-rounding draws, the exact payload and its decoding. A client in
another language proves its encoder by producing `payload_hex` from the inputs, and its
decoder (or a server's) by producing `decoded` from `payload_hex`. Regenerate only when the
wire format changes on purpose (and bump codec.FORMAT_VERSION).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from device_runtime.aggregation.codec import UpdateCodec, UpdateFlags
from device_runtime.aggregation.codec_spec import CodecSpec

HERE = pathlib.Path(__file__).resolve().parent
TENSOR_SIZES = (6, 45, 70, 3)  # 124 values: biases exact below the threshold, blocks 16+...
CASES: dict[str, tuple[CodecSpec, int]] = {
    "float32": (CodecSpec(), 0),
    "uniform_8bit": (CodecSpec("uniform", bits=8, threshold=10), 0),
    "uniform_3bit_rotated": (
        CodecSpec("uniform", bits=3, threshold=10, rotation=True, max_block_size=32),
        2,
    ),
    "sign_rotated": (CodecSpec("sign", threshold=10, max_block_size=32), 10),
    "sign_subsampled": (CodecSpec("sign", threshold=0, keep_fraction=0.75, max_block_size=64), 8),
    "top_k": (CodecSpec("top_k", threshold=10, top_k_fraction=0.2), 0),
}


def make_case(spec: CodecSpec, flags: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    update = (rng.standard_normal(sum(TENSOR_SIZES)) * np.exp(rng.standard_normal(124))).astype(
        np.float32
    )
    codec = UpdateCodec(spec, TENSOR_SIZES, seed=0x0123456789ABCDEF + seed)
    draws = codec.uniform_draws(rng)
    payload = codec.encode(update, UpdateFlags(flags), draws)
    return {
        "codec": dataclasses.asdict(spec),
        "tensor_sizes": list(TENSOR_SIZES),
        "seed": codec.seed,
        "flags": flags,
        "update_f32_hex": update.astype("<f4").tobytes().hex(),
        "uniform_draws": [float(u) for u in draws],
        "payload_hex": payload.hex(),
        "decoded_f32_hex": codec.decode(payload).astype("<f4").tobytes().hex(),
    }


def main() -> None:
    for index, (name, (spec, flags)) in enumerate(CASES.items()):
        path = HERE / f"{name}.json"
        path.write_text(json.dumps(make_case(spec, flags, index), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
