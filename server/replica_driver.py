"""The round driver of a replica: the replication pass (server/replica_coordinator.py) runs
beside the round driver's own loop, on the same event loop, so a request handler, a
replication pass and the driver's in-memory steps never interleave within a step."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from server.errors import StoreUnavailable
from server.retention import Retention
from server.round_driver import RoundDriver, RoundHost, drive_interval_s

log = logging.getLogger(__name__)


class ReplicaHost(RoundHost, Protocol):
    """What a replica's driver needs beyond the round driver's host
    (server.replica_coordinator implements it)."""

    def replicate(self) -> None: ...


class ReplicaDriver(RoundDriver):
    def __init__(
        self,
        coordinator: ReplicaHost,
        interval_s: float = drive_interval_s,
        retention: Retention | None = None,
    ) -> None:
        super().__init__(coordinator, interval_s, retention)
        self._replica = coordinator
        self._replicate_every_s = interval_s

    def drive(self) -> None:
        """One replication pass, then one driver pass, inline (tests with a fake clock)."""
        self._replicate()
        super().drive()

    async def run(self) -> None:
        await asyncio.gather(super().run(), self._replicating())

    async def _replicating(self) -> None:
        while True:
            self._replicate()
            await asyncio.sleep(self._replicate_every_s)

    def _replicate(self) -> None:
        try:
            self._replica.replicate()
        except StoreUnavailable as exc:
            log.error("replication pass failed, retried at the next: %s", exc)
        except Exception:  # a defect must not stop the replica's loop
            log.exception("replication pass raised")
