"""RESULTS.md holds each benchmark once: a new run replaces its section, keyed by the heading."""

from __future__ import annotations

import pathlib

from benchmarks.machine import INTRO, record_figures, record_section

LOG = """# Benchmark results

History is in git.

## Upload ingest

Measured 2026-11-21 08:18 UTC.

- coordinator: 0.56 s

## Emulator fleet scale, 20x from 5:00 UTC

- rounds: 36 committed

## TFF tutorial rounds

- ratio Overnight / TFF: 0.40
"""


def _headings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("## ")]


def test_a_new_run_replaces_its_section_in_place(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(LOG)

    record_section(
        "Emulator fleet scale, 20x from 5:00 UTC", "- rounds: 40 committed", results=results
    )

    text = results.read_text()
    assert _headings(text) == [
        "## Upload ingest",
        "## Emulator fleet scale, 20x from 5:00 UTC",
        "## TFF tutorial rounds",
    ]
    assert "- rounds: 40 committed" in text
    assert "- rounds: 36 committed" not in text


def test_replacing_one_section_keeps_the_others_and_the_intro(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(LOG)

    record_section("Upload ingest", "- coordinator: 0.50 s", results=results)

    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nHistory is in git.\n")
    assert "- rounds: 36 committed" in text
    assert "- ratio Overnight / TFF: 0.40" in text


def test_a_benchmark_not_yet_recorded_is_added_at_the_end(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(LOG)

    record_section("Secure aggregation", "| n |\n|---|\n| 100 |", results=results)

    assert _headings(results.read_text())[-1] == "## Secure aggregation"
    assert len(_headings(results.read_text())) == 4


def test_duplicates_left_by_the_appending_writer_collapse_into_the_new_run(
    tmp_path: pathlib.Path,
) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text(LOG + "\n## Upload ingest\n\n- coordinator: 0.58 s\n")

    record_section("Upload ingest", "- coordinator: 0.49 s", results=results)

    text = results.read_text()
    assert _headings(text).count("## Upload ingest") == 1
    assert "0.56 s" not in text and "0.58 s" not in text
    assert "- coordinator: 0.49 s" in text


def test_the_section_names_its_time_command_machine_and_goal(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "RESULTS.md"

    record_section(
        "Upload ingest", "- coordinator: 0.49 s", goal="ratio >= 0.8: met", results=results
    )

    section = results.read_text().split("## Upload ingest", 1)[1]
    assert "\nMeasured " in section and " UTC. Command: `.venv/bin/python " in section
    assert "\nMachine: " in section and "load average" in section
    assert "\nGoal: ratio >= 0.8: met\n" in section


def test_a_missing_file_starts_with_the_intro(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "RESULTS.md"

    record_section("Upload ingest", "- coordinator: 0.49 s", results=results)

    assert results.read_text().startswith(INTRO)


def test_figures_are_recorded_as_one_table(tmp_path: pathlib.Path) -> None:
    results = tmp_path / "RESULTS.md"

    record_figures(
        "Upload ingest", [("setting", "100 uploads"), ("coordinator", "0.49 s")], results=results
    )

    assert (
        "| figure | value |\n|---|---|\n| setting | 100 uploads |\n| coordinator | 0.49 s |\n"
        in (results.read_text())
    )
