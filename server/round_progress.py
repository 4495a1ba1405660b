"""An open round's life in memory: opened when a check-in finds none selecting, moved through
as many states as its situation allows, up to AGGREGATING or FAILED, where the round driver
takes over. O(1) per step, nothing durable: a request handler may call these."""

from __future__ import annotations

import logging
from typing import assert_never

from device_runtime.logs import about
from server.aggregation import EvaluationReports, UpdateAggregator
from server.rounds import reporting, selecting
from server.rounds.round import AssignmentState, RoundInProgress
from server.secagg.round_bridge import SecureRounds
from server.store import RoundState
from server.task_runtime import TaskRuntime

log = logging.getLogger(__name__)


def open_round(task: TaskRuntime, base_weights_sha256: str, now: float) -> RoundInProgress:
    """Opens the task's next round, selecting, from the given weights."""
    if task.config.is_evaluation:
        aggregate: UpdateAggregator = EvaluationReports()
    else:
        aggregate = task.aggregation.start_round()
    round_ = RoundInProgress(
        task.task_id,
        task.next_round_number,
        aggregate,
        now,
        base_weights_sha256=base_weights_sha256,
        base_version=task.committed_rounds,
    )
    task.open_rounds[round_.round_number] = round_
    task.next_round_number += 1
    log.info(
        "task %s: round %d selecting",
        task.task_id,
        round_.round_number,
        extra=about(task.task_id, round_.round_number),
    )
    return round_


def advance_round(
    task: TaskRuntime, round_: RoundInProgress, now: float, secure_rounds: SecureRounds
) -> bool:
    """Moves the round on as far as it goes now. True when it is the driver's turn (the round
    is AGGREGATING or FAILED)."""
    while True:
        state = round_.state
        match state:
            case RoundState.SELECTING:
                floor = secure_rounds.min_selected(round_)
                following = selecting.next_state(round_, task.config, now, floor)
            case RoundState.REPORTING if secure_rounds.aggregator(round_) is not None:
                following = secure_rounds.next_state(round_, task.config, now)
            case RoundState.REPORTING:
                following = reporting.next_state(round_, task.config, now)
            case RoundState.AGGREGATING | RoundState.FAILED:
                return True
            case RoundState.COMMITTED | RoundState.ABANDONED:
                return False
            case _:
                assert_never(state)
        if following is state:
            return False
        if following is RoundState.REPORTING:
            reporting.enter(round_, task.config, now)
            failed = [t for t, a in round_.assignments.items() if a.state is AssignmentState.FAILED]
            secure_rounds.selection_closed(round_, failed)
        if state is RoundState.REPORTING and following is not RoundState.FAILED:
            task.record_reporting(now - round_.reporting_started_at)
        round_.state = following
