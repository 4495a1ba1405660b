"""The secure-round soak (tests/secagg/soak.py) over gRPC on loopback: 20 rounds.

Each device is its own coroutine speaking the coordinator's and SecAggService's RPCs, so the
messages of a stage race each other as they do from phones.
"""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from tests.fakes import FakeClock
from tests.harness import running_coordinator
from tests.secagg.soak import RoundOutcome, soak, soak_task_config
from tests.secagg.soak_grpc import GrpcSoakDriver

pytestmark = pytest.mark.e2e

ROUNDS = 20


def test_secure_rounds_over_grpc_commit_whenever_enough_devices_survive(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def scenario() -> list[RoundOutcome]:
        clock = FakeClock()
        async with running_coordinator(
            str(tmp_path / "c.sqlite"), model_bytes, soak_task_config(), clock=clock
        ) as running:
            driver = GrpcSoakDriver(running.coordinator, clock, running.address, running.trust)
            return await soak(running.coordinator, driver, ROUNDS, seed=7, stop_rate=0.04)

    outcomes = asyncio.run(scenario())

    assert [f"round {i + 1}: {p}" for i, o in enumerate(outcomes) for p in o.problems] == []
    assert sum(o.committed for o in outcomes) >= ROUNDS // 2
