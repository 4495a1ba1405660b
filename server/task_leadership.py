"""The task leases one replica holds (server/leases.py has the rule, the store the rows).

A replica calls `refresh` on its driver's schedule: it renews the leases it holds, takes the
free or expired ones, and learns which tasks it leads. Between refreshes `leads` answers from
memory and turns False at the lease's expiry on this replica's clock, even if the store cannot
be reached: a leader that cannot renew stops driving before another may take over. Commits
carry `fence(task)`, so if this replica was paused past its lease and did not notice, the
store refuses them anyway.

`overnight serve --replica` uses it (server/replica_coordinator.py): several replicas on one
database decide by it which of them drives each task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from server.errors import StoreUnavailable
from server.leases import Lease, default_lease_s
from server.store import Store

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> float: ...


class TaskLeadership:
    def __init__(
        self, store: Store, clock: Clock, holder: str, lease_s: float = default_lease_s
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"a lease lasts a positive time, not {lease_s}")
        self._store = store
        self._clock = clock
        self.holder = holder
        self.lease_s = lease_s
        self._leases: dict[str, Lease] = {}
        self._renewed_at: float | None = None

    @property
    def renew_every_s(self) -> float:
        """A third of the lease: one missed renewal still leaves a third of it to spare."""
        return self.lease_s / 3

    def due(self) -> bool:
        return self._renewed_at is None or (
            self._clock.now() - self._renewed_at >= self.renew_every_s
        )

    def refresh(self, task_ids: Iterable[str]) -> set[str]:
        """Renews or takes each task's lease; returns the tasks this replica leads now. A
        store failure keeps what is held until it expires here, and is logged."""
        now = self._clock.now()
        for task_id in task_ids:
            self._acquire(task_id, now)
        self._renewed_at = now
        return {task_id for task_id in self._leases if self.leads(task_id)}

    def take_expired(self, task_ids: Iterable[str]) -> None:
        """Between refreshes: asks for tasks whose lease the caller saw expired (their leader
        died), so they are led again within a pass of the expiry, not a renewal later."""
        now = self._clock.now()
        for task_id in task_ids:
            if task_id not in self._leases:
                self._acquire(task_id, now)

    def _acquire(self, task_id: str, now: float) -> None:
        try:
            lease = self._store.acquire_lease(task_id, self.holder, now, self.lease_s)
        except StoreUnavailable as exc:
            log.warning("task %s: lease not renewed (%s)", task_id, exc)
            return
        held = self._leases.get(task_id)
        if lease is None:
            if held is not None:
                log.warning("task %s: leadership lost to another replica", task_id)
            self._leases.pop(task_id, None)
            return
        if held is None or held.epoch != lease.epoch:
            log.info("task %s: %s leads at epoch %d", task_id, self.holder, lease.epoch)
        self._leases[task_id] = lease

    def leads(self, task_id: str) -> bool:
        lease = self._leases.get(task_id)
        return lease is not None and lease.live_at(self._clock.now())

    def fence(self, task_id: str) -> Lease | None:
        """The lease to pass to the store with a commit of this task (None: not leading)."""
        return self._leases.get(task_id) if self.leads(task_id) else None

    def release_all(self) -> None:
        """Hands every task back at once (a draining replica), so another takes them over
        without waiting for expiry."""
        for lease in self._leases.values():
            try:
                self._store.release_lease(lease)
            except StoreUnavailable as exc:
                log.warning("task %s: lease not released, it expires (%s)", lease.task_id, exc)
        self._leases.clear()
