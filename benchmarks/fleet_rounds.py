"""Runs one federated job through the real stack and times its rounds (shared by benchmarks).

The coordinator serves on loopback with TLS and SQLite, the phones are emulated by
`emulator.fleet.Fleet` (device runtime, LiteRT training, one gRPC channel), and the model is
the digits MLP of `overnight demo`, split and trained as there. Phones are always charging,
idle and on Wi-Fi, so the figures are the stack's cost per round, not the fleet's moods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import statistics
import tempfile
import time

import numpy as np

from overnight.demo import DemoSettings, export_demo_model


@dataclasses.dataclass(frozen=True)
class FleetJob:
    demo: DemoSettings = DemoSettings()
    aggregator: str = "mean"
    over_selection: float = 1.3
    selection_deadline_s: float = 2.0
    reporting_deadline_s: float = 30.0
    # The demo's retry windows: the fleet lives minutes, not days.
    min_delay_s: float = 0.1
    min_spread_s: float = 1.0
    horizon_s: float = 60.0


@dataclasses.dataclass(frozen=True)
class RoundTimes:
    """What a job's rounds took, from the coordinator's own records."""

    wall_s: float  # first check-in of the fleet to the last commit
    committed: int
    failed: int
    round_s: list[float]  # each committed round, opened to committed
    accuracy: list[float]  # held-out accuracy after each committed round
    committed_at_s: list[float]  # each commit, seconds after the fleet started
    started_at: float = 0.0  # when the fleet started (time.time())

    @property
    def wall_per_round_s(self) -> float:
        return self.wall_s / max(1, self.committed)

    @property
    def median_round_s(self) -> float:
        return statistics.median(self.round_s) if self.round_s else float("nan")

    def time_to_accuracy_s(self, target: float) -> float | None:
        for accuracy, at in zip(self.accuracy, self.committed_at_s, strict=True):
            if accuracy >= target:
                return at
        return None


def export_model(job: FleetJob, directory: pathlib.Path) -> bytes:
    return export_demo_model(job.demo, directory / "digits_mlp.tflite")


async def run_job(job: FleetJob, model_bytes: bytes) -> RoundTimes:
    """Runs `job.demo.rounds` committed rounds of the job; returns their times."""
    from device_runtime.clock import RealClock
    from emulator.data import federated_digits
    from emulator.fleet import Fleet
    from emulator.phone import RandomConditionsSettings
    from server.certificates import loopback_security
    from server.config import TaskConfig
    from server.coordinator import Coordinator, CoordinatorSettings
    from server.device_identity import DeviceIdentities
    from server.enrollment.config import EnrollmentPolicy
    from server.evaluation import HeldOutEvaluator
    from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
    from server.grpc_service import CoordinatorServer
    from server.pace_steering import PaceSteeringSettings
    from server.sqlite_store import SqliteStore
    from server.store import RoundState

    demo = job.demo
    secret = b"benchmark-enrollment-secret-0123"
    data = federated_digits(demo.phones, alpha=demo.alpha, seed=demo.seed)
    with tempfile.TemporaryDirectory(prefix="overnight-bench-") as tmp:
        store = SqliteStore.in_data_dir(pathlib.Path(tmp))
        clock = RealClock()
        coordinator = Coordinator(
            store,
            clock,
            CoordinatorSettings(
                pace=PaceSteeringSettings(
                    min_delay_s=job.min_delay_s,
                    min_spread_s=job.min_spread_s,
                    horizon_s=job.horizon_s,
                )
            ),
            HeldOutEvaluator(data.test),
            np.random.default_rng(demo.seed),
            DeviceIdentities(
                store,
                clock,
                EnrollmentPolicy.shared_secret(secret),
                networks=NetworkSettings(exempt=LOOPBACK_NETWORKS),
            ),
        )
        config = TaskConfig(
            task_id="digits-mlp",
            population="digits",
            total_rounds=demo.rounds,
            target_reports=demo.clients_per_round,
            over_selection=job.over_selection,
            min_reports=max(1, int(0.8 * demo.clients_per_round)),
            selection_deadline_s=job.selection_deadline_s,
            reporting_deadline_s=job.reporting_deadline_s,
            epochs=demo.epochs,
            batch_size=demo.batch_size,
            server_learning_rate=demo.server_learning_rate,
            aggregator=job.aggregator,
        )
        coordinator.register_task(config, model_bytes)
        tls, trust = loopback_security()
        server = CoordinatorServer(coordinator, "127.0.0.1:0", tls=tls)
        await server.start()
        fleet = Fleet(
            server.address,
            trust,
            config.population,
            data.clients,
            seed=demo.seed,
            conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
            enrollment_secret=secret,
        )
        stop = asyncio.Event()
        started = time.time()
        fleet_task = asyncio.create_task(fleet.run(stop))
        try:
            while coordinator.task(config.task_id).committed_rounds < demo.rounds:
                if fleet_task.done():
                    fleet_task.result()
                    raise RuntimeError("the fleet stopped before the task completed")
                await asyncio.sleep(0.01)
            wall = time.time() - started
        finally:
            stop.set()
            await fleet_task
            await server.stop()
            rounds = store.rounds(config.task_id)
            store.close()
    committed = [r for r in rounds if r.state == RoundState.COMMITTED]
    return RoundTimes(
        wall_s=wall,
        committed=len(committed),
        failed=len(rounds) - len(committed),
        round_s=[r.finished_at - r.started_at for r in committed],
        accuracy=[r.metrics.get("eval/accuracy", 0.0) for r in committed],
        committed_at_s=[r.finished_at - started for r in committed],
        started_at=started,
    )
