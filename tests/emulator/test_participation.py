"""Participation log: events per bin of virtual time, merged across workers, CSV and PNG."""

from __future__ import annotations

import csv
import pathlib

import numpy as np
import pytest

from device_runtime.runtime import Attempt, Outcome
from emulator.participation import ParticipationLog, dropout_cause

START = 20_000 * 86400.0


def _attempt(outcome: Outcome, detail: str = "") -> Attempt:
    return Attempt(outcome, 1.0, detail=detail)


def test_events_land_in_their_bin_and_dropouts_keep_their_cause() -> None:
    log = ParticipationLog(START, 3600.0)

    log.record(_attempt(Outcome.INELIGIBLE), START + 10)
    log.record(_attempt(Outcome.REJECTED), START + 20)
    log.record(_attempt(Outcome.REPORTED), START + 3700)
    log.record(_attempt(Outcome.INTERRUPTED, "interrupted after 2 batches: not idle"), START + 3800)

    first, second = log.rows()
    assert (first["checked_in"], first["selected"]) == (1, 0)
    assert (second["checked_in"], second["selected"], second["reported"], second["dropped"]) == (
        2,
        2,
        1,
        1,
    )
    assert log.causes == {"picked up": 1}
    assert log.outcomes["ineligible"] == 1


@pytest.mark.parametrize(
    ("detail", "cause"),
    [
        ("interrupted after 0 batches: not charging, not idle", "unplugged"),
        ("interrupted after 3 batches: not unmetered", "left Wi-Fi"),
    ],
)
def test_interruptions_name_what_changed(detail: str, cause: str) -> None:
    assert dropout_cause(_attempt(Outcome.INTERRUPTED, detail)) == cause


def test_refused_late_upload_is_a_late_report() -> None:
    attempt = _attempt(Outcome.LATE, "FAILED_PRECONDITION: round 3 no longer takes reports")

    assert dropout_cause(attempt) == "late report (round closed)"


def test_merging_workers_adds_head_counts_and_events() -> None:
    a, b = ParticipationLog(START, 900.0), ParticipationLog(START, 900.0)
    a.sample_eligible(START + 1, 10)
    a.sample_eligible(START + 2, 20)
    b.sample_eligible(START + 3, 5)
    b.record(_attempt(Outcome.REPORTED), START + 4)

    a.merge(b)

    [row] = a.rows()
    assert row["eligible"] == 15 + 5  # each worker's mean, summed over workers
    assert row["reported"] == 1


def test_logs_with_other_bins_do_not_merge() -> None:
    with pytest.raises(ValueError, match="different bins"):
        ParticipationLog(START, 900.0).merge(ParticipationLog(START, 600.0))


def test_csv_and_png_are_written(tmp_path: pathlib.Path) -> None:
    log = ParticipationLog(START + 6 * 3600, 900.0)
    for quarter in range(8):
        log.sample_eligible(START + 6 * 3600 + quarter * 900 + 1, 100 + quarter)
        log.record(_attempt(Outcome.REPORTED), START + 6 * 3600 + quarter * 900 + 2)

    log.write_csv(tmp_path / "p.csv")
    log.plot(tmp_path / "p.png", "test fleet")

    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 8
    assert [float(r["virtual_hour_utc"]) for r in rows[:2]] == [6.0, 6.25]
    assert float(rows[-1]["eligible"]) == 107
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bin_missing_a_workers_head_count_shows_no_eligible_figure() -> None:
    a, b = ParticipationLog(START, 900.0), ParticipationLog(START, 900.0)
    a.sample_eligible(START + 1, 10)
    b.sample_eligible(START + 2, 5)
    a.sample_eligible(START + 901, 10)  # worker b was too busy to count in the second bin
    b.record(_attempt(Outcome.REPORTED), START + 902)

    a.merge(b)

    first, second = a.rows()
    assert first["eligible"] == 15
    assert np.isnan(second["eligible"])
    assert second["reported"] == 1


def test_an_empty_log_collects_workers_into_the_fleets_figures() -> None:
    fleet = ParticipationLog(START, 900.0, samplers=0)
    for count in (3, 4):
        worker = ParticipationLog(START, 900.0)
        worker.sample_eligible(START + 1, count)
        fleet.merge(worker)

    [row] = fleet.rows()

    assert row["eligible"] == 7
