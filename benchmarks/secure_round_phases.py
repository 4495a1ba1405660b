"""Where a secure round's wall time goes: selection, then each SecAgg stage, then the commit.

Read from the coordinator's own log records while `benchmarks.secure_vs_plain` runs its secure
job (no instrumentation of the code under test): the session opens when selection closes
(server/secagg/round_bridge.py logs it), each stage change is logged by the session
(server/secagg/server.py), and the round's start and commit come from the store. A round's
sessions do not overlap (one round at a time), so stage changes belong to the latest session.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics

from benchmarks.fleet_rounds import RoundTimes

PHASES = (
    ("selection (round opens -> session opens)", "open"),
    ("R0 keys still missing at open", "SHARE_KEYS"),
    ("R1 share keys", "MASKED_INPUT_COLLECTION"),
    ("R2 masked inputs", "UNMASKING"),
    ("R3 unmasking", "COMPLETED"),
    ("commit (session done -> round committed)", "commit"),
)


@dataclasses.dataclass
class _Session:
    round_number: int
    opened_at: float
    stage_at: dict[str, float] = dataclasses.field(default_factory=dict)


class SessionLog(logging.Handler):
    """Collects session openings and stage changes, with their times."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sessions: list[_Session] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name == "server.secagg.round_bridge" and "secure aggregation over" in message:
            round_number = int(message.split(" round ")[1].split(":")[0])
            self.sessions.append(_Session(round_number, record.created))
        elif record.name == "server.secagg.server" and " -> " in message and self.sessions:
            self.sessions[-1].stage_at.setdefault(message.rsplit(" -> ", 1)[1], record.created)

    def __enter__(self) -> SessionLog:
        for name in ("server.secagg.round_bridge", "server.secagg.server"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.INFO)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("server.secagg.round_bridge", "server.secagg.server"):
            logging.getLogger(name).removeHandler(self)


def phase_medians(log: SessionLog, times: RoundTimes) -> list[tuple[str, float]]:
    """Median seconds of each phase over the committed rounds whose session completed."""
    committed = {
        times.started_at + at - length: times.started_at + at
        for at, length in zip(times.committed_at_s, times.round_s, strict=True)
    }
    per_phase: dict[str, list[float]] = {name: [] for name, _ in PHASES}
    for session in log.sessions:
        start = max((s for s in committed if s <= session.opened_at), default=None)
        if start is None or "COMPLETED" not in session.stage_at:
            continue
        marks = {"open": session.opened_at, **session.stage_at, "commit": committed[start]}
        previous = start
        for name, mark in PHASES:
            at = marks.get(mark)
            if at is None:
                break
            per_phase[name].append(max(0.0, at - previous))
            previous = at
    return [(name, statistics.median(v)) for name, v in per_phase.items() if v]
