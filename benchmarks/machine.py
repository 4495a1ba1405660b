"""The machine a benchmark ran on, and appending its figures to benchmarks/RESULTS.md."""

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
    memory = ""
    try:
        kib = int(pathlib.Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def append_results(title: str, lines: list[str]) -> None:
    """Appends a dated section with the machine description and `lines` as bullets."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"\n## {title}, {stamp}\n", f"Machine: {describe()}\n"]
    body += [f"- {line}" for line in lines]
    with RESULTS.open("a") as out:
        out.write("\n".join(body) + "\n")
