"""Graceful drain: how `overnight serve` stops on SIGTERM without losing what devices send.

1. `DrainGate.close` (through `CoordinatorServer.begin_drain`): check-ins get a rejection
   with a retry window (`drain_retry_s`) instead of an assignment, and health turns
   NOT_SERVING, so a load balancer sends devices elsewhere;
2. `wait_for_drain`: the calls already under way (downloads, uploads, failure reports, SecAgg
   messages) finish, and the round driver ends every round they completed: a round whose
   target is reached commits. It ends at the drain timeout, or at once when `interrupted`
   is set (a second SIGTERM);
3. the server stops, and `abandon_open_rounds` records each round still selecting or
   reporting as abandoned (unless interrupted: a restart records them the same way).

Nothing committed is lost on any path: a commit is one SQLite transaction, and the store's
lock makes closing it wait for a commit under way in the driver's worker thread.

Devices are rejected with SHUTTING_DOWN, so a device (and the check-in metrics) can tell a
coordinator going away from one without a task; the retry window is what a device acts on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import grpc

from device_runtime.logs import about
from protos import common_pb2, device_pb2
from server.errors import AlreadyExists, StoreUnavailable
from server.method_wrapping import WrappingInterceptor
from server.store import RoundState

if TYPE_CHECKING:
    from server.coordinator import Coordinator
    from server.round_driver import RoundDriver

log = logging.getLogger(__name__)

CHECK_IN = "/overnight.v1.DeviceService/CheckIn"
# Devices turned away by a draining coordinator come back within this window: a restart or
# another replica usually serves by then.
drain_retry_s = (30.0, 90.0)
default_drain_timeout_s = 30.0

Behaviour = Callable[..., Any]


class Ending(enum.Enum):
    DRAINED = "drained"  # every call finished and every completed round was ended
    TIMED_OUT = "timed out"
    INTERRUPTED = "interrupted"


class DrainGate(WrappingInterceptor):
    """On the device listener, outside the request guard: counts the calls under way, and
    once closed answers check-ins with a rejection. Calls other than check-ins are still
    served while draining: they belong to devices that hold an assignment."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        self.closed = True

    async def idle(self) -> None:
        """Returns once no call is under way."""
        while self.in_flight:
            await self._idle.wait()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method == CHECK_IN:
            gated = handler._replace(unary_unary=self._check_in(handler.unary_unary))
        elif handler.unary_unary is not None:
            gated = handler._replace(unary_unary=self._counted(handler.unary_unary))
        elif handler.unary_stream is not None:
            gated = handler._replace(unary_stream=self._counted_stream(handler.unary_stream))
        elif handler.stream_unary is not None:
            gated = handler._replace(stream_unary=self._counted(handler.stream_unary))
        else:
            gated = handler
        return gated

    def _check_in(self, behaviour: Behaviour) -> Behaviour:
        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.closed:
                return device_pb2.CheckInResponse(
                    rejection=device_pb2.Rejection(
                        reason=device_pb2.Rejection.SHUTTING_DOWN,
                        message="the coordinator is shutting down; check in again later",
                    ),
                    retry_window=common_pb2.RetryWindow(
                        min_delay_s=drain_retry_s[0], max_delay_s=drain_retry_s[1]
                    ),
                )
            return await behaviour(request, context)

        return gated

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    def _counted(self, behaviour: Behaviour) -> Behaviour:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                return await behaviour(request, context)
            finally:
                self._leave()

        return counted

    def _counted_stream(self, behaviour: Behaviour) -> Behaviour:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                self._leave()

        return counted


async def wait_for_drain(
    gate: DrainGate, driver: RoundDriver, timeout_s: float, interrupted: asyncio.Event
) -> Ending:
    """Waits, after the gate closed, until the calls under way have finished and the round
    driver has ended the rounds they completed; or the timeout; or `interrupted`."""

    async def drained() -> None:
        await gate.idle()
        await driver.settled()

    draining = asyncio.ensure_future(drained())
    interruption = asyncio.ensure_future(interrupted.wait())
    try:
        done, _ = await asyncio.wait(
            (draining, interruption), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in (draining, interruption):
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
    if draining in done:
        return Ending.DRAINED
    return Ending.INTERRUPTED if interruption in done else Ending.TIMED_OUT


def abandon_open_rounds(coordinator: Coordinator) -> int:
    """Records every round still selecting or reporting as abandoned, once the server and
    its round driver have stopped; returns how many. Rounds the driver was ending stay as
    they are: a commit under way may still become durable, and a restart records any other
    as abandoned."""
    abandoned = 0
    for task in coordinator.tasks():
        for round_ in list(task.open_rounds.values()):
            if round_.state not in (RoundState.SELECTING, RoundState.REPORTING):
                continue
            try:
                coordinator.abandon(task, round_)
            except (StoreUnavailable, AlreadyExists) as exc:
                log.error(
                    "task %s: round %d not recorded: %s",
                    task.task_id,
                    round_.round_number,
                    exc,
                    extra=about(task.task_id, round_.round_number),
                )
                continue
            abandoned += 1
            log.warning(
                "task %s round %d abandoned by the drain: %d of %d reports",
                task.task_id,
                round_.round_number,
                round_.reported,
                task.config.target_reports,
                extra=about(task.task_id, round_.round_number),
            )
    return abandoned


# How long, after `overnight serve` has stopped, the tasks still pending get to end once
# cancelled; a task that does not is logged with its stack and left behind.
leftover_tasks_s = 5.0


def run_to_exit(main: Coroutine[Any, Any, None], leftover_s: float | None = None) -> None:
    """asyncio.run(main), except that the process always gets to exit: asyncio.run cancels
    the tasks still pending when `main` returns and waits for them without bound, so one
    task that swallows its cancellation kept a drained coordinator alive for good (seen
    once, in the replica e2e test). Here they get `leftover_s`; any still pending are
    logged with their stacks (to find the defect) and abandoned with the loop."""
    bound_s = leftover_tasks_s if leftover_s is None else leftover_s
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in leftover:
                task.cancel()
            if leftover:
                _, pending = loop.run_until_complete(asyncio.wait(leftover, timeout=bound_s))
                for task in pending:
                    stack = io.StringIO()
                    task.print_stack(file=stack)
                    log.error(
                        "task %s did not end within %g s of its cancellation at shutdown; "
                        "left behind.\n%s",
                        task.get_name(),
                        bound_s,
                        stack.getvalue(),
                    )
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
