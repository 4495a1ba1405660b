"""How many uploads the coordinator stages in memory at once, and who waits for a slot."""

from __future__ import annotations

import asyncio
from types import TracebackType


class UploadSlots:
    """At most `capacity` uploads hold a slot at once; further ones wait, unread, and HTTP/2
    flow control holds their senders back. `in_use` and `waiting` are what the metrics show
    and what a drain waits for."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._semaphore = asyncio.Semaphore(capacity)
        self.in_use = 0
        self.waiting = 0

    async def __aenter__(self) -> None:
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.in_use += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.in_use -= 1
        self._semaphore.release()
