"""secure_aggregator() end to end: 8 emulated phones, real gRPC, LiteRT training, real SecAgg.

One phone is interrupted mid-training in round 1 and never comes back. Each committed round
must move the global weights by the plaintext weighted FedAvg of its survivors' clipped
updates (within quantization error), and at no moment may the coordinator hold one device's
quantized input, in memory or in its store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib

import numpy as np
import pytest

from device_runtime.aggregation.norms import clip_l2
from device_runtime.conditions import DeviceConditions
from device_runtime.secagg.secure_upload import SecureUpload
from device_runtime.secagg.session_runner import SecAggSessionRunner
from emulator.data import federated_digits
from emulator.fleet import Fleet
from server.coordinator import CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from server.store import RoundState
from tests.fakes import ScriptedConditions
from tests.harness import POPULATION, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET
from tests.secagg.test_privacy_invariant import _reachable

pytestmark = pytest.mark.e2e

PHONES = 8
DROPOUT = 3  # phone index interrupted in round 1
CLIP = 0.5
MAX_WEIGHT = 10_000.0


@dataclasses.dataclass
class Contribution:
    delta: np.ndarray
    weight: float
    quantized: np.ndarray | None = None


def _window(contribution: Contribution, vector: np.ndarray) -> bytes:
    """8 consecutive elements around the delta's largest change (many elements are 0)."""
    start = min(int(np.argmax(np.abs(contribution.delta))), contribution.delta.size - 8)
    return vector[start : start + 8].tobytes()


def _holds(roots: list[object], window: bytes) -> bool:
    for root in roots:
        for item in _reachable(root):
            if isinstance(item, np.ndarray) and window in item.tobytes():
                return True
            if isinstance(item, bytes | bytearray) and window in item:
                return True
    return False


def test_two_secure_rounds_with_a_dropout_commit_the_survivors_fedavg(
    tmp_path: pathlib.Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spies that call through: what each device sent, keyed by (session id, client id).
    sent: dict[tuple[bytes, int], Contribution] = {}
    send_update, send_masked_input = SecureUpload.send_update, SecAggSessionRunner.send_masked_input

    async def spy_update(
        self: SecureUpload, delta: np.ndarray, weight: float, rng: np.random.Generator
    ) -> None:
        key = (self._enrollment.session_id, self._enrollment.client_id)
        sent[key] = Contribution(delta.copy(), weight)
        await send_update(self, delta, weight, rng)

    async def spy_masked(self: SecAggSessionRunner, quantized: np.ndarray) -> None:
        await send_masked_input(self, quantized)
        sent[(self._config.session_id, self._config.client_id)].quantized = quantized.copy()

    monkeypatch.setattr(SecureUpload, "send_update", spy_update)
    monkeypatch.setattr(SecAggSessionRunner, "send_masked_input", spy_masked)

    config = task_config(
        total_rounds=2,
        target_reports=7,
        over_selection=1.14,  # 8 selected
        min_reports=5,
        selection_deadline_s=3.0,
        reporting_deadline_s=30.0,
        aggregator=f"secure_aggregator(clip={CLIP}, max_weight={MAX_WEIGHT})",
    )
    data = federated_digits(PHONES, seed=5)
    violations: list[str] = []
    checks = [0]

    def conditions_of(index: int) -> DeviceConditions:
        # The dropout polls once at check-in, then per batch: it stops after 3 batches.
        return ScriptedConditions(stop_after=4 if index == DROPOUT else None)

    async def scenario() -> tuple[list[np.ndarray], list[object], bytes]:
        settings = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=0.1, horizon_s=60))
        async with running_coordinator(
            str(tmp_path / "c.sqlite"), model_bytes, config, settings=settings
        ) as running:
            coordinator = running.coordinator
            task = coordinator.task("t1")
            weights = [task.weights.copy()]
            service = coordinator.secure_rounds.service
            tick = service._on_change

            def inspect_then_tick() -> None:
                # After every message the sessions took: no device's quantized input inside.
                roots: list[object] = [h.server_or_none for h in service._sessions.values()]
                roots += [r.aggregate for r in task.open_rounds.values()]
                for c in list(sent.values()):
                    if c.quantized is not None and _holds(roots, _window(c, c.quantized)):
                        violations.append("an individual quantized input on the coordinator")
                checks[0] += 1
                assert tick is not None
                tick()

            service._on_change = inspect_then_tick
            fleet = Fleet(
                running.address,
                running.trust,
                POPULATION,
                data.clients,
                seed=5,
                conditions_of=conditions_of,
                enrollment_secret=ENROLLMENT_SECRET,
            )
            stop = asyncio.Event()
            fleet_task = asyncio.create_task(fleet.run(stop))
            committed = 0
            for _ in range(600):
                await asyncio.sleep(0.1)
                if task.committed_rounds > committed:
                    committed = task.committed_rounds
                    weights.append(task.weights.copy())
                if task.completed or fleet_task.done():
                    break
            stop.set()
            await fleet_task
            rounds = list(running.store.rounds("t1"))
        return weights, rounds, (tmp_path / "c.sqlite").read_bytes()

    weights, rounds, store_bytes = asyncio.run(scenario())

    assert [r.state for r in rounds] == [RoundState.COMMITTED] * 2
    sessions = list(dict.fromkeys(session for session, _ in sent))
    assert len(sessions) == 2 and len(weights) == 3
    for number, (session, record) in enumerate(zip(sessions, rounds, strict=True)):
        survivors = [c for (s, _), c in sent.items() if s == session and c.quantized is not None]
        assert record.metrics["aggregator/secure_sum/num_summed"] == len(survivors)
        assert len(survivors) == 7
        scales = np.array([min(c.weight / MAX_WEIGHT, 1.0) for c in survivors])
        clipped = np.array([np.clip(clip_l2(c.delta, CLIP)[0], -CLIP, CLIP) for c in survivors])
        fedavg = (scales[:, None] * clipped).sum(axis=0) / scales.sum()
        moved = weights[number + 1].astype(np.float64) - weights[number]
        assert np.max(np.abs(moved - fedavg)) < 2e-6
        unweighted = clipped.mean(axis=0)
        assert np.max(np.abs(moved - unweighted)) > 1e-4  # the weights were summed too
    # Round 1 selected the dropout, which never sent a masked input.
    assert rounds[0].selected == 8 and rounds[0].dropped == 1
    # The privacy invariant held at every check, and nothing individual reached the store.
    assert checks[0] > 20 and violations == []
    for contribution in sent.values():
        assert contribution.quantized is not None
        assert _window(contribution, contribution.quantized) not in store_bytes
        assert _window(contribution, contribution.delta.astype("<f4")) not in store_bytes
