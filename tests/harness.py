"""A real coordinator on loopback for tests: SQLite store, gRPC server, injected clock."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from device_runtime.clock import Clock, RealClock
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.grpc_service import CoordinatorServer
from server.sqlite_store import SqliteStore
from tests.identities import make_coordinator

POPULATION = "digits"


def task_config(**overrides: object) -> TaskConfig:
    values: dict[str, object] = dict(
        task_id="t1",
        population=POPULATION,
        total_rounds=3,
        target_reports=2,
        over_selection=1.5,
        min_reports=1,
        selection_deadline_s=10.0,
        reporting_deadline_s=20.0,
        epochs=1,
        batch_size=8,
    )
    values.update(overrides)
    return TaskConfig(**values).validate()  # type: ignore[arg-type]


@dataclasses.dataclass
class RunningCoordinator:
    coordinator: Coordinator
    server: CoordinatorServer
    store: SqliteStore

    @property
    def address(self) -> str:
        return self.server.address


@contextlib.asynccontextmanager
async def running_coordinator(
    store_path: str,
    model_bytes: bytes | None = None,
    config: TaskConfig | None = None,
    clock: Clock | None = None,
    settings: CoordinatorSettings | None = None,
) -> AsyncIterator[RunningCoordinator]:
    store = SqliteStore(store_path)
    coordinator = make_coordinator(store, clock or RealClock(), settings)
    if model_bytes is not None:
        coordinator.register_task(config or task_config(), model_bytes)
    server = CoordinatorServer(coordinator, "127.0.0.1:0")
    await server.start()
    try:
        yield RunningCoordinator(coordinator, server, store)
    finally:
        await server.stop(0)
        store.close()
