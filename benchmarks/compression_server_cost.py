"""Server cost of accumulating one encoded update, against a numpy in-place float32 add.

    .venv/bin/python -m benchmarks.compression_server_cost

For each codec, times `parse` (all structural checks) + `CodecAccumulator.add` (decode into the
running sum) of one update of the McMahan CNN's size (1,663,370 parameters, its tensor layout),
and, side by side in the same loop, `acc += update` on float32 arrays of the same length. The
goal (issues 5 and 17): at most 3x the plain add. Exact values are summed in float32 within a
block of updates and in float64 across blocks (`CodecAccumulator.updates_per_block`), so each
sample is the mean over a whole block of updates, its float64 addition included: the
per-update cost a round pays. Prints the figures and records them in
RESULTS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from benchmarks.machine import record_section
from device_runtime.aggregation.codec import CodecAccumulator, UpdateCodec, UpdateFlags
from device_runtime.aggregation.codec_spec import CodecSpec

# McMahan et al.'s CNN for 28x28 digits: conv 5x5x1x32, conv 5x5x32x64, dense 3136x512, 512x10.
MCMAHAN_CNN_TENSORS = (800, 32, 51200, 64, 1605632, 512, 5120, 10)
CODECS = {
    "float32 (encoded, exact)": CodecSpec(),
    "uniform 8-bit, TFF threshold (compression_aggregator)": CodecSpec("uniform", bits=8),
    "uniform 8-bit + rotation": CodecSpec("uniform", bits=8, threshold=0, rotation=True),
    "uniform 4-bit": CodecSpec("uniform", bits=4, threshold=0),
    "sign 1-bit + rotation (DRIVE)": CodecSpec("sign", threshold=0),
    "sign, 95% of coordinates (one_bit_aggregator)": CodecSpec(
        "sign", threshold=0, keep_fraction=0.95
    ),
}
REPEATS = 31
BLOCK = CodecAccumulator.updates_per_block  # updates per timed sample


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure() -> list[tuple[str, float, float, float]]:
    rng = np.random.default_rng(0)
    n = sum(MCMAHAN_CNN_TENSORS)
    update = (0.01 * rng.standard_normal(n)).astype(np.float32)
    rows = []
    for name, spec in CODECS.items():
        codec = UpdateCodec(spec, MCMAHAN_CNN_TENSORS, seed=7)
        payload = codec.encode(update, UpdateFlags(0), codec.uniform_draws(rng))
        accumulator = codec.new_accumulator()
        plain_sum = np.zeros(n, np.float32)
        ours, plain = [], []
        for _ in range(REPEATS):
            ours_block = plain_block = 0.0
            for _ in range(BLOCK):  # interleaved, so both see the same machine noise
                ours_block += _timed(lambda: accumulator.add(codec.parse(payload), 3.0))  # noqa: B023
                plain_block += _timed(lambda: np.add(plain_sum, update, out=plain_sum))  # noqa: B023
            ours.append(ours_block / BLOCK)
            plain.append(plain_block / BLOCK)
        ours_s, plain_s = statistics.median(ours), statistics.median(plain)
        rows.append((name, 8 * len(payload) / n, ours_s, ours_s / plain_s))
        print(
            f"{name:50s} {8 * len(payload) / n:6.3f} bit/param  accumulate "
            f"{1e3 * ours_s:7.2f} ms  numpy add {1e3 * plain_s:6.2f} ms  "
            f"ratio {ours_s / plain_s:5.2f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-record", action="store_true", help="do not record in RESULTS.md")
    args = parser.parse_args()
    rows = measure()
    lines = [
        "| codec | bits/param (payload) | accumulate one update (ms, median per block) "
        "| ratio to numpy float32 add |",
        "|---|---|---|---|",
        *(
            f"| {name} | {bits:.3f} | {1e3 * s:.2f} | {ratio:.2f} |"
            for name, bits, s, ratio in rows
        ),
        "",
        f"Update of {sum(MCMAHAN_CNN_TENSORS):,} parameters (McMahan CNN layout); median of "
        f"{REPEATS} interleaved samples, each the mean over a block of {BLOCK} updates "
        "(the block's float64 addition included); accumulate = parse (all checks) + decode "
        "into the sum. "
        f"Goal: ratio <= 3. Python {platform.python_version()}, numpy {np.__version__}.",
    ]
    over = [f"{name} ({ratio:.2f})" for name, _, _, ratio in rows if ratio > 3]
    goal = "(issues 5, 17) ratio to a numpy float32 add <= 3: " + (
        f"not met by {', '.join(over)}" if over else "met by every codec"
    )
    print(f"Goal: {goal}")
    if args.no_record:
        return
    record_section(
        "Issue 5 — server cost of accumulating an encoded update", "\n".join(lines), goal=goal
    )


if __name__ == "__main__":
    main()
