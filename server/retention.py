"""Retention: how long the coordinator keeps what it learned per assignment.

Every selected device leaves a row in the store (its assignment, by token hash), and every
committed round its weights and server state. Kept for ever, a task that runs for a year
grows its store by the size of the fleet's participation, and queries that touch those rows
slow down with the number of past rounds. So the round driver prunes, off the request path
and at most once per `interval_s`: what a task no longer needs once its round is closed and
older than the retention age (`Store.prune_history` says what stays).

Eligibility's minimum separation reads when a device was last selected; a task whose
`min_separation_s` is longer than the retention age keeps its assignments that long. Nor is
anything pruned before both of a round's deadlines have passed twice over, however short the
retention age, so a round in progress never loses the weights it hands out.
"""

from __future__ import annotations

import dataclasses
import logging

from server.config import TaskConfig
from server.store import Store

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetentionSettings:
    # How long assignments, counted-upload marks and old checkpoints are kept (a week: enough
    # for an operator to look into a round's participants, and for any retry to be over).
    age_s: float = 7 * 24 * 3600.0
    # How often the driver prunes: each pass deletes what aged out since the previous one.
    interval_s: float = 300.0


class Retention:
    def __init__(self, settings: RetentionSettings) -> None:
        if settings.age_s <= 0 or settings.interval_s <= 0:
            raise ValueError("retention age and interval must be positive")
        self.settings = settings
        self._next_at = float("-inf")

    def kept_s(self, config: TaskConfig) -> float:
        """How far back a task's history is kept."""
        round_lifetime_s = config.selection_deadline_s + config.reporting_deadline_s
        return max(self.settings.age_s, config.min_separation_s, 2.0 * round_lifetime_s)

    def due(self, now: float) -> bool:
        return now >= self._next_at

    def prune(self, store: Store, configs: list[TaskConfig], now: float) -> int:
        """Prunes every task's history (if due); returns the rows removed. Raises
        StoreUnavailable (nothing of that task was removed; the next interval retries)."""
        if not self.due(now):
            return 0
        self._next_at = now + self.settings.interval_s
        removed = 0
        for config in configs:
            removed += store.prune_history(config.task_id, now - self.kept_s(config))
        if removed:
            log.info("retention: pruned %d rows of history", removed)
        return removed
