"""secure_aggregator() on three `overnight serve --replica` processes on one real PostgreSQL
database, with one emulated fleet whose calls spread round robin over all three (loopback
hosts 127.0.0.1-3, one certificate name). The task's leader hosts its secure rounds; the other
two forward the devices' check-ins, SecAgg messages and reports to it.

- Rounds commit the plaintext weighted FedAvg of the survivors' clipped updates (within the
  secure aggregator's quantization error), as one coordinator's secure round does
  (tests/e2e/test_secure_rounds.py).
- SIGKILL of the host with a secure round open: that round is recorded abandoned, as on a
  single coordinator's restart; another replica takes the lease and hosts later rounds, which
  commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from device_runtime.aggregation.norms import clip_l2
from device_runtime.channel import ServerTrust
from device_runtime.secagg.secure_upload import SecureUpload
from device_runtime.secagg.session_runner import SecAggSessionRunner
from emulator.data import federated_digits
from emulator.fleet import Fleet
from emulator.phone import RandomConditionsSettings
from server.certificates import write_loopback_certificates
from tests.e2e.replica_cluster import (
    Replicas,
    check_invariants,
    lease,
    read,
    snapshot,
    until,
)
from tests.identities import ENROLLMENT_SECRET

pytestmark = pytest.mark.e2e

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
TASK = "secure"
PHONES = 10
CLIP = 0.5
MAX_WEIGHT = 10_000.0


@dataclasses.dataclass
class Contribution:
    delta: np.ndarray
    weight: float
    summed: bool = False  # its masked input was taken by the session


def _cluster(tmp_path: pathlib.Path, model_path: pathlib.Path, url: str) -> tuple[Replicas, Fleet]:
    tls = write_loopback_certificates(tmp_path / "tls")
    replicas = Replicas(url, tmp_path, model_path, tls, {}, HOSTS)
    task = tmp_path / f"{TASK}.toml"
    task.write_text(
        f'[task]\ntask_id = "{TASK}"\npopulation = "digits"\ntotal_rounds = 10000\n'
        "target_reports = 5\nover_selection = 1.2\nmin_reports = 4\nselection_deadline_s = 3.0\n"
        "reporting_deadline_s = 12.0\nepochs = 1\nbatch_size = 8\n"
        f'aggregator = "secure_aggregator(clip={CLIP}, max_weight={MAX_WEIGHT})"\n'
    )
    replicas.tasks = [task]
    # The loopback certificate names localhost and 127.0.0.1: replicas reach each other, as
    # devices reach them, under that one name.
    replicas.extra_args = [
        *("--replica-root-certs", str(tls.root_certs)),
        *("--replica-server-name", "localhost"),
    ]
    trust = ServerTrust(root_certificates=tls.root_certs.read_bytes(), server_name="localhost")
    fleet = Fleet(
        ",".join(replicas.address(i) for i in range(len(HOSTS))),
        trust,
        "digits",
        federated_digits(PHONES, seed=31).clients,
        seed=31,
        conditions=RandomConditionsSettings(p_charging=1.0, p_idle=1.0, p_unmetered=1.0),
        enrollment_secret=ENROLLMENT_SECRET,
    )
    return replicas, fleet


def _committed(url: str) -> list[tuple[int, str, str]]:
    """(round, weights sha256, metrics) of the task's committed rounds, in order."""
    rows = read(
        url,
        "SELECT round_number, weights_sha256, metrics FROM rounds WHERE task_id = %s "
        "AND state = 'committed' ORDER BY round_number",
        TASK,
    )
    return [(int(n), str(w), str(m)) for n, w, m in rows]


def _weights(url: str, sha256: str) -> np.ndarray:
    (row,) = read(url, "SELECT data FROM resources WHERE sha256 = %s", sha256)
    return np.frombuffer(row[0], "<f4")


def _open_round_with_devices(url: str) -> int | None:
    rows = read(
        url,
        "SELECT MAX(a.round_number) FROM assignments a WHERE a.task_id = %s AND NOT EXISTS "
        "(SELECT 1 FROM rounds r WHERE r.task_id = a.task_id AND r.round_number = a.round_number)",
        TASK,
    )
    return None if rows[0][0] is None else int(rows[0][0])


