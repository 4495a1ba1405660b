"""Fakes for time and device conditions, shared by the tests. Nothing here fakes a real part."""

from __future__ import annotations

import asyncio

from device_runtime.conditions import ConditionsSnapshot


class FakeClock:
    """A clock that only moves when told to; `sleep` records the delay and advances time."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.time = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.time += max(0.0, seconds)
        await asyncio.sleep(0)


class ScriptedConditions:
    """Eligible until `stop_after` polls, then ineligible (not idle): drives interruptions."""

    def __init__(self, stop_after: int | None = None, eligible: bool = True) -> None:
        self.polls = 0
        self._stop_after = stop_after
        self._eligible = eligible

    def current(self) -> ConditionsSnapshot:
        self.polls += 1
        idle = self._eligible and (self._stop_after is None or self.polls <= self._stop_after)
        return ConditionsSnapshot(charging=True, idle=idle, unmetered=True)
