"""Slow device tiers and slow networks, emulated as delays on top of the real work.

The work itself stays real: LiteRT trains, gRPC carries every byte. A phone on a slow tier
then waits as long again as its tier is slower than this machine; a phone on a slow link waits
for its latency and for its bytes to cross its bandwidth.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from device_runtime.aggregation.client import EncodedUpload
from device_runtime.identity import DeviceKey
from device_runtime.model_runner import TrainableModel
from device_runtime.transport import CoordinatorClient
from emulator.fleet_config import NetworkProfile
from protos import common_pb2, device_pb2

# Each extra wait is cut into pieces no longer than this, so a picked-up phone (polled before
# every batch) stops within a second however slow its tier.
max_step_delay_s = 0.5


class TieredModel(TrainableModel):
    """A real TrainableModel whose steps last `compute_slowdown` times their real duration."""

    def __init__(self, tflite_bytes: bytes, compute_slowdown: float) -> None:
        super().__init__(tflite_bytes)
        self._extra = max(0.0, compute_slowdown - 1.0)

    def train_step(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
        started = time.perf_counter()
        result = super().train_step(x, y, mask)
        if self._extra:
            # Runs in the training thread (the runtime trains off the event loop).
            time.sleep(min(max_step_delay_s, self._extra * (time.perf_counter() - started)))
        return result


def transfer_delay_s(network: NetworkProfile, num_bytes: int) -> float:
    return network.latency_ms / 1000.0 + 8.0 * num_bytes / (network.bandwidth_mbps * 1e6)


class LatencyHistogram:
    """Call durations in log-spaced bins from 0.1 ms to 100 s: mergeable, fixed size."""

    edges_s = np.logspace(-4, 2, 601)

    def __init__(self) -> None:
        self.counts = np.zeros(len(self.edges_s) + 1, dtype=np.int64)

    def add(self, seconds: float) -> None:
        self.counts[int(np.searchsorted(self.edges_s, seconds))] += 1

    def merge(self, other: LatencyHistogram) -> None:
        self.counts += other.counts

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Upper edge of the bin holding the q-quantile (resolution about 2 %)."""
        if self.total == 0:
            return float("nan")
        rank = int(np.searchsorted(np.cumsum(self.counts), q * self.total))
        return float(self.edges_s[min(rank, len(self.edges_s) - 1)])


class EmulatedLinkClient(CoordinatorClient):
    """The real gRPC client, plus the latency and bandwidth of the phone's own network.

    `check_in_times` receives the duration of each real CheckIn call on loopback, without the
    emulated link delay.
    """

    def __init__(
        self,
        target: str,
        channel: grpc.aio.Channel,
        network: NetworkProfile,
        check_in_times: LatencyHistogram | None = None,
        key: DeviceKey | None = None,
    ) -> None:
        super().__init__(target, channel=channel, key=key)
        self.network = network
        self._check_in_times = check_in_times

    async def check_in(self, population: str, example_count: int) -> device_pb2.CheckInResponse:
        await asyncio.sleep(transfer_delay_s(self.network, 0))
        started = time.perf_counter()
        try:
            return await super().check_in(population, example_count)
        finally:
            if self._check_in_times is not None:
                self._check_in_times.add(time.perf_counter() - started)

    async def download(self, ref: common_pb2.ResourceRef) -> bytes:
        data = await super().download(ref)
        await asyncio.sleep(transfer_delay_s(self.network, len(data)))
        return data

    async def upload(
        self,
        token: bytes,
        update: np.ndarray | EncodedUpload,
        example_count: int,
        metrics: common_pb2.ClientMetrics,
    ) -> device_pb2.UploadResponse:
        size = update.nbytes if isinstance(update, np.ndarray) else len(update.payload)
        await asyncio.sleep(transfer_delay_s(self.network, size))
        return await super().upload(token, update, example_count, metrics)

    async def report_failure(
        self, token: bytes, cause: device_pb2.FailureReport.Cause, message: str
    ) -> device_pb2.FailureAck:
        await asyncio.sleep(transfer_delay_s(self.network, 0))
        return await super().report_failure(token, cause, message)
