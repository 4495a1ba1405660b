"""A large fleet over worker processes, each an asyncio loop of many phones (FleetWorker).

Phones are dealt to workers round-robin; the parent only starts, stops and merges them.
Workers are spawned, not forked: gRPC's threads do not survive a fork. Each worker sends its
report over a pipe of its own, and the parent waits on those pipes together with the workers'
process sentinels, so a worker that dies (killed, out of memory, crashed) is noticed the
moment it exits, with its exit code and its phones, not after a timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from emulator.fleet_worker import FleetSpec, FleetWorker, WorkerReport
from emulator.participation import ParticipationLog
from emulator.slowdowns import LatencyHistogram

log = logging.getLogger(__name__)
# What multiprocessing.connection.wait takes: pipes, sockets, process sentinels.
Waitable = multiprocessing.connection.Connection | socket.socket | int

# A worker that is alive but sends no report this long after being asked to stop is hung: it
# is terminated and its phones count as lost.
worker_report_timeout_s = 120.0


@dataclasses.dataclass(frozen=True)
class WorkerLoss:
    """A worker that ended without its report: its phones' participation is lost."""

    worker: int
    pid: int
    exitcode: int | None  # negative: killed by that signal; None: hung, then terminated
    phones: tuple[int, ...]  # the fleet's phone indices it ran

    @property
    def how(self) -> str:
        if self.exitcode is None:
            return f"sent no report within {worker_report_timeout_s:.0f} s and was terminated"
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"was killed by {name}"
        return f"exited with code {self.exitcode}"

    def describe(self) -> str:
        shown = ", ".join(map(str, self.phones[:20]))
        more = f", ... ({len(self.phones)} in all)" if len(self.phones) > 20 else ""
        return (
            f"fleet worker {self.worker} (pid {self.pid}) {self.how}; "
            f"its {len(self.phones)} phones are lost: {shown}{more}"
        )


@dataclasses.dataclass
class FleetReport:
    phones: int  # phones whose worker reported
    participation: ParticipationLog
    worker_peak_rss_bytes: list[int]
    check_in_times: LatencyHistogram  # client side, on loopback, without emulated link delay
    lost: list[WorkerLoss] = dataclasses.field(default_factory=list)

    @property
    def phones_lost(self) -> int:
        return sum(len(loss.phones) for loss in self.lost)

    @property
    def peak_rss_bytes(self) -> int:
        """Sum of the workers' peaks: an upper bound on the fleet's peak memory."""
        return sum(self.worker_peak_rss_bytes)


def _worker_main(
    spec: FleetSpec,
    indices: list[int],
    stop: multiprocessing.synchronize.Event,
    report_pipe: multiprocessing.connection.Connection,
    log_level: int,
    nice: int,
) -> NoReturn:
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

    run_then_exit(main, report_pipe)


def run_then_exit(
    main: Callable[[], Coroutine[Any, Any, object]],
    report_pipe: multiprocessing.connection.Connection,
) -> NoReturn:
    """Runs a worker's `main` on a new event loop, sends what it returns over `report_pipe`
    and ends the process at once, exit code 0.

    Not asyncio.run: its teardown cancels every task left on the loop and waits for them, and
    grpc.aio leaves call tasks behind when a channel closes with streams in flight (grpc/grpc
    #41875; a worker stopped with thousands of phones mid-download and mid-upload has them).
    That wait never ended: the worker hung with its report unsent, and the parent counted all
    its phones lost. Nothing of ours is left to tear down once the report is sent."""
    loop = asyncio.new_event_loop()
    report_pipe.send(loop.run_until_complete(main()))
    report_pipe.close()
    logging.shutdown()
    os._exit(0)


@dataclasses.dataclass
class _Worker:
    index: int
    phones: tuple[int, ...]
    process: Any  # multiprocessing's SpawnProcess
    reports: multiprocessing.connection.Connection
    report: WorkerReport | None = None
    loss: WorkerLoss | None = None

    @property
    def finished(self) -> bool:
        return self.report is not None or self.loss is not None

    def lost(self, exitcode: int | None) -> WorkerLoss:
        self.loss = WorkerLoss(self.index, self.process.pid or 0, exitcode, self.phones)
        return self.loss


