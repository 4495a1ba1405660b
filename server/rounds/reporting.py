"""REPORTING: selection is closed; the round waits for reports until its target or deadline.

The round closes early when no selected device is left to report (all reported or failed).
Below `min_reports` at that point the round fails and the task starts a new one.
"""

from __future__ import annotations

from server.config import TaskConfig
from server.rounds.round import RoundCounts, RoundInProgress
from server.store import RoundState


def enter(round_: RoundInProgress, config: TaskConfig, now: float) -> None:
    round_.reporting_started_at = now
    round_.reporting_deadline = now + config.reporting_deadline_s


def next_state(round_: RoundCounts, config: TaskConfig, now: float) -> RoundState:
    if round_.reported >= config.target_reports:
        return RoundState.AGGREGATING
    if now >= round_.reporting_deadline or round_.outstanding == 0:
        if round_.reported >= config.effective_min_reports:
            return RoundState.AGGREGATING
        return RoundState.FAILED
    return RoundState.REPORTING
