"""The benchmarks' process readings agree with what the kernel reports by other routes."""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.process_stats import children_cpu_seconds, cpu_seconds, quantile


def test_cpu_seconds_of_this_process_is_what_os_times_reports() -> None:
    # Prepare: some CPU work of our own, so neither figure is zero.
    sum(i * i for i in range(200_000))

    # Execute
    times = os.times()
    measured = cpu_seconds(os.getpid())

    # Assert: both read the same kernel counters, in clock ticks.
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    assert abs(measured - (times.user + times.system)) <= 2 * tick


def test_children_cpu_seconds_counts_only_the_parent_s_live_children() -> None:
    # Prepare: a child of ours that lives until told to stop.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        # Execute
        ours = children_cpu_seconds(os.getpid())
        nobodys = children_cpu_seconds(2**22 + 1)  # above Linux's pid limit: no children

        # Assert
        assert ours >= cpu_seconds(child.pid)
        assert nobodys == 0.0
    finally:
        child.communicate(b"")


def test_quantile_takes_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100, shuffled order does not matter
    assert quantile(list(reversed(values)), 0.5) == 51.0
    assert quantile(values, 0.99) == 100.0
    assert quantile(values, 0.0) == 1.0
    assert quantile(values, 1.0) == 100.0
