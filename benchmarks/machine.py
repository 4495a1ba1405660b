"""The machine a benchmark ran on, and appending its figures to benchmarks/RESULTS.md.

Every benchmark records through here, so each section names its machine the same way.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


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


def append_section(title: str, body: str) -> None:
    """Appends `## title, <UTC time>`, the machine, then `body` (Markdown) to RESULTS.md."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a") as out:
        if out.tell() == 0:
            out.write("# Benchmark results\n")
        out.write(f"\n## {title}, {stamp}\n\nMachine: {describe()}\n\n{body.strip()}\n")


def append_results(title: str, lines: list[str]) -> None:
    """Appends a section whose body is `lines` as bullets."""
    append_section(title, "\n".join(f"- {line}" for line in lines))
