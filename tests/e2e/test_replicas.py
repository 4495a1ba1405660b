"""Three `overnight serve --replica` processes on one real PostgreSQL database, with emulated
phones on each, running a plain-mean, a robust and a secure task (the secure task's rounds
are hosted by its leader; the phones of the other replicas reach it by forwarding). The
leader of the plain task is killed with SIGKILL, then its successor is stopped with SIGSTOP
for longer than its lease and resumed, then a replica that leads neither the plain nor the
robust task is killed (the secure task's host, if another replica leads those). After each
fault: no committed round is lost, every committed round counted exactly its uploads and no
token twice, weights are finite, and every task keeps committing; after a leader's fault
another replica leads the task, and no round of the lost epoch commits after the lease was
lost."""

from __future__ import annotations

import asyncio
import pathlib
import signal
from collections.abc import Awaitable

import pytest

from device_runtime.channel import ServerTrust
from emulator.data import federated_digits
from emulator.fleet import Fleet
from emulator.phone import RandomConditionsSettings
from server.certificates import write_loopback_certificates
from server.leases import default_lease_s
from tests.e2e.replica_cluster import (
    Replicas,
    check_invariants,
    check_no_stale_commit,
    committed,
    lease,
    read,
    round_open,
    snapshot,
    until,
)
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

REPLICAS = 3
TASKS = {
    "plain": "mean()",
    "robust": "robust_aggregator()",
    "secure": "secure_aggregator()",
}
PLAIN_TASKS = ("plain", "robust")


def test_replicas_survive_a_killed_and_a_stopped_leader(
    tmp_path: pathlib.Path, model_path: pathlib.Path, postgres_url: str
) -> None:
    url = postgres_url
    tls = write_loopback_certificates(tmp_path / "tls")
    replicas = Replicas(url, tmp_path, model_path, tls, TASKS, ["127.0.0.1"] * REPLICAS)
    replicas.extra_args = ["--replica-root-certs", str(tls.root_certs)]  # to forward
    secure = replicas.tasks[list(TASKS).index("secure")]
    # The four SecAgg stages share the reporting deadline: more time than a plain round's.
    secure.write_text(
        secure.read_text().replace("reporting_deadline_s = 5.0", "reporting_deadline_s = 12.0")
    )
    trust = ServerTrust(root_certificates=tls.root_certs.read_bytes())
    fleets = [
        Fleet(
            f"127.0.0.1:{port}",
            trust,
            "digits",
            federated_digits(8, seed=10 + i).clients,
            seed=10 + i,
            conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
            enrollment_secret=ENROLLMENT_SECRET,
        )
        for i, port in enumerate(replicas.ports)
    ]
    takeovers: list[float] = []

    async def every_task_commits(than: dict) -> None:
        def progressed() -> bool:
            now = snapshot(url)
            return all(committed(now, t) > committed(than, t) for t in TASKS)

        await until(progressed, "a commit of every task")

    async def takeover(lost: str, lost_epoch: int, fault: Awaitable[None]) -> dict:
        before = snapshot(url)
        await fault
        await until(
            lambda: lease(url, "plain")[1] > lost_epoch and lease(url, "plain")[0] != lost,
            "a takeover",
        )
        holder, epoch, expires = lease(url, "plain")
        taken_at = expires - default_lease_s
        takeovers.append(taken_at - lost_expires[0])
        after = snapshot(url)
        check_invariants(url, before, after)
        return after

    lost_expires = [0.0]
    served: list[tuple] = []  # the replicas' heartbeat rows while they ran

    async def scenario() -> None:
        await replicas.start_all()
        stop = asyncio.Event()
        devices = [asyncio.create_task(fleet.run(stop)) for fleet in fleets]
        try:
            await every_task_commits(snapshot(url))

            # SIGKILL the plain task's leader, with a round of it open.
            await until(lambda: round_open(url, "plain"), "a plain round with devices")
            leader, epoch, expires = lease(url, "plain")
            name = leader.split("#")[0]  # a lease holder is a replica's name and run
            lost_expires[0] = expires
            killed = takeover(leader, epoch, replicas.kill(name))
            after_kill = await killed
            check_no_stale_commit(after_kill, snapshot(url), "plain", epoch)
            await replicas.start(int(name[1:]))  # its phones come back to it
            await every_task_commits(after_kill)

            # SIGSTOP the new leader past its lease, then let it run again.
            await until(lambda: round_open(url, "plain"), "a plain round with devices")
            leader, epoch, expires = lease(url, "plain")
            name = leader.split("#")[0]
            lost_expires[0] = expires
            replicas.signal(name, signal.SIGSTOP)
            at_takeover = await takeover(leader, epoch, asyncio.sleep(0))
            replicas.signal(name, signal.SIGCONT)
            (seen,) = read(url, "SELECT seen_at FROM replicas WHERE name = %s", name)[0]
            await until(
                lambda: (
                    read(url, "SELECT seen_at FROM replicas WHERE name = %s", name)[0][0] > seen
                ),
                "the stopped replica running again",
            )
            await every_task_commits(at_takeover)
            after_stop = snapshot(url)
            check_invariants(url, at_takeover, after_stop)
            check_no_stale_commit(at_takeover, after_stop, "plain", epoch)

            # SIGKILL a follower: its uploads not handed over count as dropouts.
            await until(lambda: round_open(url, "plain"), "a plain round with devices")
            leaders = {lease(url, t)[0].split("#")[0] for t in PLAIN_TASKS}
            follower = next(n for n in replicas.processes if n not in leaders)
            await replicas.kill(follower)
            await every_task_commits(snapshot(url))
            await replicas.start(int(follower[1:]))
            final = snapshot(url)
            check_invariants(url, after_stop, final)
            served.extend(read(url, "SELECT name, check_ins, uploads FROM replicas ORDER BY name"))
        finally:
            stop.set()
            await replicas.stop_all()
            await asyncio.gather(*devices)

    asyncio.run(scenario())

    print(f"takeover after the lost lease expired: {', '.join(f'{t:.2f} s' for t in takeovers)}")
    final = snapshot(url)
    assert any(r[0] == "plain" and r[2] == "abandoned" for r in final["rounds"]), (
        "no fault caught a round open"
    )
    assert [name for name, _, _ in served] == [replicas.name(i) for i in range(REPLICAS)]
    assert sum(uploads for _, _, uploads in served) > 0, served
    # Drained with SIGTERM, every replica left: no leader waits for its partials.
    assert read(url, "SELECT name FROM replicas") == []