class FleetProcesses:
    """`nice` lowers the workers' scheduling priority (os.nice increment, 0-19): when the
    coordinator under test shares the machine, the emulated load then does not starve it of
    CPU, as it would not on real phones.

    Call order: `start`, then `wait` as often as wanted (it returns the workers that died
    meanwhile), then `stop` once."""

    def __init__(self, spec: FleetSpec, workers: int, nice: int = 0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be within 0..19, got {nice}")
        self._spec = spec
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        phones = spec.config.phones
        self._workers: list[_Worker] = []
        self._child_ends: list[multiprocessing.connection.Connection] = []
        for w in range(min(workers, phones)):
            reader, writer = context.Pipe(duplex=False)
            indices = list(range(w, phones, workers))
            process = context.Process(
                target=_worker_main,
                args=(spec, indices, self._stop, writer, logging.getLogger().level, nice),
                name=f"fleet-worker-{w}",
                daemon=True,
            )
            self._workers.append(_Worker(w, tuple(indices), process, reader))
            self._child_ends.append(writer)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    @property
    def phones_by_pid(self) -> dict[int, tuple[int, ...]]:
        return {w.process.pid: w.phones for w in self._workers if w.process.pid is not None}

    def start(self) -> None:
        for worker in self._workers:
            worker.process.start()
        # Only the children hold the pipes' write ends now: a dead worker's pipe reads EOF.
        for writer in self._child_ends:
            writer.close()
        self._child_ends.clear()

    def _take(self, ready: Sequence[Waitable]) -> list[WorkerLoss]:
        """Reads what the ready pipes and sentinels say; returns workers found dead."""
        lost = []
        for worker in self._workers:
            if worker.finished:
                continue
            if worker.reports in ready or worker.process.sentinel in ready:
                ended = worker.process.sentinel in ready
                try:
                    if worker.reports.poll():
                        worker.report = worker.reports.recv()
                        continue
                except (EOFError, OSError):
                    ended = True  # its pipe closed without a report: it is exiting
                if ended:
                    worker.process.join()
                    lost.append(worker.lost(worker.process.exitcode))
        for loss in lost:
            log.error("%s", loss.describe())
        return lost

    def wait(self, timeout_s: float | None, wake: Sequence[Waitable] = ()) -> list[WorkerLoss]:
        """Blocks until a worker dies, an object of `wake` (anything
        multiprocessing.connection.wait takes) is readable, or `timeout_s` passed. Returns the
        workers that died meanwhile (empty if none)."""
        running = [w for w in self._workers if not w.finished]
        watched: list[Waitable] = [w.process.sentinel for w in running]
        watched += [w.reports for w in running]
        ready = multiprocessing.connection.wait([*watched, *wake], timeout_s)
        return self._take([r for r in ready if r not in wake])

    @property
    def running(self) -> int:
        """Workers neither finished nor lost."""
        return sum(not w.finished for w in self._workers)

    def stop(self) -> FleetReport:
        """Stops every phone, collects the workers' reports and waits for them to exit. A
        worker that died, or sends nothing within `worker_report_timeout_s`, is in `lost`."""
        self._stop.set()
        give_up = time.monotonic() + worker_report_timeout_s
        while self.running:
            running = [w for w in self._workers if not w.finished]
            watched: list[Waitable] = [w.reports for w in running]
            watched += [w.process.sentinel for w in running]
            ready = multiprocessing.connection.wait(watched, max(0.0, give_up - time.monotonic()))
            if not ready:
                for worker in running:
                    worker.process.terminate()
                    worker.process.join()
                    log.error("%s", worker.lost(None).describe())
                break
            self._take(ready)
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join()
            worker.reports.close()
        merged = ParticipationLog(self._spec.virtual_start_s, self._spec.bin_virtual_s, samplers=0)
        times = LatencyHistogram()
        reports = [w.report for w in self._workers if w.report is not None]
        for report in reports:
            merged.merge(report.participation)
            times.merge(report.check_in_times)
        return FleetReport(
            phones=sum(r.phones for r in reports),
            participation=merged,
            worker_peak_rss_bytes=[r.peak_rss_bytes for r in reports],
            check_in_times=times,
            lost=[w.loss for w in self._workers if w.loss is not None],
        )
