"""Secure aggregation cost: client and server compute, and bytes per device.

For n devices summing m-element vectors mod 2^32, with 0% or 10% of devices dropping out
after sharing keys (the costliest point: the server must rebuild each dropped device's mask
key and remove its pairwise masks with every surviving neighbour), it reports:
  client s   mean wall time per device over all four rounds (max in brackets)
  server s   wall time of all server calls (message handling, stage closes, unmasking)
  plain s    the same machine summing the survivors' float32 vectors in numpy: a baseline
  bytes/dev  everything a device sends (serialized messages and masked-input chunks) over a
             plain 32-bit upload of the same vector (4 m bytes)
Inputs are generated per device from a seed and never all held at once; the unmasked sum
is checked against the plaintext sum in every run.

Run: .venv/bin/python -m benchmarks.secagg_bench [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import numpy as np

from benchmarks.machine import append_section
from device_runtime import constants
from device_runtime.secagg import masking
from device_runtime.secagg.client import SecAggClient
from device_runtime.secagg.parameters import choose_parameters
from protos import secagg_pb2
from server.secagg.server import SecAggServer

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
MODULUS_BITS = 32


@dataclasses.dataclass
class Figures:
    n: int
    m: int
    dropout: float
    k: int
    t: int
    client_mean_s: float
    client_max_s: float
    server_s: float
    plain_sum_s: float
    bytes_ratio: float


def _input(c: int, m: int) -> np.ndarray:
    return np.random.default_rng(c).integers(0, 1 << 22, m, dtype=np.uint32)


def _masked_input_bytes(config: secagg_pb2.SecAggSessionConfig, masked: np.ndarray) -> int:
    """Serialized size of the MaskedInputChunk stream a device sends (header, 1 MiB chunks)."""
    header = secagg_pb2.MaskedInputChunk(
        header=secagg_pb2.MaskedInputHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            session_id=config.session_id,
            client_id=config.client_id,
            session_token=config.session_token,
            vector_length=masked.size,
        )
    )
    payload = len(masking.to_bytes(masked))
    total, step = header.ByteSize(), constants.chunk_size_bytes
    for start in range(0, payload, step):
        total += secagg_pb2.MaskedInputChunk(data=bytes(min(step, payload - start))).ByteSize()
    return total


def run(n: int, m: int, dropout: float) -> Figures:
    parameters = choose_parameters(n)
    server_s = 0.0

    def on_server(call, *args):  # type: ignore[no-untyped-def]
        nonlocal server_s
        start = time.perf_counter()
        result = call(*args)
        server_s += time.perf_counter() - start
        return result

    server = on_server(SecAggServer, parameters, MODULUS_BITS, m)
    clients = {c: SecAggClient(server.session_config(c)) for c in range(1, n + 1)}
    client_s = dict.fromkeys(clients, 0.0)
    sent = dict.fromkeys(clients, 0)
    rng = np.random.default_rng(n * 7 + m)
    dropped = {int(c) for c in rng.choice(np.arange(1, n + 1), int(dropout * n), replace=False)}

    def timed(c: int, call, *args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        result = call(*args)
        client_s[c] += time.perf_counter() - start
        return result

    def send(c: int, field: str, payload) -> None:  # type: ignore[no-untyped-def]
        message = clients[c].envelope()
        getattr(message, field).CopyFrom(payload)
        sent[c] += message.ByteSize()
        on_server(server.receive, message)

    def request(c: int) -> secagg_pb2.SecAggServerMessage:
        e = clients[c].envelope()
        return on_server(server.server_message, e.session_id, c, e.session_token)

    for c, client in clients.items():
        send(c, "advertise_keys", timed(c, client.advertise_keys))
    for c, client in clients.items():
        send(c, "share_keys", timed(c, client.share_keys, request(c).share_keys_request))
    expected = np.zeros(m, np.uint32)
    for c, client in clients.items():
        if c in dropped:
            continue
        x = _input(c, m)
        expected += x
        masked = timed(c, client.masked_input, request(c).masked_input_request, x)
        sent[c] += _masked_input_bytes(client.envelope(), masked)
        e = client.envelope()
        on_server(server.receive_masked_input, e.session_id, c, e.session_token, masked)
    if server.stage == secagg_pb2.MASKED_INPUT_COLLECTION:
        on_server(
            server.close_stage, secagg_pb2.MASKED_INPUT_COLLECTION
        )  # the deadline: the dropped devices never send
    for c, client in clients.items():
        if c not in dropped:
            response = timed(c, client.unmasking_response, request(c).unmasking_request)
            send(c, "unmasking_response", response)
    total, count = server.result()
    if count != n - len(dropped) or not np.array_equal(total, expected):
        raise AssertionError("the unmasked sum differs from the plaintext sum")

    start = time.perf_counter()  # baseline: a plain float32 sum of as many vectors
    plain = np.zeros(m, np.float32)
    vector = _input(1, m).astype(np.float32)
    for _ in range(count):
        plain += vector
    plain_s = time.perf_counter() - start

    survivors = [c for c in clients if c not in dropped]
    times = [client_s[c] for c in survivors]
    ratio = float(np.mean([sent[c] for c in survivors])) / (4 * m)
    return Figures(
        n, m, dropout, parameters.num_neighbours, parameters.threshold,
        float(np.mean(times)), float(np.max(times)), server_s, plain_s, ratio,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, no RESULTS.md")
    parser.add_argument("--sizes", default="100,1000", help="device counts n")
    parser.add_argument("--lengths", default="100000,1663370", help="vector lengths m")
    args = parser.parse_args()
    sizes = [20] if args.quick else [int(v) for v in args.sizes.split(",")]
    lengths = [1000] if args.quick else [int(v) for v in args.lengths.split(",")]
    header = (
        "| n | m | dropout | k | t | client s/device (max) | server s | plain sum s "
        "| server / plain | bytes / plain upload |"
    )
    lines = [header, "|" + "---|" * 10]
    for n in sizes:
        for m in lengths:
            for dropout in (0.0, 0.1):
                f = run(n, m, dropout)
                line = (
                    f"| {f.n} | {f.m:,} | {f.dropout:.0%} | {f.k} | {f.t} "
                    f"| {f.client_mean_s:.3f} ({f.client_max_s:.3f}) | {f.server_s:.2f} "
                    f"| {f.plain_sum_s:.3f} | {f.server_s / f.plain_sum_s:.0f}x "
                    f"| {f.bytes_ratio:.3f}x |"
                )
                print(line, flush=True)
                lines.append(line)
    if args.quick:
        return
    append_section(
        "Secure aggregation (issue 6)",
        "\n".join(
            [
                "`python -m benchmarks.secagg_bench`. Modulus 2^32; 10% of devices drop after",
                "sharing keys (the server then rebuilds their mask keys and removes their pairwise",
                "masks). Wall times on a shared machine, one run.",
                "",
                *lines,
            ]
        ),
    )


if __name__ == "__main__":
    main()
