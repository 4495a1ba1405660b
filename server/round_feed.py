"""Closed rounds as they are recorded, for AdminService.WatchRounds: nothing polls.

The coordinator calls its round observers on the event loop whenever a round is recorded
(committed, failed or abandoned). `RoundFeed` is such an observer: it wakes every stream
waiting on the task, which then reads the store for rounds it has not sent yet. Reading the
store (not the notification) is what a stream sends, so a stream that was busy when a round
closed misses nothing, and a restarted coordinator replays history the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.coordinator import Coordinator
from server.errors import Unavailable
from server.store import RoundRecord, RoundState, TaskState
from server.task_runtime import TaskRuntime

CLOSED_STATES = (RoundState.COMMITTED, RoundState.FAILED, RoundState.ABANDONED)


class RoundFeed:
    """Wakes streams when a task's round is recorded. Single event loop, like the coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        self._changed: dict[str, asyncio.Event] = {}
        self._closed = False
        coordinator.observers.append(self._round_recorded)

    def _round_recorded(self, task: TaskRuntime, record: RoundRecord) -> None:
        self.task_changed(task.task_id)

    def task_changed(self, task_id: str) -> None:
        """Wakes the task's streams: a round was recorded or the task's state changed."""
        # A fresh event per change: every stream waiting on the old one wakes, and a stream
        # that reads the store after this point waits on the new one.
        changed = self._changed.pop(task_id, None)
        if changed is not None:
            changed.set()

    def close(self) -> None:
        """The coordinator is stopping: every stream ends with UNAVAILABLE."""
        self._closed = True
        for changed in self._changed.values():
            changed.set()
        self._changed.clear()

    async def closed_rounds(self, task_id: str, after_round: int) -> AsyncIterator[RoundRecord]:
        """The task's closed rounds numbered above `after_round`, oldest first, then each one
        as it is recorded, until the task can record no more. Raises NotFound (unknown task)
        before yielding anything, Unavailable when the coordinator stops."""
        task = self._coordinator.task(task_id)
        sent: set[int] = set()
        while True:
            if self._closed:
                raise Unavailable("the coordinator is stopping; resume with after_round later")
            # Taken before the store is read: a round recorded after the read sets it.
            changed = self._changed.setdefault(task_id, asyncio.Event())
            for record in self._coordinator.rounds(task_id):
                if (
                    record.round_number > after_round
                    and record.round_number not in sent
                    and record.state in CLOSED_STATES
                ):
                    sent.add(record.round_number)
                    yield record
            if _finished(task):
                return
            await changed.wait()


def _finished(task: TaskRuntime) -> bool:
    """No further round of this task will ever be recorded."""
    return task.completed or task.state is TaskState.CANCELLED or bool(task.fault)
