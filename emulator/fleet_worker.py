"""One worker process of a large fleet: an asyncio loop running many emulated phones.

Each phone is a real DeviceRuntime with its own daily routine (on the virtual clock), its own
network link and device tier (delays on top of real gRPC and real LiteRT training), and its own
local data. Memory per phone stays small: downloaded bytes are held once per worker (each phone
still downloads for itself, see PhoneCache), and a phone drops its interpreter after each
assignment.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging

import grpc
import numpy as np

from device_runtime.cache import ResourceCache, sha256_hex
from device_runtime.channel import ServerTrust, open_channel
from device_runtime.clock import RealClock
from device_runtime.runtime import DeviceRuntime
from device_runtime.transport import channel_options
from emulator.daily_routine import DailyConditions, draw_profile
from emulator.data import ClientDatasets
from emulator.fleet_config import FleetConfig
from emulator.participation import ParticipationLog
from emulator.slowdowns import EmulatedLinkClient, LatencyHistogram, TieredModel
from emulator.virtual_clock import VirtualClock

log = logging.getLogger(__name__)

phones_per_channel = 256  # phones sharing one HTTP/2 connection, as behind a carrier NAT
training_threads = 16


@dataclasses.dataclass(frozen=True)
class FleetSpec:
    """Everything a worker needs to build its phones; picklable, so it crosses processes."""

    target: str
    trust: ServerTrust
    population: str
    config: FleetConfig
    datasets: ClientDatasets
    virtual_start_s: float
    speedup: float
    anchor_s: float  # wall-clock time at which the virtual clock reads virtual_start_s
    bin_virtual_s: float = 900.0
    enrollment_secret: bytes = b""  # what each phone presents to enroll its key


@dataclasses.dataclass
class WorkerReport:
    phones: int
    participation: ParticipationLog
    peak_rss_bytes: int
    check_in_times: LatencyHistogram


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss, not inherited over exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class SharedBytes:
    """Resource bytes held once per worker, by hash, for the few newest resources."""

    def __init__(self, max_entries: int = 8) -> None:
        self._data: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._max_entries = max_entries

    def get(self, digest: str) -> bytes | None:
        data = self._data.get(digest)
        if data is not None:
            self._data.move_to_end(digest)  # the model stays while weights come and go
        return data

    def put(self, digest: str, data: bytes) -> None:
        self._data[digest] = data
        self._data.move_to_end(digest)
        while len(self._data) > self._max_entries:
            self._data.popitem(last=False)


class PhoneCache(ResourceCache):
    """A phone's own cache, storing bytes in the worker's SharedBytes.

    A phone hits only what it downloaded itself, so the coordinator sees every download a real
    fleet would make; the worker keeps one copy of each model instead of one per phone.
    """

    def __init__(self, shared: SharedBytes) -> None:
        super().__init__(max_memory_entries=0)
        self._shared = shared
        self._mine: set[str] = set()

    def get(self, digest: str) -> bytes | None:
        data = self._shared.get(digest) if digest in self._mine else None
        if data is None:
            self._mine.discard(digest)
            self.misses += 1
        else:
            self.hits += 1
        return data

    def put(self, digest: str, data: bytes) -> None:
        if sha256_hex(data) != digest:
            raise ValueError(f"resource does not match its hash {digest}")
        self._shared.put(digest, data)
        self._mine.add(digest)


@dataclasses.dataclass(frozen=True)
class _Phone:
    runtime: DeviceRuntime
    conditions: DailyConditions
    rng: np.random.Generator


class FleetWorker:
    def __init__(self, spec: FleetSpec, indices: list[int]) -> None:
        self._spec = spec
        self._indices = indices
        self.clock = VirtualClock(spec.virtual_start_s, spec.speedup, spec.anchor_s)
        self.participation = ParticipationLog(spec.virtual_start_s, spec.bin_virtual_s)
        self.conditions: list[DailyConditions] = []
        self.check_in_times = LatencyHistogram()

    async def run(self, stop: asyncio.Event) -> WorkerReport:
        spec = self._spec
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(training_threads))
        shared = SharedBytes()
        channels: list[grpc.aio.Channel] = []
        tasks = []
        spread_s = self.clock.real_seconds(spec.config.start_spread_virtual_s)
        for number, index in enumerate(self._indices):
            if number % phones_per_channel == 0:
                channels.append(open_channel(spec.target, spec.trust, channel_options()))
            phone = self._phone(index, channels[-1], shared)
            if phone is not None:
                tasks.append(asyncio.create_task(self._run_phone(phone, spread_s)))
        sampler = asyncio.create_task(self.sample_eligible(stop))
        await stop.wait()
        # Phones stop where they are, as when the fleet's power goes: mid-round work is lost
        # and the coordinator counts it at its deadline.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, sampler, return_exceptions=True)
        for channel in channels:
            await channel.close()
        peak = peak_rss_bytes()
        return WorkerReport(len(self._indices), self.participation, peak, self.check_in_times)

    def _phone(self, index: int, channel: grpc.aio.Channel, shared: SharedBytes) -> _Phone | None:
        spec = self._spec
        profile = draw_profile(spec.config, index)
        conditions = DailyConditions(spec.config, profile, self.clock)
        self.conditions.append(conditions)
        if not conditions.can_train:
            return None
        rng = np.random.default_rng([spec.config.seed, index, 3])
        slowdown = profile.tier.compute_slowdown
        runtime = DeviceRuntime(
            client=EmulatedLinkClient(
                spec.target,
                channel,
                profile.network,
                self.check_in_times,
                key=profile.device_key(spec.config.seed),
            ),
            population=spec.population,
            enrollment_secret=spec.enrollment_secret,
            examples=spec.datasets.client(index),
            conditions=conditions,
            clock=RealClock(),  # retry windows and deadlines are the coordinator's real time
            rng=rng,
            cache=PhoneCache(shared),
            model_loader=lambda data: TieredModel(data, slowdown),
        )
        return _Phone(runtime, conditions, rng)

    async def _run_phone(self, phone: _Phone, spread_s: float) -> None:
        """The phone's job scheduler: wakes the runtime when the phone is eligible.

        Android's JobScheduler does this for a real app (constraints: charging, idle,
        unmetered), so an ineligible phone costs nothing until its conditions change. Once
        running, the runtime itself watches the conditions and stops training when they fail.
        """
        await asyncio.sleep(float(phone.rng.uniform(0, spread_s)))  # not all at once
        while True:
            now = self.clock.now()
            if not phone.conditions.at(now).eligible:
                wake = phone.conditions.next_change_after(now) + 1.0
                await asyncio.sleep(self.clock.real_seconds(wake - now))
                continue
            attempt = await phone.runtime.attempt()
            self.participation.record(attempt, self.clock.now())
            phone.runtime.release_model()
            await asyncio.sleep(attempt.next_delay_s)

    async def sample_eligible(self, stop: asyncio.Event) -> None:
        """Head counts of eligible phones at fixed virtual instants, three per bin from the
        fleet's start up to the moment the worker stops.

        Eligibility is a pure function of virtual time, so the count at an instant does not
        depend on when it is taken: a worker that started late, or whose loop stalled on a
        loaded machine, catches up, and every worker counts the same instants (a merged bin
        shows a figure only when all workers counted it)."""
        spec = self._spec
        step_s = spec.bin_virtual_s / 3
        taken = 0
        while True:  # once more when stopped, up to the stop
            stopping = stop.is_set()
            now = self.clock.now()
            while (instant := spec.virtual_start_s + taken * step_s) <= now:
                eligible = sum(c.can_train and c.at(instant).eligible for c in self.conditions)
                self.participation.sample_eligible(instant, eligible)
                taken += 1
                await asyncio.sleep(0)  # a long catch-up must not starve the phones
            if stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.clock.real_seconds(step_s))
