"""Emulated phones for a test: each runs the real device runtime (LiteRT training, signed
check-ins, chunked uploads) against a `LocalCoordinator`, and every attempt is recorded by
phone so a test can assert on who reported, dropped out or was turned away."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from device_runtime.cache import ResourceCache
from device_runtime.channel import open_channel
from device_runtime.clock import RealClock
from device_runtime.conditions import AlwaysEligible, DeviceConditions
from device_runtime.examples import LocalExamples
from device_runtime.identity import DeviceKey
from device_runtime.runtime import Attempt, DeviceRuntime
from device_runtime.transport import CoordinatorClient, channel_options
from emulator.phone import RandomConditions, RandomConditionsSettings
from overnight.round_result import RoundResult
from overnight.task import Task
from overnight.testing.coordinator import LocalCoordinator


@dataclasses.dataclass
class PhoneRecord:
    """Every attempt one emulated phone made, in order."""

    index: int
    attempts: list[Attempt] = dataclasses.field(default_factory=list)

    @property
    def outcomes(self) -> collections.Counter[str]:
        """Attempts by outcome: reported, rejected, interrupted, failed, ineligible, ..."""
        return collections.Counter(a.outcome.value for a in self.attempts)

    @property
    def reported_rounds(self) -> list[int]:
        return [a.round_number for a in self.attempts if a.outcome.value == "reported"]


@dataclasses.dataclass
class FederatedRun:
    """What a test asserts on: the rounds as the API streamed them, and each phone's record."""

    rounds: list[RoundResult]
    phones: list[PhoneRecord]

    @property
    def committed(self) -> list[RoundResult]:
        return [r for r in self.rounds if r.committed]

    def metric(self, name: str) -> list[float]:
        """One metric over the committed rounds, e.g. run.metric("eval/accuracy")."""
        return [r.metrics[name] for r in self.committed]


class EmulatedFleet:
    """Phones holding `clients` (one dataset each) in `population`. Conditions: always
    eligible by default; `conditions` draws random charging/idle/Wi-Fi changes (the emulator's
    RandomConditionsSettings); `conditions_of(index)` replaces them for chosen phones."""

    def __init__(
        self,
        coordinator: LocalCoordinator,
        population: str,
        clients: Sequence[LocalExamples],
        *,
        seed: int = 0,
        conditions: RandomConditionsSettings | None = None,
        conditions_of: Callable[[int], DeviceConditions] | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._population = population
        self._clients = list(clients)
        self._seed = seed
        self._conditions = conditions
        self._conditions_of = conditions_of
        self.phones = [PhoneRecord(i) for i in range(len(self._clients))]

    def run_task(self, task: Task, progress: bool = False) -> FederatedRun:
        """Runs the phones until `task` completes (or is cancelled or fails), streaming its
        rounds through the Python API; returns them with each phone's record."""
        with self.running():
            rounds = list(task.rounds(progress=progress))
        return FederatedRun(rounds, self.phones)

    @contextlib.contextmanager
    def running(self) -> Iterator[EmulatedFleet]:
        """The phones run in the background for the duration of the block, so a script can
        iterate `task.rounds()` itself; they stop (and are awaited) when it ends."""
        stop = asyncio.Event()
        running = self._coordinator.submit(self._run(stop))
        try:
            yield self
        finally:
            self._coordinator.run(_set(stop))
            running.result()

    async def _run(self, stop: asyncio.Event) -> None:
        clock = RealClock()
        trust = self._coordinator.trust
        channel = open_channel(self._coordinator.address, trust, channel_options())
        seeds = np.random.SeedSequence(self._seed).spawn(len(self._clients))
        phones = []
        for index, (examples, seed) in enumerate(zip(self._clients, seeds, strict=True)):
            rng = np.random.default_rng(seed)
            key = DeviceKey.from_seed(f"overnight-testing-{self._seed}-phone-{index}".encode())
            conditions: DeviceConditions
            if self._conditions_of is not None:
                conditions = self._conditions_of(index)
            elif self._conditions is not None:
                conditions = RandomConditions(clock, rng, self._conditions)
            else:
                conditions = AlwaysEligible()
            runtime = DeviceRuntime(
                client=CoordinatorClient(self._coordinator.address, channel=channel, key=key),
                population=self._population,
                examples=examples,
                conditions=conditions,
                clock=clock,
                rng=rng,
                cache=ResourceCache(),
                on_attempt=self.phones[index].attempts.append,
                enrollment_secret=self._coordinator.enrollment_secret,
            )
            phones.append(asyncio.create_task(runtime.run(stop=stop)))
        try:
            await asyncio.gather(*phones)
        finally:
            await channel.close()


async def _set(event: asyncio.Event) -> None:
    event.set()