def test_secure_rounds_on_three_replicas_commit_the_survivors_fedavg(
    tmp_path: pathlib.Path,
    model_path: pathlib.Path,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Spies that call through: what each device sent, by (session id, client id).
    sent: dict[tuple[bytes, int], Contribution] = {}
    send_update, send_masked_input = SecureUpload.send_update, SecAggSessionRunner.send_masked_input

    async def spy_update(
        self: SecureUpload, delta: np.ndarray, weight: float, rng: np.random.Generator
    ) -> None:
        sent[(self._enrollment.session_id, self._enrollment.client_id)] = Contribution(
            delta.copy(), weight
        )
        await send_update(self, delta, weight, rng)

    async def spy_masked(self: SecAggSessionRunner, quantized: np.ndarray) -> None:
        await send_masked_input(self, quantized)
        sent[(self._config.session_id, self._config.client_id)].summed = True

    monkeypatch.setattr(SecureUpload, "send_update", spy_update)
    monkeypatch.setattr(SecAggSessionRunner, "send_masked_input", spy_masked)
    url = postgres_url
    replicas, fleet = _cluster(tmp_path, model_path, url)
    answered: dict[str, tuple[int, int, bool]] = {}  # check-ins, calls forwarded, hosting

    async def scenario() -> None:
        await replicas.start_all()
        stop = asyncio.Event()
        devices = asyncio.create_task(fleet.run(stop))
        try:
            await until(lambda: len(_committed(url)) >= 2, "two committed secure rounds")

            def spread() -> bool:
                # Devices spread their calls over the replicas; one that came up last may have
                # had none of the first rounds' check-ins (seen under load), so this waits for
                # the calls to reach every replica, an event, and the assertions below say
                # what was missing if they never do.
                host = lease(url, TASK)[0].split("#")[0]  # a holder is a replica's NAME#RUN
                answered.clear()
                for name, check_ins, forwarded in read(
                    url, "SELECT name, check_ins, forwarded FROM replicas"
                ):
                    answered[name] = (check_ins, forwarded, name == host)
                return len(answered) == len(HOSTS) and all(
                    check_ins > 0 and (forwarded == 0 if hosting else forwarded > 0)
                    for check_ins, forwarded, hosting in answered.values()
                )

            with contextlib.suppress(AssertionError):
                await until(spread, "check-ins at every replica")
        finally:
            stop.set()
            await replicas.stop_all()
            await devices

    asyncio.run(scenario())

    committed = _committed(url)
    sessions = {
        int(n): bytes(s)
        for s, n in read(
            url, "SELECT session_id, round_number FROM secure_sessions WHERE task_id = %s", TASK
        )
    }
    ((initial,),) = read(url, "SELECT initial_weights_sha256 FROM tasks WHERE task_id = %s", TASK)
    base = _weights(url, initial)
    for number, weights_sha256, metrics in committed:
        survivors = [c for (s, _), c in sent.items() if s == sessions[number] and c.summed]
        assert json.loads(metrics)["aggregator/secure_sum/num_summed"] == len(survivors)
        scales = np.array([min(c.weight / MAX_WEIGHT, 1.0) for c in survivors])
        clipped = np.array([np.clip(clip_l2(c.delta, CLIP)[0], -CLIP, CLIP) for c in survivors])
        fedavg = (scales[:, None] * clipped).sum(axis=0) / scales.sum()
        weights = _weights(url, weights_sha256)
        moved = weights.astype(np.float64) - base
        assert np.max(np.abs(moved - fedavg)) < 2e-6, number
        base = weights
    # Every replica answered check-ins; the host forwarded nothing, the others forwarded.
    assert len(answered) == len(HOSTS), answered
    for check_ins, forwarded, hosting in answered.values():
        assert check_ins > 0 and (forwarded == 0 if hosting else forwarded > 0), answered


def test_killing_the_host_abandons_its_secure_round_and_the_next_leader_hosts_later_rounds(
    tmp_path: pathlib.Path, model_path: pathlib.Path, postgres_url: str
) -> None:
    url = postgres_url
    replicas, fleet = _cluster(tmp_path, model_path, url)
    outcome: dict[str, object] = {}

    async def scenario() -> None:
        await replicas.start_all()
        stop = asyncio.Event()
        devices = asyncio.create_task(fleet.run(stop))
        try:
            await until(lambda: _open_round_with_devices(url) is not None, "a secure round open")
            holder, epoch, _ = lease(url, TASK)
            before = snapshot(url)
            await replicas.kill(holder.split("#")[0])  # a holder is a replica's NAME#RUN
            lost = _open_round_with_devices(url)
            await until(
                lambda: lease(url, TASK)[1] > epoch and lease(url, TASK)[0] != holder,
                "a takeover",
            )
            assert lost is not None
            await until(
                lambda: any(n > lost for n, _, _ in _committed(url)),
                "a secure round committed by the next leader",
            )
            after = snapshot(url)
            check_invariants(url, before, after)
            outcome.update(lost=lost, before=before, after=after)
        finally:
            stop.set()
            await replicas.stop_all()
            await devices

    asyncio.run(scenario())

    lost = outcome["lost"]
    states = {n: s for t, n, s, _, _ in outcome["after"]["rounds"] if t == TASK}  # type: ignore[index]
    assert states[lost] == "abandoned"
    committed_before = {r[1] for r in outcome["before"]["rounds"] if r[2] == "committed"}  # type: ignore[index]
    # No round the dead host had open commits afterwards.
    assert all(n > lost or n in committed_before for n, s in states.items() if s == "committed")
