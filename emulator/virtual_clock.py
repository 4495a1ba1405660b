"""Virtual time for phone availability: a simulated day can pass in minutes.

Only availability (charging, idleness, Wi-Fi) follows this clock. Training, transfers, gRPC and
the coordinator's deadlines stay on real time, so a faster clock makes the fleet's day pass
quickly without making the real work any faster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class VirtualClock:
    """now() = start_s + speedup * (real seconds since `anchor_s`).

    Every worker process builds its own VirtualClock from the same (start_s, speedup, anchor_s),
    read against the wall clock, so all of them agree on the virtual time.
    """

    def __init__(
        self,
        start_s: float,
        speedup: float = 1.0,
        anchor_s: float | None = None,
        real_time: Callable[[], float] = time.time,
    ) -> None:
        if not speedup > 0:
            raise ValueError(f"speedup must be positive, got {speedup}")
        self.start_s = start_s
        self.speedup = speedup
        self._real_time = real_time
        self.anchor_s = real_time() if anchor_s is None else anchor_s

    def now(self) -> float:
        return self.start_s + self.speedup * (self._real_time() - self.anchor_s)

    def real_seconds(self, virtual_seconds: float) -> float:
        """How long `virtual_seconds` of this clock last in real time."""
        return virtual_seconds / self.speedup

    async def sleep(self, seconds: float) -> None:
        """Sleeps `seconds` of virtual time."""
        await asyncio.sleep(max(0.0, self.real_seconds(seconds)))
