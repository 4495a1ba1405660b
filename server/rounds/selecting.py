"""SELECTING: the round takes devices until it has `target * over_selection` of them.

Devices selected early may report while selection is still open (training can be faster
than selection); a round that reaches its target that way goes straight to aggregation.
"""

from __future__ import annotations

from server.config import TaskConfig
from server.rounds.round import RoundCounts, RoundInProgress
from server.store import RoundState


def next_state(
    round_: RoundCounts, config: TaskConfig, now: float, min_selected: int = 0
) -> RoundState:
    """`min_selected`: the fewest devices the round's aggregation can work with (a secure
    round's session needs a few); past its deadline, selection closes only with that many."""
    if round_.reported >= config.target_reports:
        return RoundState.AGGREGATING
    if round_.selected >= config.selection_quota:
        return RoundState.REPORTING
    deadline_passed = now >= round_.started_at + config.selection_deadline_s
    if deadline_passed and round_.selected >= max(config.effective_min_reports, min_selected):
        return RoundState.REPORTING
    # Past the deadline with too few devices the round keeps selecting: failing it would only
    # start an identical round. Its devices' reporting deadlines still bound their work.
    return RoundState.SELECTING


def takes_devices(round_: RoundInProgress, config: TaskConfig) -> bool:
    return round_.state is RoundState.SELECTING and round_.selected < config.selection_quota
