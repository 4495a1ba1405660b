"""Secure rounds under seeded dropouts at every SecAgg stage, against a real coordinator.

Each round selects 8 to 20 devices; each runs the real device half of SecAgg (SecAggClient)
and may stop at a seeded stage: before advertising keys, after advertising, after sharing keys
(no masked input), or after its masked input (no unmasking response); some say so with a
failure report, the others just go silent. A fake clock moves to a stage's deadline only once
every device has done what it will do at that stage, so nothing depends on speed. Two drivers
run the same plans: tests/secagg/soak_in_process.py (the coordinator's objects on one event
loop, messages arriving in seeded bursts) and tests/secagg/soak_grpc.py (gRPC on loopback).

What each round must do follows from who meant to take part in each stage and the round's
neighbour graph. U1, U2 and U4 are the devices whose plan has them speak at that stage (of
those the server took at the stage before): a server that drops one of them, e.g. by cutting
a stage short, fails the check. U3 is who the server took, from the acknowledgements: closing
the masked-input stage at the round's target may refuse late devices by design, but must not
be what makes the round fail. The session completes exactly when every secret the protocol
needs keeps t holders (`why_not_recoverable`), and the round commits exactly when it completes
with at least `min_reports` summed inputs; a committed round moves the weights by the
survivors' FedAvg, within 2e-6.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from typing import Protocol

import numpy as np

from device_runtime.aggregation.norms import clip_l2
from device_runtime.secagg.graph import NeighbourGraph
from protos import secagg_pb2
from server.config import TaskConfig
from server.coordinator import Coordinator
from server.secagg.round_bridge import stage_deadline_fraction
from server.secagg.server import SecAggServer
from server.store import RoundRecord, RoundState
from tests.harness import task_config

CLIP = 0.5
MAX_WEIGHT = 100.0
MIN_DEVICES, MAX_DEVICES = 8, 20
MIN_REPORTS = 5
# A round closes its masked-input stage early at this many inputs: the path on which a close
# decided at a tick used to overtake the stage's last inputs (issue 12, item 5).
TARGET_REPORTS = 14
SELECTION_DEADLINE_S = 10.0
REPORTING_DEADLINE_S = 100.0
# Stages at which a device may stop: before R0 (nothing sent), after R0 (keys advertised),
# after R1 (keys shared, no masked input), after R2 (masked input, no unmasking response).
STOP_POINTS = ("before_advertise", "after_advertise", "after_share_keys", "after_masked_input")
SESSION_STAGES = (
    secagg_pb2.ADVERTISE_KEYS,
    secagg_pb2.SHARE_KEYS,
    secagg_pb2.MASKED_INPUT_COLLECTION,
    secagg_pb2.UNMASKING,
)


def stage_deadline(reporting_started_at: float, stage: secagg_pb2.SecAggStage) -> float:
    """A moment just past the stage's deadline (server/secagg/round_bridge.py)."""
    return reporting_started_at + stage_deadline_fraction[stage] * REPORTING_DEADLINE_S + 1e-3


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    stop_at: int | None  # index into STOP_POINTS, None: the device sees the session through
    tells: bool  # a stopping device sends a failure report (else it goes silent)
    delta: np.ndarray
    example_count: int


def plan_round(rng: np.random.Generator, num_parameters: int, stop_rate: float) -> list[DevicePlan]:
    """8 to 20 devices; each stops at each stage with probability `stop_rate`."""
    plans = []
    for _ in range(int(rng.integers(MIN_DEVICES, MAX_DEVICES + 1))):
        stop_at = next((s for s in range(len(STOP_POINTS)) if rng.random() < stop_rate), None)
        plans.append(
            DevicePlan(
                stop_at=stop_at,
                tells=bool(rng.random() < 0.5),
                delta=rng.normal(0.0, 0.05, num_parameters).astype(np.float32),
                example_count=int(rng.integers(10, 200)),
            )
        )
    return plans


def why_not_recoverable(
    graph: NeighbourGraph,
    threshold: int,
    advertised: Collection[int],
    shared: Collection[int],
    masked: Collection[int],
    unmasked: Collection[int],
) -> str | None:
    """Why a SecAgg+ session over these sets must abort, or None if it must complete.

    U1..U4 as in Bell et al.: each stage needs t neighbours left in it for every secret that
    will have to be rebuilt from their shares."""

    def alive(client: int, group: Collection[int]) -> int:
        return len(graph.neighbours(client) & set(group))

    for client in advertised:
        if alive(client, advertised) < threshold:
            return f"R0: client {client} has {alive(client, advertised)} neighbours with keys"
    for client in shared:
        if alive(client, shared) < threshold:
            return f"R1: client {client} has {alive(client, shared)} neighbours that shared"
    if len(masked) < threshold:
        return f"R2: {len(masked)} masked inputs"
    dropped_with_users = {d for d in set(shared) - set(masked) if graph.neighbours(d) & set(masked)}
    for client in set(masked) | dropped_with_users:
        if alive(client, masked) < threshold:
            return f"R2: client {client} has {alive(client, masked)} surviving neighbours"
    for client in set(masked) | dropped_with_users:
        if alive(client, unmasked) < threshold:
            return f"R3: {alive(client, unmasked)} shares of client {client}'s secret"
    return None


