"""A fleet of virtual phones in one process: each runs the real device runtime over real gRPC."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from device_runtime.cache import ResourceCache
from device_runtime.channel import ServerTrust, open_channel
from device_runtime.clock import Clock, RealClock
from device_runtime.conditions import DeviceConditions
from device_runtime.examples import LocalExamples
from device_runtime.identity import DeviceKey
from device_runtime.runtime import Attempt, DeviceRuntime
from device_runtime.transport import CoordinatorClient, channel_options
from emulator.phone import RandomConditions, RandomConditionsSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FleetStats:
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def record(self, attempt: Attempt) -> None:
        self.outcomes[attempt.outcome.value] += 1


class Fleet:
    """Phones share one gRPC channel (one HTTP/2 connection), as many apps would share a proxy."""

    def __init__(
        self,
        target: str,
        trust: ServerTrust,
        population: str,
        datasets: list[LocalExamples],
        seed: int = 0,
        conditions: RandomConditionsSettings | None = None,
        clock: Clock | None = None,
        conditions_of: Callable[[int], DeviceConditions] | None = None,
        enrollment_secret: bytes = b"",
    ) -> None:
        """`conditions_of(phone index)`, when given, replaces the random conditions (e.g. to
        make one phone drop out at a chosen moment)."""
        self._target = target
        self._trust = trust
        self._population = population
        self._datasets = datasets
        self._seed = seed
        self._conditions = conditions or RandomConditionsSettings()
        self._clock = clock or RealClock()
        self._conditions_of = conditions_of
        self._enrollment_secret = enrollment_secret
        self.stats = FleetStats()
        self.clients: list[CoordinatorClient] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Runs every phone until `stop` is set."""
        channel = open_channel(self._target, self._trust, channel_options())
        seeds = np.random.SeedSequence(self._seed).spawn(len(self._datasets))
        phones = []
        for index, (examples, seed) in enumerate(zip(self._datasets, seeds, strict=True)):
            rng = np.random.default_rng(seed)
            key = DeviceKey.from_seed(f"overnight-fleet-{self._seed}-phone-{index}".encode())
            client = CoordinatorClient(self._target, channel=channel, key=key)
            self.clients.append(client)
            runtime = DeviceRuntime(
                client=client,
                population=self._population,
                enrollment_secret=self._enrollment_secret,
                examples=examples,
                conditions=(
                    self._conditions_of(index)
                    if self._conditions_of is not None
                    else RandomConditions(self._clock, rng, self._conditions)
                ),
                clock=self._clock,
                rng=rng,
                cache=ResourceCache(),
                # Re-check conditions about as often as they change.
                ineligible_poll_s=self._conditions.mean_state_s / 2,
                on_attempt=self.stats.record,
            )
            # Stagger first check-ins so the fleet does not arrive in one burst.
            phones.append(asyncio.create_task(self._run_phone(runtime, rng, stop)))
        try:
            await asyncio.gather(*phones)
        finally:
            await channel.close()

    async def _run_phone(
        self, runtime: DeviceRuntime, rng: np.random.Generator, stop: asyncio.Event
    ) -> None:
        await asyncio.sleep(float(rng.uniform(0, 0.5)))
        await runtime.run(stop=stop)

    @property
    def downloaded_bytes(self) -> int:
        return sum(c.counters.downloaded_bytes for c in self.clients)

    @property
    def uploaded_bytes(self) -> int:
        return sum(c.counters.uploaded_bytes for c in self.clients)
