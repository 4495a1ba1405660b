"""Secure aggregation inside the coordinator's rounds: the few points where the two meet.

The coordinator calls, for rounds whose aggregator is `secure_aggregator()`:
  enroll          at each selection: the device's partial session config for its Assignment;
  selection_closed when the round enters REPORTING: the session opens over the selected
                  devices (n = their count; k and t from n), devices that already reported a
                  failure are its first dropouts;
  next_state      instead of reporting.next_state while REPORTING: the round waits for the
                  session; each SecAgg stage closes at its deadline (a fraction of the round's
                  reporting deadline, below), the masked-input stage also as soon as the
                  round's target count of masked inputs arrived, if closing then leaves
                  every secret t holders and slack (else it waits for more inputs). A
                  completed session with at
                  least min_reports summed devices lets the round aggregate; an aborted one
                  (fewer than t survivors) or too few summed devices fails it, and the task
                  retries with a new round;
  device_failed   on a failure report: the device is a dropout of the session;
  round_closed    when the round ends: an unfinished session is aborted.

The session's state is touched from the service's worker threads; changes the coordinator asks
for (close a stage, drop a device) go through `SecAggService.apply`, serialized with the
devices' messages, when an event loop runs (always, under gRPC), else directly.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from device_runtime.logs import about
from device_runtime.secagg.parameters import fewest_clients
from protos import secagg_pb2
from server.config import TaskConfig
from server.rounds.round import RoundInProgress
from server.secagg.grpc_service import SecAggService
from server.secagg.round_aggregator import SecureSumRoundAggregator
from server.secagg.server import SecAggServer
from server.store import RoundState

log = logging.getLogger(__name__)

# When each stage closes, as a fraction of the reporting deadline after selection closed.
# Keys are quick to make; the masked input waits for training; unmasking is quick again.
stage_deadline_fraction = {
    secagg_pb2.ADVERTISE_KEYS: 0.1,
    secagg_pb2.SHARE_KEYS: 0.2,
    secagg_pb2.MASKED_INPUT_COLLECTION: 0.85,
    secagg_pb2.UNMASKING: 1.0,
}
# Finished sessions stay hosted a little, so slow devices still learn how theirs ended.
finished_sessions_kept = 8


class SecureRounds:
    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.service = SecAggService(on_change)
        # session -> the close under way: (stage, -1 at its deadline or inputs at the target)
        self._closing: dict[bytes, tuple[int, int]] = {}
        self._finished: collections.deque[bytes] = collections.deque()
        self._pending: set[asyncio.Task[object]] = set()

    @staticmethod
    def aggregator(round_: RoundInProgress) -> SecureSumRoundAggregator | None:
        aggregate = round_.aggregate
        return aggregate if isinstance(aggregate, SecureSumRoundAggregator) else None

    def min_selected(self, round_: RoundInProgress) -> int:
        """The fewest devices a round must select: a secure round's session needs
        `fewest_clients()`, any other round no minimum beyond its task's."""
        return fewest_clients() if self.aggregator(round_) is not None else 0

    def enroll(
        self, round_: RoundInProgress, token_sha256: str, device_public_key: bytes = b""
    ) -> secagg_pb2.SecAggSessionConfig:
        """Call for secure rounds only (`aggregator(round_)` is not None)."""
        aggregate = self.aggregator(round_)
        assert aggregate is not None
        self.service.expect_session(aggregate.enrollment)
        return aggregate.enroll(token_sha256, device_public_key)

    def selection_closed(self, round_: RoundInProgress, failed_tokens: list[str]) -> None:
        aggregate = self.aggregator(round_)
        if aggregate is None:
            return
        session = aggregate.open_session(failed_tokens)
        if session is None:
            return
        self.service.add_session(session)
        log.info(
            "task %s round %d: secure aggregation over %d devices (k=%d, t=%d)",
            round_.task_id,
            round_.round_number,
            session.num_clients,
            session.num_neighbours,
            session.threshold,
            extra=about(round_.task_id, round_.round_number),
        )

    def next_state(self, round_: RoundInProgress, config: TaskConfig, now: float) -> RoundState:
        aggregate = self.aggregator(round_)
        assert aggregate is not None
        session = aggregate.session
        if session is None:
            return RoundState.FAILED
        stage = session.stage
        if stage == secagg_pb2.COMPLETED:
            summed = session.result()[1]
            if summed >= config.effective_min_reports:
                return RoundState.AGGREGATING
            log.warning(
                "task %s round %d: %d devices summed, %d needed",
                round_.task_id,
                round_.round_number,
                summed,
                config.effective_min_reports,
                extra=about(round_.task_id, round_.round_number),
            )
            return RoundState.FAILED
        if stage == secagg_pb2.ABORTED:
            return RoundState.FAILED
        deadline = (
            round_.reporting_started_at
            + stage_deadline_fraction[stage] * config.reporting_deadline_s
        )
        # A close is asked for once per stage at its deadline. At the round's target it is
        # asked for once per masked input taken, and happens only if it leaves the session
        # its slack for dropouts: the devices not yet heard from would count as dropped, and
        # the sparse graph tolerates few per neighbourhood (k - t), often fewer than
        # over-selection leaves out at the target.
        if now >= deadline:
            request, early = (stage, -1), False
        elif (
            stage == secagg_pb2.MASKED_INPUT_COLLECTION
            and session.masked_inputs >= config.target_reports
        ):
            request, early = (stage, session.masked_inputs), True
        else:
            return RoundState.REPORTING
        if self._closing.get(session.session_id) != request:
            self._closing[session.session_id] = request
            # The close runs after messages already waiting for the session, which may end
            # this stage first: it is a close of this stage only, never of the next one.
            if early:
                self._change(session, lambda s: s.close_masked_input_early())
            else:
                self._change(session, lambda s: s.close_stage(stage))
        return RoundState.REPORTING

    def device_failed(self, round_: RoundInProgress, token_sha256: str) -> None:
        aggregate = self.aggregator(round_)
        if aggregate is None or aggregate.session is None:
            return  # before the session opens, selection_closed drops it
        client = aggregate.client_id(token_sha256)
        if client is not None:
            self._change(aggregate.session, lambda s: s.drop_client(client, "reported a failure"))

    def round_closed(self, round_: RoundInProgress) -> None:
        aggregate = self.aggregator(round_)
        if aggregate is None:
            return
        session_id = aggregate.enrollment.session_id
        session = aggregate.session
        if session is None:
            self.service.remove_session(session_id)  # never opened: nothing to tell
            return
        if session.stage != secagg_pb2.COMPLETED:
            reason = f"round {round_.round_number} {round_.state.value}"
            self._change(session, lambda s: s.abort(reason))
        self._closing.pop(session_id, None)
        self._finished.append(session_id)
        while len(self._finished) > finished_sessions_kept:
            self.service.remove_session(self._finished.popleft())

    def _change(self, session: SecAggServer, action: Callable[[SecAggServer], object]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            action(session)  # no event loop, so no service thread can hold the session
            return
        task = loop.create_task(self.service.apply(session.session_id, action))
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("secure-aggregation session change failed", exc_info=task.exception())
