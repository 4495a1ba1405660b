"""One closed round as the Python API yields it, with its metrics in TFF's shape."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from protos import admin_pb2


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """A round that closed: committed (the model moved), failed (too few reports; the task
    retries with a new round) or abandoned (cancelled, or lost to a coordinator restart).

    Attributes:
      round_number: the round's number; failed rounds take numbers too.
      state: "committed", "failed" or "abandoned".
      selected: devices selected for the round.
      reported: devices whose update was counted.
      dropped: selected devices that reported a failure or never reported.
      metrics: flat TFF metric names, e.g. "client_work/train/loss", "eval/accuracy",
        "aggregator/zeroing/zeroing_norm", "broadcasted_bits", "aggregated_bits".
      started_at, finished_at: unix seconds.
    """

    round_number: int
    state: str
    selected: int
    reported: int
    dropped: int
    metrics: dict[str, float]
    started_at: float
    finished_at: float

    @property
    def committed(self) -> bool:
        return self.state == "committed"

    @property
    def tff_metrics(self) -> collections.OrderedDict[str, Any]:
        """The metrics nested as `tff.learning` algorithms return them from `next`:
        `metrics['client_work']['train']['loss']`, `metrics['aggregator'][...]`."""
        nested: collections.OrderedDict[str, Any] = collections.OrderedDict(
            distributor=(), client_work=collections.OrderedDict(), aggregator=(), finalizer=()
        )
        for name in sorted(self.metrics):
            *path, leaf = name.split("/")
            level = nested
            for part in path:
                if not isinstance(level.get(part), collections.OrderedDict):
                    level[part] = collections.OrderedDict()
                level = level[part]
            level[leaf] = self.metrics[name]
        return nested

    @classmethod
    def from_summary(cls, summary: admin_pb2.RoundSummary) -> RoundResult:
        return cls(
            round_number=summary.round_number,
            state=summary.state,
            selected=summary.selected,
            reported=summary.reported,
            dropped=summary.dropped,
            metrics=dict(summary.metrics),
            started_at=summary.started_at,
            finished_at=summary.finished_at,
        )
