"""The round driver: closes, commits and evaluates rounds, off the request path.

Request handlers (check-in, upload, failure report, SecAgg messages) only record: they assign
devices, accumulate updates and move a round between its in-memory states. Everything that
ends a round — the commit of its aggregate with the held-out evaluation, or the record of a
failed round — happens here, per task, on the driver's own schedule:

- `drive()` does one pass over every task, inline. Tests with a fake clock call it (through
  `Coordinator.tick`) to make rounds end deterministically.
- `run()` is the serving loop: a pass whenever a handler signals that a round may have changed
  (`wake`) or every `interval_s` for deadlines. The held-out evaluation and the store write of
  a commit run in a worker thread, so a request never waits for them.

Faults stay inside their task:
- A store failure (disk full, read-only file) while ending a round leaves the round where it
  was, in memory: it is retried with exponential backoff, and the task goes on once the store
  is writable again. A round is marked committed only after its commit is durable, and its
  aggregate is computed once, so a retry never counts an update twice.
- Any other exception in a task's round logic is a defect: it is logged with its traceback,
  the task is failed (it takes no more devices; `overnight status` shows why), and every other
  task keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from device_runtime.logs import about, log_context
from server.errors import AlreadyExists, StaleLeader, StoreUnavailable
from server.evaluation import HeldOutEvaluator
from server.leases import Lease
from server.optimizers import State, serialize_state
from server.retention import Retention
from server.rounds import aggregating, closed
from server.rounds.round import RoundInProgress
from server.store import RoundRecord, RoundState, Store
from server.task_runtime import TaskRuntime

log = logging.getLogger(__name__)

# Passes without a wake-up apply deadlines this often.
drive_interval_s = 0.25
# A failed store write is retried after this many seconds, doubling up to the maximum.
store_retry_min_s = 1.0
store_retry_max_s = 30.0


@dataclasses.dataclass
class PendingCommit:
    """A round's outcome, computed once: a retried commit writes exactly this."""

    weights: np.ndarray
    weights_bytes: bytes
    weights_sha256: str
    optimizer_state: State
    metrics: dict[str, float]
    evaluated: bool = False


class RoundHost(Protocol):
    """What the driver needs of the coordinator that accepts the requests (server.coordinator
    implements it): its tasks and store, and the in-memory steps of a round's life."""

    store: Store
    evaluator: HeldOutEvaluator | None

    def tasks(self) -> list[TaskRuntime]: ...
    def now(self) -> float: ...
    def resource(self, sha256: str) -> bytes: ...
    def advance(self, task: TaskRuntime, round_: RoundInProgress) -> None: ...
    def forget(self, task: TaskRuntime, round_: RoundInProgress) -> None: ...
    def fail_task(self, task: TaskRuntime, reason: str) -> None: ...
    def notify(self, task: TaskRuntime, record: RoundRecord) -> None: ...
    def fence(self, task_id: str) -> Lease | None: ...
    def step_down(self, task: TaskRuntime) -> None: ...


