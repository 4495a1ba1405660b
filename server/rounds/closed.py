"""COMMITTED, FAILED, ABANDONED: terminal states, and the record each leaves in the store."""

from __future__ import annotations

from server.rounds.round import RoundInProgress
from server.store import RoundRecord, RoundState


def record(
    round_: RoundInProgress,
    state: RoundState,
    now: float,
    metrics: dict[str, float] | None = None,
    weights_sha256: str = "",
) -> RoundRecord:
    if state not in (RoundState.COMMITTED, RoundState.FAILED, RoundState.ABANDONED):
        raise ValueError(f"{state} is not a terminal round state")
    round_.state = state
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


def abandoned(task_id: str, round_number: int, selected: int, now: float) -> RoundRecord:
    """A round found open in the store after a restart: its in-memory state is gone."""
    return RoundRecord(
        task_id=task_id,
        round_number=round_number,
        state=RoundState.ABANDONED,
        selected=selected,
        reported=0,
        dropped=selected,
        metrics={},
        started_at=now,
        finished_at=now,
    )
