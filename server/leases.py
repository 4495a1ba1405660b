"""Task leadership by lease, with fencing: the rule every store applies.

Each task has at most one lease row: who leads it (`holder`, a replica's name), until when
(`expires_at`, on the holder's clock), and an `epoch` that grows by one every time leadership
changes hands. A replica leads a task while its lease is live; it renews well before expiry.

Safety does not rest on clocks. The leader passes its lease to every commit as a fence, and
the store refuses the commit (StaleLeader) unless that lease's epoch is still the task's
current one, checked in the commit's own transaction. A leader that was paused or cut off
past its lease (a long GC, SIGSTOP, a partition) and wakes up believing it still leads has
an old epoch once another replica took over, so its commit changes nothing. Clocks matter
only for liveness: how soon after a leader dies another may take over (skew between replicas
shortens or lengthens that by the skew).

The rule, for `acquire(task, holder, now, duration)`:
- no lease yet: granted, epoch 1;
- `holder` holds it and it is live at `now`: renewed to `now + duration`, same epoch;
- it has expired at `now` (whoever held it): granted to `holder`, epoch + 1 — also when the
  same holder comes back after letting it lapse, since a commit of its earlier tenure may
  still be in flight;
- another holder's lease is live: refused, nothing changes.
`release` ends a lease at once (a draining leader), keeping its epoch, so the next holder's
is higher.
"""

from __future__ import annotations

import dataclasses

from server.errors import StaleLeader

# Leases last this long unless renewed (issue 15: another replica takes over a dead leader's
# tasks within this time); a leader renews at a third of it, so one missed renewal is harmless.
default_lease_s = 10.0
released_at = float("-inf")  # `expires_at` of a released lease: expired at any time


@dataclasses.dataclass(frozen=True)
class Lease:
    task_id: str
    holder: str
    epoch: int
    expires_at: float

    def live_at(self, now: float) -> bool:
        return now < self.expires_at


def next_lease(
    current: Lease | None, task_id: str, holder: str, now: float, duration_s: float
) -> Lease | None:
    """The lease after `holder` asks for the task at `now`, or None if it must wait."""
    if duration_s <= 0:
        raise ValueError(f"a lease lasts a positive time, not {duration_s}")
    until = now + duration_s
    if current is None:
        return Lease(task_id, holder, 1, until)
    if current.live_at(now):
        if current.holder != holder:
            return None
        return dataclasses.replace(current, expires_at=max(until, current.expires_at))
    return Lease(task_id, holder, current.epoch + 1, until)


def check_fence(fence: Lease, current: Lease | None) -> None:
    """Raises StaleLeader unless `fence` is still the task's current lease. Expiry alone does
    not stale it: while no one else has taken the task, its leader's commit is still the only
    one there can be."""
    if current is None or current.epoch != fence.epoch or current.holder != fence.holder:
        now_held = f"epoch {current.epoch}, {current.holder}" if current else "no lease"
        raise StaleLeader(
            f"task {fence.task_id!r}: the lease of {fence.holder} (epoch {fence.epoch}) is no "
            f"longer the task's ({now_held}); another replica leads it now"
        )