class RoundDriver:
    def __init__(
        self,
        coordinator: RoundHost,
        interval_s: float = drive_interval_s,
        retention: Retention | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._interval_s = interval_s
        self._retention = retention
        self._wake = asyncio.Event()
        self._passed = asyncio.Event()
        self._pending: dict[tuple[str, int], PendingCommit] = {}
        self._ending: set[RoundInProgress] = set()  # commits under way in a worker thread
        # Called with the seconds each durable commit took (metrics); from the commit's thread.
        self.commit_observers: list[Callable[[float], None]] = []

    def wake(self) -> None:
        """Asks for a pass soon. Safe to call from handlers at any time."""
        self._wake.set()

    # ----- one pass ------------------------------------------------------------------------

    def drive(self) -> None:
        """One pass over every task, everything inline (evaluation and store writes too)."""
        for task in self._coordinator.tasks():
            with self._contained(task):
                for round_ in self._ending_rounds(task):
                    pending = self._prepare(task, round_)
                    if pending is not None:
                        self._evaluate(task, pending)
                        self._persist(round_, pending)
                        self._apply(task, round_, pending)
                    else:
                        self._record_failed(task, round_)
        self._prune()

    async def settled(self) -> None:
        """Returns once a pass of the serving loop found no round waiting to end: every
        report received so far is committed (or its round failed), or a store failure holds
        the round back. For tests and tools that must observe the outcome of requests."""
        while True:
            self._passed.clear()
            self.wake()
            await self._passed.wait()
            if not any(self._waiting(task) for task in self._coordinator.tasks()):
                return

    def _waiting(self, task: TaskRuntime) -> bool:
        if task.fault or self._coordinator.now() < task.store_retry_at:
            return False
        ending = (RoundState.AGGREGATING, RoundState.FAILED)
        return any(r.state in ending for r in task.open_rounds.values())

    async def run(self) -> None:
        """The serving loop; cancel it to stop."""
        while True:
            # asyncio.timeout, not wait_for: wait_for may swallow a cancellation that meets a
            # wake-up (Python 3.11), and the server could then never stop its driver.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            self._wake.clear()
            for task in self._coordinator.tasks():
                with self._contained(task):
                    for round_ in self._ending_rounds(task):
                        pending = self._prepare(task, round_)
                        if pending is None:
                            self._record_failed(task, round_)
                            continue
                        # While the worker thread runs, requests (and an inline `drive`)
                        # go on: they must leave this round alone.
                        self._ending.add(round_)
                        try:
                            await asyncio.to_thread(self._evaluate, task, pending)
                            await asyncio.to_thread(self._persist, round_, pending)
                        finally:
                            self._ending.discard(round_)
                        self._apply(task, round_, pending)
            if self._retention is not None and self._retention.due(self._coordinator.now()):
                await asyncio.to_thread(self._prune)
            self._passed.set()

    def _prune(self) -> None:
        """Forgets history past the retention age (between rounds, never inside one)."""
        if self._retention is None:
            return
        configs = [task.config for task in self._coordinator.tasks()]
        try:
            self._retention.prune(self._coordinator.store, configs, self._coordinator.now())
        except StoreUnavailable as exc:
            log.error("retention: pruning failed, retried at the next interval: %s", exc)

    def _ending_rounds(self, task: TaskRuntime) -> list[RoundInProgress]:
        """Applies deadlines to the task's open rounds; returns those that must end now."""
        if task.fault or self._coordinator.now() < task.store_retry_at:
            return []
        for round_ in list(task.open_rounds.values()):
            self._coordinator.advance(task, round_)
        return [
            r
            for r in task.open_rounds.values()
            if r.state in (RoundState.AGGREGATING, RoundState.FAILED) and r not in self._ending
        ]

    @contextlib.contextmanager
    def _contained(self, task: TaskRuntime):  # type: ignore[no-untyped-def]
        # Everything logged while the driver works for a task is about that task.
        with log_context(task.task_id):
            try:
                yield
            except StaleLeader as exc:
                # Another replica took the task (this one was paused or cut off past its
                # lease): nothing was written; the new leader abandons what was open here.
                log.warning("task %s: %s", task.task_id, exc)
                self._pending = {k: p for k, p in self._pending.items() if k[0] != task.task_id}
                self._coordinator.step_down(task)
            except StoreUnavailable as exc:
                delay = min(store_retry_max_s, max(store_retry_min_s, 2 * task.store_retry_s))
                task.store_retry_s = delay
                task.store_retry_at = self._coordinator.now() + delay
                log.error("task %s: %s; retrying in %.0f s", task.task_id, exc, delay)
            except Exception as exc:  # a defect in one task's round logic must not reach others
                log.exception("task %s failed: its round logic raised", task.task_id)
                self._coordinator.fail_task(task, f"{type(exc).__name__}: {exc}")
            else:
                task.store_retry_s = 0.0

    # ----- ending a round ------------------------------------------------------------------

    def _prepare(self, task: TaskRuntime, round_: RoundInProgress) -> PendingCommit | None:
        """The outcome an AGGREGATING round commits, computed once. None for a FAILED round,
        and for a round whose result is not finite, which then fails: committed weights and
        optimizer state are never NaN or infinite."""
        if round_.state is RoundState.FAILED:
            return None
        key = (task.task_id, round_.round_number)
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        if task.config.is_evaluation:
            base = self._coordinator.resource(round_.base_weights_sha256)
            result = aggregating.evaluated(round_, base)
        else:
            result = aggregating.aggregate(
                round_, task.weights, task.optimizer, task.optimizer_state, task.committed_rounds
            )
        if not aggregating.is_finite(result):
            log.error(
                "task %s round %d: the aggregate or the new weights are not finite; the round "
                "fails and the model stays as it was",
                task.task_id,
                round_.round_number,
                extra=about(task.task_id, round_.round_number),
            )
            round_.state = RoundState.FAILED
            return None
        metrics = dict(result.metrics)
        metrics["broadcasted_bits"] = task.broadcasted_bits + 8.0 * round_.broadcast_bytes
        metrics["aggregated_bits"] = task.aggregated_bits + 8.0 * round_.upload_bytes
        weights_bytes = result.weights.astype("<f4").tobytes()
        pending = PendingCommit(
            weights=result.weights,
            weights_bytes=weights_bytes,
            weights_sha256=hashlib.sha256(weights_bytes).hexdigest(),
            optimizer_state=result.optimizer_state,
            metrics=metrics,
        )
        self._pending[key] = pending
        return pending

    def _evaluate(self, task: TaskRuntime, pending: PendingCommit) -> None:
        """Held-out evaluation of the new weights (LiteRT; in a worker thread when serving)."""
        evaluator = self._coordinator.evaluator
        if evaluator is None or pending.evaluated:
            return
        model = self._coordinator.resource(task.record.model_sha256)
        pending.metrics.update(evaluator.evaluate(task.record.model_sha256, model, pending.weights))
        pending.evaluated = True

    def _persist(self, round_: RoundInProgress, pending: PendingCommit) -> None:
        """The durable commit. On StoreUnavailable nothing changed and the round stays
        AGGREGATING; the next pass writes the same outcome again."""
        record = self._record(round_, RoundState.COMMITTED, pending)
        store = self._coordinator.store
        try:
            started = time.perf_counter()
            store.commit_round(
                record,
                pending.weights_bytes,
                round_.counted_tokens(),
                serialize_state(pending.optimizer_state),
                fence=self._coordinator.fence(round_.task_id),
            )
            for observe in self.commit_observers:
                observe(time.perf_counter() - started)
        except AlreadyExists:
            # A write that reported failure may still have become durable: the store is the
            # judge. Our own commit is there exactly as computed; anything else is a defect.
            stored = {r.round_number: r for r in store.rounds(round_.task_id)}
            mine = stored.get(round_.round_number)
            if mine is None or mine.weights_sha256 != pending.weights_sha256:
                raise

    def _record(
        self, round_: RoundInProgress, state: RoundState, pending: PendingCommit | None = None
    ) -> RoundRecord:
        return closed.summarize(
            round_,
            state,
            self._coordinator.now(),
            pending.metrics if pending else None,
            pending.weights_sha256 if pending else "",
        )

    def _apply(self, task: TaskRuntime, round_: RoundInProgress, pending: PendingCommit) -> None:
        """The commit is durable: the task moves on in memory."""
        record = self._record(round_, RoundState.COMMITTED, pending)
        round_.state = RoundState.COMMITTED
        self._pending.pop((task.task_id, round_.round_number), None)
        task.weights = pending.weights
        task.weights_sha256 = pending.weights_sha256
        task.optimizer_state = pending.optimizer_state
        task.committed_rounds += 1
        task.broadcasted_bits = pending.metrics["broadcasted_bits"]
        task.aggregated_bits = pending.metrics["aggregated_bits"]
        self._coordinator.forget(task, round_)
        log.info(
            "task %s round %d committed: %d reports, eval accuracy %s",
            task.task_id,
            round_.round_number,
            round_.reported,
            pending.metrics.get("eval/accuracy", "n/a"),
            extra=about(task.task_id, round_.round_number),
        )
        self._coordinator.notify(task, record)

    def _record_failed(self, task: TaskRuntime, round_: RoundInProgress) -> None:
        record = self._record(round_, RoundState.FAILED)
        # AlreadyExists: recorded by a write that reported failure; the store is the judge.
        with contextlib.suppress(AlreadyExists):
            self._coordinator.store.record_closed_round(
                record, self._coordinator.fence(task.task_id)
            )
        self._coordinator.forget(task, round_)
        log.warning(
            "task %s round %d failed: %d reports, %d needed",
            task.task_id,
            round_.round_number,
            round_.reported,
            task.config.effective_min_reports,
            extra=about(task.task_id, round_.round_number),
        )
        self._coordinator.notify(task, record)
