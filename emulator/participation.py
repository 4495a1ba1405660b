"""Participation over the simulated day: what the fleet did, per bin of virtual time.

Workers each keep a ParticipationLog for their phones; the parent merges them and writes the
CSV, the PNG plot and the dropout causes.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import pathlib

from device_runtime.runtime import Attempt, Outcome

COLUMNS = ("eligible", "checked_in", "selected", "reported", "dropped")


def dropout_cause(attempt: Attempt) -> str:
    """Why an assigned phone did not report, in the words an operator would use."""
    match attempt.outcome:
        case Outcome.INTERRUPTED:
            detail = attempt.detail
            if "not charging" in detail:
                return "unplugged"
            if "not unmetered" in detail:
                return "left Wi-Fi"
            if "not idle" in detail:
                return "picked up"
            return "interrupted"
        case Outcome.LATE:
            return "late report (round closed)"
        case Outcome.FAILED:
            if "DOWNLOAD" in attempt.detail.upper() or "UNAVAILABLE" in attempt.detail:
                return "transfer failed"
            return "failed"
        case Outcome.INELIGIBLE | Outcome.REJECTED | Outcome.REPORTED | Outcome.UNREACHABLE:
            return ""


@dataclasses.dataclass
class ParticipationLog:
    start_s: float  # virtual time of bin 0
    bin_s: float
    bins: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    eligible_samples: dict[int, int] = dataclasses.field(default_factory=dict)
    # Merged logs: how many workers' head counts a bin holds, of `samplers` in all. A bin that
    # misses a worker's count shows no eligible figure rather than a wrong one.
    samplers: int = 1
    sampled_by: dict[int, int] = dataclasses.field(default_factory=dict)
    causes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def _bin(self, virtual_s: float) -> dict[str, float]:
        index = int((virtual_s - self.start_s) // self.bin_s)
        return self.bins.setdefault(index, dict.fromkeys(COLUMNS, 0.0))

    def record(self, attempt: Attempt, virtual_s: float) -> None:
        self.outcomes[attempt.outcome.value] += 1
        row = self._bin(virtual_s)
        if attempt.outcome in (Outcome.INELIGIBLE, Outcome.UNREACHABLE):
            return
        row["checked_in"] += 1
        if attempt.outcome is Outcome.REJECTED:
            return
        row["selected"] += 1
        if attempt.outcome is Outcome.REPORTED:
            row["reported"] += 1
        else:
            row["dropped"] += 1
            self.causes[dropout_cause(attempt)] += 1

    def sample_eligible(self, virtual_s: float, eligible: int) -> None:
        """Adds a head count of eligible phones; a bin shows the mean of its samples."""
        index = int((virtual_s - self.start_s) // self.bin_s)
        row = self.bins.setdefault(index, dict.fromkeys(COLUMNS, 0.0))
        samples = self.eligible_samples.get(index, 0)
        row["eligible"] = (row["eligible"] * samples + eligible) / (samples + 1)
        self.eligible_samples[index] = samples + 1
        self.sampled_by[index] = 1

    def merge(self, other: ParticipationLog) -> None:
        """Adds another worker's phones (same bins): head counts and events both add up."""
        if (other.start_s, other.bin_s) != (self.start_s, self.bin_s):
            raise ValueError("participation logs with different bins cannot be merged")
        for index, row in other.bins.items():
            mine = self.bins.setdefault(index, dict.fromkeys(COLUMNS, 0.0))
            for column in COLUMNS:
                mine[column] += row[column]
        self.causes.update(other.causes)
        self.outcomes.update(other.outcomes)
        for index, count in other.sampled_by.items():
            self.sampled_by[index] = self.sampled_by.get(index, 0) + count
        self.samplers += other.samplers

    def rows(self) -> list[dict[str, float]]:
        if not self.bins:
            return []
        out = []
        for index in range(min(self.bins), max(self.bins) + 1):
            row = dict(self.bins.get(index, dict.fromkeys(COLUMNS, 0.0)))
            if self.sampled_by.get(index, 0) < self.samplers:
                row["eligible"] = float("nan")
            out.append({"virtual_hour_utc": self._hour(index), **row})
        return out

    def _hour(self, index: int) -> float:
        return ((self.start_s + index * self.bin_s) % 86400.0) / 3600.0

    def write_csv(self, path: str | pathlib.Path) -> None:
        with open(path, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=["virtual_hour_utc", *COLUMNS])
            writer.writeheader()
            for row in self.rows():
                writer.writerow({k: round(v, 2) for k, v in row.items()})

    def plot(self, path: str | pathlib.Path, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        elapsed_h = [i * self.bin_s / 3600.0 for i in range(len(rows))]
        start_h = rows[0]["virtual_hour_utc"] if rows else 0.0
        per_hour = 3600.0 / self.bin_s
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        top.plot(
            elapsed_h, [r["eligible"] for r in rows], ".-", color="tab:green", label="eligible"
        )
        top.set_ylabel("phones eligible now")
        top.legend(loc="upper right")
        top.set_title(title)
        for column, color in (
            ("checked_in", "tab:blue"),
            ("selected", "tab:orange"),
            ("reported", "tab:green"),
            ("dropped", "tab:red"),
        ):
            bottom.plot(
                elapsed_h,
                [r[column] * per_hour for r in rows],
                ".-",
                color=color,
                label=column.replace("_", " "),
            )
        bottom.set_yscale("symlog", linthresh=10)
        bottom.set_ylabel("events per virtual hour")
        hh, mm = divmod(int(round(start_h * 60)), 60)
        bottom.set_xlabel(f"virtual hours since {hh:02d}:{mm:02d} UTC")
        bottom.legend(loc="upper right", ncol=4, fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
