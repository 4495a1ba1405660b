"""COMMITTED, FAILED, ABANDONED: terminal states, and the record each leaves in the store."""

from __future__ import annotations

from server.rounds.round import RoundInProgress
from server.store import RoundRecord, RoundState, UnrecordedRound


def summarize(
    round_: RoundInProgress,
    state: RoundState,
    now: float,
    metrics: dict[str, float] | None = None,
    weights_sha256: str = "",
) -> RoundRecord:
    """The record a round leaves in the store when it ends in `state`. The round itself is
    unchanged: it becomes `state` in memory only once the record is durable."""
    if state not in (RoundState.COMMITTED, RoundState.FAILED, RoundState.ABANDONED):
        raise ValueError(f"{state} is not a terminal round state")
    metrics = dict(metrics or {})
    for cause, count in round_.dropout_causes().items():
        metrics[f"round/dropouts/{cause.lower()}"] = float(count)
    metrics["round/dropouts/no_report"] = float(round_.outstanding)
    metrics["round/duration_s"] = now - round_.started_at
    return RoundRecord(
        task_id=round_.task_id,
        round_number=round_.round_number,
        state=state,
        selected=round_.selected,
        reported=round_.reported,
        dropped=round_.dropped,
        metrics=metrics,
        started_at=round_.started_at,
        finished_at=now,
        weights_sha256=weights_sha256,
    )


def abandoned(task_id: str, lost: UnrecordedRound, now: float) -> RoundRecord:
    """A round found open in the store after a restart: its in-memory state is gone, so none
    of its uploads count and every device it selected is a dropout."""
    return RoundRecord(
        task_id=task_id,
        round_number=lost.round_number,
        state=RoundState.ABANDONED,
        selected=lost.selected,
        reported=0,
        dropped=lost.selected,
        metrics={"round/dropouts/abandoned": float(lost.selected)},
        started_at=lost.started_at,
        finished_at=now,
    )
