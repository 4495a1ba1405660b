"""Secure rounds commit whenever their survivors allow it: the soak of tests/secagg/soak.py.

60 rounds of 8 to 20 devices, each device stopping at each SecAgg stage with probability
0.04 (about one in seven stops somewhere), driven in process with messages arriving in
seeded bursts. Every round must end as its survivors allow: committed with their FedAvg
whenever every secret kept t holders and at least min_reports inputs were summed, failed
otherwise, and never failed because closing at the round's target cut live devices off.
"""

from __future__ import annotations

import asyncio
import pathlib

from server.sqlite_store import SqliteStore
from tests.fakes import FakeClock
from tests.identities import make_coordinator
from tests.secagg.soak import RoundOutcome, soak, soak_task_config
from tests.secagg.soak_in_process import InProcessSoakDriver

ROUNDS = 60


def _problems(outcomes: list[RoundOutcome]) -> list[str]:
    return [f"round {i + 1}: {p}" for i, o in enumerate(outcomes) for p in o.problems]


def test_secure_rounds_commit_whenever_enough_devices_survive_every_stage(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    # Prepare
    clock = FakeClock()
    coordinator = make_coordinator(SqliteStore(tmp_path / "c.sqlite"), clock)
    coordinator.register_task(soak_task_config(), model_bytes)
    driver = InProcessSoakDriver(coordinator, clock)

    # Execute
    outcomes = asyncio.run(soak(coordinator, driver, ROUNDS, seed=12, stop_rate=0.04))

    # Assert: each round as its survivors allow, within 2e-6 of their FedAvg.
    assert _problems(outcomes) == []
    # Not vacuous: small and large rounds, most commit, and committed rounds lost devices
    # at every stage.
    assert min(o.devices for o in outcomes) <= 9 and max(o.devices for o in outcomes) >= 19
    committed = [o for o in outcomes if o.committed]
    assert len(committed) >= ROUNDS * 3 // 4
    assert all(sum(o.stops[stage] for o in committed) > 0 for stage in range(4))