@dataclasses.dataclass
class DeviceRecord:
    """What the server acknowledged of one device's part (its client id once known)."""

    plan: DevicePlan
    client_id: int = 0
    advertised: bool = False
    shared: bool = False
    masked: bool = False
    reported: bool = False
    unmasked: bool = False
    refused: bool = False  # its masked input came after the stage closed at the target
    stages_done: int = 0  # session stages this device has finished acting in (4: all)


@dataclasses.dataclass
class RoundOutcome:
    devices: int
    threshold: int
    survivors: int
    reports: int
    expected_failure: str | None
    state: RoundState
    max_error: float  # |moved weights - survivors' FedAvg|, committed rounds only
    stops: tuple[int, ...]  # devices planned to stop at each of STOP_POINTS
    problems: list[str]

    @property
    def committed(self) -> bool:
        return self.state is RoundState.COMMITTED


def survivors_fedavg(records: list[DeviceRecord]) -> np.ndarray:
    """The plaintext weighted mean of the survivors' clipped deltas (TFF's secure mean)."""
    survivors = [r for r in records if r.masked]
    scales = np.array([min(r.plan.example_count / MAX_WEIGHT, 1.0) for r in survivors])
    clipped = np.array(
        [np.clip(clip_l2(r.plan.delta, CLIP)[0], -CLIP, CLIP) for r in survivors], np.float64
    )
    return (scales[:, None] * clipped).sum(axis=0) / scales.sum()


def judge_round(
    session: SecAggServer,
    records: list[DeviceRecord],
    record: RoundRecord,
    before: np.ndarray,
    after: np.ndarray,
) -> RoundOutcome:
    """Checks a closed round against what its survivors allow (see the module's doc)."""
    state = record.state
    config = session.session_config(1)  # the graph every device of the round computes
    graph = NeighbourGraph(config.graph_seed, config.num_clients, config.num_neighbours)
    ids = {r.client_id for r in records}
    assert ids == set(range(1, len(records) + 1))

    def meant(stop_points: set[int | None], among: list[DeviceRecord]) -> list[int]:
        return [r.client_id for r in among if r.plan.stop_at not in stop_points]

    survivors = [r.client_id for r in records if r.masked]
    reason = why_not_recoverable(
        graph,
        session.threshold,
        meant({0}, records),
        meant({0, 1}, records),
        survivors,
        meant({3}, [r for r in records if r.masked]),
    )
    if reason is None and len(survivors) < MIN_REPORTS:
        reason = f"{len(survivors)} summed inputs, {MIN_REPORTS} needed"
    problems = []
    if reason is not None and reason.startswith("R2") and any(r.refused for r in records):
        problems.append(f"closing at the target turned live devices into dropouts: {reason}")
    expected = RoundState.FAILED if reason else RoundState.COMMITTED
    if state is not expected:
        problems.append(
            f"round {state.value}, expected {expected.value} ({reason or 'recoverable'}); "
            f"session: {session.abort_reason or secagg_pb2.SecAggStage.Name(session.stage)}"
        )
    error = math.nan
    if state is RoundState.COMMITTED:
        metrics = record.metrics
        if metrics.get("aggregator/secure_sum/num_summed") != len(survivors):
            problems.append(f"summed {metrics.get('aggregator/secure_sum/num_summed')}")
        moved = after.astype(np.float64) - before
        error = float(np.max(np.abs(moved - survivors_fedavg(records))))
        if not error < 2e-6:
            problems.append(f"weights moved {error:.3g} away from the survivors' FedAvg")
    return RoundOutcome(
        devices=len(records),
        threshold=session.threshold,
        survivors=len(survivors),
        reports=sum(r.reported for r in records),
        expected_failure=reason,
        state=state,
        max_error=error,
        stops=tuple(sum(r.plan.stop_at == s for r in records) for s in range(len(STOP_POINTS))),
        problems=problems,
    )


def soak_task_config() -> TaskConfig:
    return task_config(
        total_rounds=10_000,
        target_reports=TARGET_REPORTS,
        over_selection=MAX_DEVICES / TARGET_REPORTS,
        min_reports=MIN_REPORTS,
        selection_deadline_s=SELECTION_DEADLINE_S,
        reporting_deadline_s=REPORTING_DEADLINE_S,
        aggregator=f"secure_aggregator(clip={CLIP}, max_weight={MAX_WEIGHT})",
    )


class RoundDriver(Protocol):
    async def run_round(self, plans: list[DevicePlan], seed: int) -> RoundOutcome: ...


async def soak(
    coordinator: Coordinator,
    driver: RoundDriver,
    rounds: int,
    seed: int,
    stop_rate: float,
    on_round: Callable[[int, RoundOutcome], None] | None = None,
) -> list[RoundOutcome]:
    """Runs `rounds` secure rounds of the soak task; returns each round's outcome."""
    rng = np.random.default_rng(seed)
    num_parameters = coordinator.task("t1").record.num_parameters
    outcomes = []
    for index in range(rounds):
        plans = plan_round(rng, num_parameters, stop_rate)
        outcome = await driver.run_round(plans, seed=int(rng.integers(2**32)))
        outcomes.append(outcome)
        if on_round is not None:
            on_round(index, outcome)
    return outcomes
