"""The coordinator never holds a device's unmasked input: checked after every stage.

After each stage we walk everything reachable from the server object (its session data,
states, arrays, bytes, protobufs) and look for any device's input vector: as an array, as
its wire bytes, or as any contiguous run of 8 of its elements. Only the final sum of the
survivors may appear, and only after unmasking.
"""

from __future__ import annotations

import numpy as np

from device_runtime.secagg.parameters import choose_parameters
from protos import secagg_pb2
from server.secagg.server import SecAggServer
from tests.secagg.driver import Dropouts, plaintext_sum, random_inputs, run_session

LENGTH = 64


def _reachable(root: object) -> list[object]:
    seen: set[int] = set()
    found: list[object] = []
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        found.append(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif hasattr(item, "ListFields"):  # protobuf message
            stack.extend(v for _, v in item.ListFields())
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
        elif hasattr(item, "__slots__"):
            stack.extend(getattr(item, s) for s in item.__slots__ if hasattr(item, s))
    return found


def _holds(server: SecAggServer, vector: np.ndarray) -> bool:
    window = vector[:8].tobytes()
    for item in _reachable(server):
        if isinstance(item, np.ndarray) and item.dtype == np.uint32 and window in item.tobytes():
            return True
        if isinstance(item, bytes | bytearray) and window in item:
            return True
    return False


def test_no_stage_leaves_an_individual_input_on_the_server() -> None:
    rng = np.random.default_rng(21)
    n = 20
    inputs = random_inputs(n, LENGTH, 32, rng)
    dropouts = Dropouts(after_r1={4}, after_r2={9})
    checked: list[str] = []

    def inspect(stage: str, server: SecAggServer) -> None:
        for client, vector in inputs.items():
            assert not _holds(server, vector), f"server holds client {client}'s input after {stage}"
        checked.append(stage)

    run = run_session(choose_parameters(n), inputs, 32, dropouts, after_stage=inspect)

    assert checked == ["advertise_keys", "share_keys", "masked_input_collection", "unmasking"]
    survivors = set(range(1, n + 1)) - {4}
    total, _ = run.server.result()
    assert np.array_equal(total, plaintext_sum(inputs, survivors, 32))
    assert _holds(run.server, total)  # the check does find what is there


def test_a_lone_masked_input_on_the_server_is_not_the_input() -> None:
    # Mid-collection the running sum is one device's masked input: still masked.
    rng = np.random.default_rng(22)
    inputs = random_inputs(5, LENGTH, 32, rng)
    snapshots: dict[str, bool] = {}

    def inspect(stage: str, server: SecAggServer) -> None:
        if stage == "masked_input_collection":
            snapshots[stage] = any(_holds(server, v) for v in inputs.values())

    run = run_session(choose_parameters(5), inputs, 32, after_stage=inspect)

    assert snapshots == {"masked_input_collection": False}
    assert run.server.stage == secagg_pb2.COMPLETED
