"""The machine a benchmark ran on, and recording its figures in benchmarks/RESULTS.md.

Every benchmark records through here, so each section names its machine and command the same
way. RESULTS.md holds the current figures only: a run replaces its benchmark's section (keyed
by the heading, which carries no timestamp) and the history stays in git.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shlex
import sys
import tempfile

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"

INTRO = """# Benchmark results

The current figures of each benchmark in `benchmarks/`: one section per benchmark, with the
command that produced it, when, and on what machine. A new run replaces its benchmark's
section; earlier figures are in git (`git log -p benchmarks/RESULTS.md`). Figures are
measured, not edited. The machines are shared and noisy: compare the ratios measured side by
side within one run, and read the load average beside them.
"""


def describe() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # The machine is shared: the load when the section is written says how busy it was.
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}; "
        f"load average {load} (1, 5, 15 min) at the end of the run"
    )


def command() -> str:
    """The command line that started this benchmark, as a reader would type it again."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return shlex.join([".venv/bin/python", *program, *sys.argv[1:]])


def replace_section(document: str, title: str, section: str) -> str:
    """`document` with the section headed `## title` replaced by `section`.

    A title not in the document is added at the end; further sections with the same heading
    (left by the old appending writer) are dropped, so each benchmark appears once.
    """
    if "\n" in title:
        raise ValueError(f"a section title is one line: {title!r}")
    heading = f"## {title}"
    intro, *sections = _split_sections(document)
    kept: list[str] = []
    replaced = False
    for old in sections:
        if old.splitlines()[0].rstrip() != heading:
            kept.append(old)
        elif not replaced:
            kept.append(section)
            replaced = True
    if not replaced:
        kept.append(section)
    return "\n".join(part.strip("\n") + "\n" for part in [intro, *kept] if part.strip())


def _split_sections(document: str) -> list[str]:
    """The text before the first `## ` heading, then each section from its heading on."""
    parts: list[list[str]] = [[]]
    for line in document.splitlines():
        if line.startswith("## "):
            parts.append([])
        parts[-1].append(line)
    return ["\n".join(part) for part in parts]


def record_section(
    title: str, body: str, *, goal: str | None = None, results: pathlib.Path = RESULTS
) -> None:
    """Writes `## title` with the time, command, machine, `goal` and `body` (Markdown).

    `title` must not change between runs of the same benchmark (no timestamp, no run note):
    it is the key that finds the section a new run replaces.
    """
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {title}",
        "",
        f"Measured {stamp}. Command: `{command()}`",
        "",
        f"Machine: {describe()}",
        "",
    ]
    if goal is not None:
        lines += [f"Goal: {goal}", ""]
    section = "\n".join([*lines, body.strip()]) + "\n"
    document = results.read_text() if results.exists() else INTRO
    _write_atomically(results, replace_section(document, title, section))


def record_figures(
    title: str,
    figures: list[tuple[str, str]],
    *,
    goal: str | None = None,
    results: pathlib.Path = RESULTS,
) -> None:
    """Records a section whose body is one table of (figure, value) rows."""
    rows = [f"| {name} | {value} |" for name, value in figures]
    record_section(
        title, "\n".join(["| figure | value |", "|---|---|", *rows]), goal=goal, results=results
    )


def _write_atomically(path: pathlib.Path, text: str) -> None:
    # An interrupted run must not leave RESULTS.md cut short: write aside, then rename.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as out:
        out.write(text)
    os.chmod(out.name, mode)
    os.replace(out.name, path)
