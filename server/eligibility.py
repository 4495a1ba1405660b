"""Who may join a task's round: example count, runtime version, and participation spacing.

`min_separation_s` samples devices without replacement over a window: a device selected for
a task is not selected again for it until that many seconds have passed.
"""

from __future__ import annotations

import dataclasses

from server.config import TaskConfig, parse_version


@dataclasses.dataclass(frozen=True)
class Ineligible:
    reason: str
    retry_after_s: float  # earliest time it could become eligible, 0 = unknown


def check(
    config: TaskConfig,
    example_count: int,
    runtime_version: str,
    last_selected_at: float | None,
    now: float,
) -> Ineligible | None:
    """None if the device may be selected for the task, else why not."""
    if example_count < config.min_examples:
        return Ineligible(
            f"task {config.task_id!r} needs at least {config.min_examples} examples, "
            f"device has {example_count}",
            0.0,
        )
    if config.min_runtime_version:
        try:
            too_old = parse_version(runtime_version) < parse_version(config.min_runtime_version)
        except ValueError:
            too_old = True
        if too_old:
            return Ineligible(
                f"task {config.task_id!r} needs runtime >= {config.min_runtime_version}, "
                f"device runs {runtime_version or 'an unknown version'}",
                0.0,
            )
    if last_selected_at is not None and config.min_separation_s > 0:
        wait = last_selected_at + config.min_separation_s - now
        if wait > 0:
            return Ineligible(
                f"device took part in task {config.task_id!r} {now - last_selected_at:.0f}s ago; "
                f"minimum separation is {config.min_separation_s:.0f}s",
                wait,
            )
    return None
