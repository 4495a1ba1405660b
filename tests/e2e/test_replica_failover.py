"""One emulated fleet given every replica's address, against three `overnight serve --replica`
processes on one real PostgreSQL database: the replicas listen on three loopback hosts
(127.0.0.1-3) with one certificate name, as replicas on three machines behind one name
would. The fleet's channel spreads calls round robin over the replicas and retries an
UNAVAILABLE call on the next one. A follower is SIGKILLed, comes back, then the task's
leader is SIGKILLed. Rounds go on committing with uploads through the replicas still up,
and after each fault the crash-test invariants hold: no committed round lost, report counts
equal counted uploads, no token counted twice, finite weights; no round of the lost leader's
epoch commits after it lost the lease."""

from __future__ import annotations

import asyncio
import pathlib
import re
import signal
from collections import Counter

import pytest

from device_runtime.channel import ServerTrust
from device_runtime.runtime import Outcome
from emulator.data import federated_digits
from emulator.fleet import Fleet
from emulator.phone import RandomConditionsSettings
from server.certificates import write_loopback_certificates
from tests.e2e.replica_cluster import (
    Replicas,
    check_invariants,
    check_no_stale_commit,
    lease,
    read,
    round_open,
    snapshot,
    until,
)
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
TASK = "plain"
PHONES = 24


def _newest_round(url: str) -> int:
    (row,) = read(
        url, "SELECT COALESCE(MAX(round_number), 0) FROM shared_rounds WHERE task_id = %s", TASK
    )
    return int(row[0])


def _reports_through(url: str, after_round: int) -> dict[str, int]:
    """Uploads each replica accepted in the committed rounds numbered above `after_round`
    (the per-replica counts `overnight status` shows, by round)."""
    rows = read(
        url,
        "SELECT c.replica, SUM(c.reported) FROM replica_round_counts c JOIN rounds r "
        "ON r.task_id = c.task_id AND r.round_number = c.round_number "
        "WHERE r.state = 'committed' AND c.task_id = %s AND c.round_number > %s "
        "GROUP BY c.replica HAVING SUM(c.reported) > 0",
        TASK,
        after_round,
    )
    return {replica: int(reported) for replica, reported in rows}


def _committed_after(url: str, after_round: int) -> int:
    (row,) = read(
        url,
        "SELECT COUNT(*) FROM rounds WHERE task_id = %s AND state = 'committed' "
        "AND round_number > %s",
        TASK,
        after_round,
    )
    return int(row[0])


def _cluster(
    tmp_path: pathlib.Path, model_path: pathlib.Path, url: str, seed: int
) -> tuple[Replicas, set[str], Fleet]:
    """Three replicas of the plain task (not started), and a fleet given all their addresses."""
    tls = write_loopback_certificates(tmp_path / "tls")
    replicas = Replicas(url, tmp_path, model_path, tls, {TASK: "mean()"}, HOSTS)
    # The loopback certificate carries localhost and 127.0.0.1 only: every replica must
    # present it under the one name the fleet checks.
    trust = ServerTrust(root_certificates=tls.root_certs.read_bytes(), server_name="localhost")
    fleet = Fleet(
        ",".join(replicas.address(i) for i in range(len(HOSTS))),
        trust,
        "digits",
        federated_digits(PHONES, seed=seed).clients,
        seed=seed,
        conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
        enrollment_secret=ENROLLMENT_SECRET,
    )
    return replicas, {replicas.name(i) for i in range(len(HOSTS))}, fleet


async def _committing_through(
    url: str, names: set[str], after_round: int, what: str, phases: dict[str, dict[str, int]]
) -> None:
    """Until rounds opened after `after_round` committed, two at least, with uploads through
    each of `names` and through no other replica; records the uploads per replica."""

    def done() -> bool:
        through = _reports_through(url, after_round)
        assert set(through) <= names, f"{what}: uploads through {set(through) - names}"
        return _committed_after(url, after_round) >= 2 and set(through) == names

    await until(done, what)
    phases[what] = _reports_through(url, after_round)


