"""What the benchmarks read about processes: CPU time from Linux's /proc, and a quantile of
measured latencies."""

from __future__ import annotations

import os
import pathlib


def _stat_fields(stat: pathlib.Path) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return stat.read_text().rsplit(")", 1)[1].split()


def _cpu_of(fields: list[str]) -> float:
    """utime + stime, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, every thread (dead ones included)."""
    return _cpu_of(_stat_fields(pathlib.Path(f"/proc/{pid}/stat")))


def children_cpu_seconds(parent: int) -> float:
    """CPU time of the live children of `parent` (PostgreSQL's backends and workers)."""
    total = 0.0
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(stat)
        except OSError:  # the process ended while the directory was read
            continue
        if int(fields[1]) == parent:
            total += _cpu_of(fields)
    return total


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank, no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
