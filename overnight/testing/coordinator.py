"""A real coordinator for a test, in a background thread: TLS from a throwaway CA, an
operator token, shared-secret device enrollment and a SQLite store, as in production.

The coordinator runs on its own asyncio loop in its own thread, so a test written against
the blocking Python API (`overnight.connect(...)`) talks to it exactly as a notebook would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib
import secrets
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np

from device_runtime.channel import ServerTrust
from device_runtime.clock import RealClock
from device_runtime.examples import LocalExamples
from overnight.client import Client, Credentials, connect
from server.certificates import DevelopmentCa
from server.coordinator import Coordinator, CoordinatorSettings
from server.device_identity import DeviceIdentities
from server.enrollment.config import EnrollmentPolicy
from server.evaluation import HeldOutEvaluator
from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
from server.grpc_service import CoordinatorServer
from server.operator_access import AdminTokens, Role
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore
from server.transport_security import ServerTls

T = TypeVar("T")

# Emulated phones come back quickly: a test's rounds should not wait out production windows.
TEST_PACE = PaceSteeringSettings(min_delay_s=0.05, min_spread_s=0.1)


class LocalCoordinator:
    """`start()`, then reach it at `admin_address` (operators) and `address` (devices);
    `stop()` at the end. The `overnight_coordinator` fixture does both."""

    def __init__(
        self,
        data_dir: pathlib.Path,
        held_out: LocalExamples | None = None,
        seed: int = 0,
        pace: PaceSteeringSettings = TEST_PACE,
    ) -> None:
        self.data_dir = data_dir
        self.enrollment_secret = secrets.token_bytes(32)
        ca = DevelopmentCa("overnight.testing CA")
        issued = ca.issue_server()
        self._tls = ServerTls(issued.certificate_chain, issued.private_key)
        self.trust = ServerTrust(root_certificates=ca.root_certificate)
        self._held_out = held_out
        self._seed = seed
        self._pace = pace
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: CoordinatorServer | None = None
        self._store: SqliteStore | None = None
        self._token = ""

    def start(self) -> LocalCoordinator:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        store = SqliteStore.in_data_dir(self.data_dir)
        clock = RealClock()
        identities = DeviceIdentities(
            store,
            clock,
            EnrollmentPolicy.shared_secret(self.enrollment_secret),
            networks=NetworkSettings(exempt=LOOPBACK_NETWORKS),  # every phone is on loopback
        )
        coordinator = Coordinator(
            store,
            clock,
            CoordinatorSettings(pace=self._pace),
            HeldOutEvaluator(self._held_out) if self._held_out is not None else None,
            np.random.default_rng(self._seed),
            identities,
        )
        tokens = AdminTokens(self.data_dir)
        _, self._token = tokens.create(Role.OPERATOR)
        self._server = CoordinatorServer(coordinator, tls=self._tls, admin_tokens=tokens)
        await self._server.start()
        self._store = store

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the coordinator's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def submit(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Starts a coroutine on the coordinator's loop without waiting."""
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    @property
    def server(self) -> CoordinatorServer:
        assert self._server is not None, "start() first"
        return self._server

    @property
    def coordinator(self) -> Coordinator:
        return self.server.coordinator

    @property
    def address(self) -> str:
        """host:port of the device listener (TLS)."""
        return self.server.address

    @property
    def admin_address(self) -> str:
        """host:port of the admin listener (TLS, operator token)."""
        assert self.server.admin_address is not None
        return self.server.admin_address

    @property
    def credentials(self) -> Credentials:
        """An operator's credentials for `overnight.connect`."""
        return Credentials(token=self._token, root_certificates=self.trust.root_certificates)

    def connect(self) -> Client:
        """`overnight.connect(self.admin_address, credentials=self.credentials)`."""
        return connect(self.admin_address, credentials=self.credentials)

    def stop(self) -> None:
        if self._server is not None:
            self.run(self._server.stop(0))
            self._server = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
