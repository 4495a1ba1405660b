"""A large fleet over worker processes, each an asyncio loop of many phones (FleetWorker).

Phones are dealt to workers round-robin; the parent only starts, stops and merges them.
Workers are spawned, not forked: gRPC's threads do not survive a fork.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import queue as queue_module
from typing import Any

from emulator.fleet_worker import FleetSpec, FleetWorker, WorkerReport
from emulator.participation import ParticipationLog
from emulator.slowdowns import LatencyHistogram

log = logging.getLogger(__name__)

worker_report_timeout_s = 120.0


@dataclasses.dataclass
class FleetReport:
    phones: int
    participation: ParticipationLog
    worker_peak_rss_bytes: list[int]
    check_in_times: LatencyHistogram  # client side, on loopback, without emulated link delay

    @property
    def peak_rss_bytes(self) -> int:
        """Sum of the workers' peaks: an upper bound on the fleet's peak memory."""
        return sum(self.worker_peak_rss_bytes)


def _worker_main(
    spec: FleetSpec,
    indices: list[int],
    stop: multiprocessing.synchronize.Event,
    reports: Any,
    log_level: int,
    nice: int,
) -> None:
    if nice:
        os.nice(nice)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> WorkerReport:
        done = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.2)
            done.set()

        watcher = asyncio.create_task(watch())
        report = await FleetWorker(spec, indices).run(done)
        watcher.cancel()
        return report

    reports.put(asyncio.run(main()))


class FleetProcesses:
    """`nice` lowers the workers' scheduling priority (os.nice increment, 0-19): when the
    coordinator under test shares the machine, the emulated load then does not starve it of
    CPU, as it would not on real phones."""

    def __init__(self, spec: FleetSpec, workers: int, nice: int = 0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be within 0..19, got {nice}")
        self._spec = spec
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._reports = context.Queue()
        phones = spec.config.phones
        self._processes = [
            context.Process(
                target=_worker_main,
                args=(
                    spec,
                    list(range(w, phones, workers)),
                    self._stop,
                    self._reports,
                    logging.getLogger().level,
                    nice,
                ),
                name=f"fleet-worker-{w}",
                daemon=True,
            )
            for w in range(min(workers, phones))
        ]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def start(self) -> None:
        for process in self._processes:
            process.start()

    def stop(self) -> FleetReport:
        """Stops every phone, collects the workers' reports and waits for them to exit."""
        self._stop.set()
        reports: list[WorkerReport] = []
        try:
            for _ in self._processes:
                reports.append(self._reports.get(timeout=worker_report_timeout_s))
        except queue_module.Empty:
            log.error("a fleet worker sent no report within %s s", worker_report_timeout_s)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
        merged = ParticipationLog(self._spec.virtual_start_s, self._spec.bin_virtual_s, samplers=0)
        times = LatencyHistogram()
        for report in reports:
            merged.merge(report.participation)
            times.merge(report.check_in_times)
        return FleetReport(
            phones=sum(r.phones for r in reports),
            participation=merged,
            worker_peak_rss_bytes=[r.peak_rss_bytes for r in reports],
            check_in_times=times,
        )
