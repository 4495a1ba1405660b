"""What the compression benchmarks share: the machine's description and RESULTS.md appends."""

from __future__ import annotations

import os
import pathlib
import platform

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def describe_machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def append_results(title: str, machine: str, lines: list[str]) -> None:
    with RESULTS.open("a") as out:
        if out.tell() == 0:
            out.write("# Benchmark results\n")
        out.write(f"\n## {title}\n\nMachine: {machine}\n\n" + "\n".join(lines) + "\n")