def test_one_fleet_fails_over_between_replicas_when_a_follower_then_the_leader_dies(
    tmp_path: pathlib.Path, model_path: pathlib.Path, postgres_url: str
) -> None:
    url = postgres_url
    replicas, everyone, fleet = _cluster(tmp_path, model_path, url, seed=21)
    phases: dict[str, dict[str, int]] = {}
    outcomes: Counter[str] = Counter()
    shown = ""

    async def committing_through(names: set[str], after_round: int, what: str) -> None:
        await _committing_through(url, names, after_round, what, phases)
        outcomes.clear()
        outcomes.update(fleet.stats.outcomes)

    async def scenario() -> None:
        nonlocal shown
        await replicas.start_all()
        stop = asyncio.Event()
        devices = asyncio.create_task(fleet.run(stop))
        try:
            await committing_through(everyone, 0, "all three up")

            # SIGKILL a follower with a round open: uploads go on through the other two.
            await until(lambda: round_open(url, TASK), "a round with devices")
            leader = lease(url, TASK)[0].split("#")[0]  # a holder is a replica's NAME#RUN
            follower = min(everyone - {leader})
            before = snapshot(url)
            await replicas.kill(follower)
            newest = _newest_round(url)  # rounds after it opened once the follower was gone
            await committing_through(everyone - {follower}, newest, "follower killed")
            after_follower = snapshot(url)
            check_invariants(url, before, after_follower)

            # It comes back at its address; the fleet's channel reconnects to it.
            await replicas.start(int(follower[1:]))
            newest = _newest_round(url)
            await committing_through(everyone, newest, "follower back")
            check_invariants(url, after_follower, snapshot(url))

            # SIGKILL the leader with a round open: another replica takes the task over,
            # and uploads go on through the two left.
            await until(lambda: round_open(url, TASK), "a round with devices")
            holder, epoch, _ = lease(url, TASK)
            leader = holder.split("#")[0]
            before = snapshot(url)
            await replicas.kill(leader)
            newest = _newest_round(url)
            await until(
                lambda: lease(url, TASK)[1] > epoch and lease(url, TASK)[0] != holder,
                "a takeover",
            )
            await committing_through(everyone - {leader}, newest, "leader killed")
            after_leader = snapshot(url)
            check_invariants(url, before, after_leader)
            check_no_stale_commit(before, after_leader, TASK, epoch)
            shown = await replicas.status(int(min(everyone - {leader})[1:]))
        finally:
            stop.set()
            await replicas.stop_all()
            await devices

    asyncio.run(scenario())

    for phase, through in phases.items():
        print(f"{phase}: uploads per replica {dict(sorted(through.items()))}")
    print(f"device outcomes: {dict(outcomes)}")
    print(shown)
    # Every call that met a dead replica went on to a live one: no attempt of any phone
    # found the coordinators unreachable (outcomes counted up to the end of the last fault).
    assert outcomes[Outcome.UNREACHABLE.value] == 0, outcomes
    # The operator sees the spread: each replica served uploads of the task.
    served = {
        name: int(uploads)
        for name, uploads in re.findall(
            rf"(\S+) served task {TASK}: \d+ selected, (\d+) uploads", shown
        )
    }
    assert set(served) == everyone and all(served.values()), shown


def test_the_last_replica_takes_over_when_the_leader_hangs_and_a_follower_dies_at_once(
    tmp_path: pathlib.Path, model_path: pathlib.Path, postgres_url: str
) -> None:
    url = postgres_url
    replicas, everyone, fleet = _cluster(tmp_path, model_path, url, seed=22)
    phases: dict[str, dict[str, int]] = {}

    async def committing_through(names: set[str], after_round: int, what: str) -> None:
        await _committing_through(url, names, after_round, what, phases)

    async def scenario() -> None:
        await replicas.start_all()
        stop = asyncio.Event()
        devices = asyncio.create_task(fleet.run(stop))
        try:
            await committing_through(everyone, 0, "all three up")

            # The leader hangs (SIGSTOP: its connections stay open and answer nothing) and a
            # follower dies, at once, with a round open: the last replica takes the task.
            await until(lambda: round_open(url, TASK), "a round with devices")
            holder, epoch, _ = lease(url, TASK)
            leader = holder.split("#")[0]
            follower = min(everyone - {leader})
            (last,) = everyone - {leader, follower}
            before = snapshot(url)
            replicas.signal(leader, signal.SIGSTOP)
            await replicas.kill(follower)
            newest = _newest_round(url)
            await until(lambda: lease(url, TASK)[0].startswith(f"{last}#"), "a takeover")
            await committing_through({last}, newest, "leader hung, follower killed")
            after_faults = snapshot(url)
            check_invariants(url, before, after_faults)
            check_no_stale_commit(before, after_faults, TASK, epoch)

            # The hung leader wakes up having lost its lease: nothing of its epoch commits,
            # and it serves devices again beside the new leader.
            replicas.signal(leader, signal.SIGCONT)
            newest = _newest_round(url)
            await committing_through({last, leader}, newest, "leader woke")
            woke = snapshot(url)
            check_invariants(url, after_faults, woke)
            check_no_stale_commit(before, woke, TASK, epoch)
            assert lease(url, TASK)[0].startswith(f"{last}#")
        finally:
            stop.set()
            await replicas.stop_all()
            await devices

    asyncio.run(scenario())

    for phase, through in phases.items():
        print(f"{phase}: uploads per replica {dict(sorted(through.items()))}")
    print(f"device outcomes: {dict(fleet.stats.outcomes)}")
    # Calls sent to the hung leader failed over by the devices' pings (20 s at most), inside
    # their 30 s deadline: no attempt found the coordinators unreachable.
    assert fleet.stats.outcomes[Outcome.UNREACHABLE.value] == 0, fleet.stats.outcomes
