"""The Sybil flood of issue 11, rerun: 50 honest phones plus 1,000 identities from one client.

A discrete-event simulation on a virtual clock against the real coordinator (real SQLite
store, real ECDSA keys, signatures and enrollment; uploads of zero deltas through the real
aggregation path). Only time and the devices' behaviour are simulated:
  - each honest phone connects from a network of its own, checks in, trains for 20-40 s
    (virtual), uploads, and comes back at a uniform moment of the retry window it was given;
  - the attacker is one client on one /24 that tries to enroll 1,000 keys (with the
    population's enrollment secret, or without it), then checks each enrolled identity in as
    early as the coordinator lets it and uploads at once when selected; without defences it
    ignores retry windows and checks every identity in every `hammer_s` seconds.
Scenarios: "baseline" (honest phones only, default settings), "undefended" (the coordinator
as it was: no enrollment limit, no network cap, no retry-window enforcement, every identity
counted by pace steering), "defended" (default settings, attacker holds the secret) and
"no-credential" (default settings, attacker lacks the secret).

Run: `.venv/bin/python -m benchmarks.sybil_flood` (prints a table; `--markdown` for
RESULTS.md). tests/server/test_sybil_flood.py runs the defended scenarios shorter.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import pathlib
import tempfile

import numpy as np

from benchmarks.machine import record_section
from device_runtime import constants, identity
from protos import common_pb2, device_pb2
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.device_identity import DeviceIdentities
from server.enrollment.config import EnrollmentPolicy
from server.errors import CoordinatorError
from server.flood_limits import NetworkSettings, RateLimit
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore
from server.store import RoundState

POPULATION = "digits"
SECRET = b"sybil-flood-enrollment-secret-0"
SCENARIOS = ("baseline", "undefended", "defended", "no-credential")


class SimClock:
    def __init__(self) -> None:
        self.time = 1_000_000.0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:  # unused: the simulation moves time
        self.time += seconds


@dataclasses.dataclass
class Device:
    name: str
    key: identity.DeviceKey
    peer: str
    honest: bool
    enrolled: bool = False
    reports: int = 0


@dataclasses.dataclass(frozen=True)
class FloodResult:
    scenario: str
    committed_rounds: int
    honest_reports: int
    attacker_reports: int
    attacker_enrolled: int
    attacker_check_ins: int

    @property
    def attacker_share(self) -> float:
        total = self.honest_reports + self.attacker_reports
        return self.attacker_reports / total if total else 0.0


def task_config(max_network_share: float) -> TaskConfig:
    return TaskConfig(
        task_id="t1",
        population=POPULATION,
        total_rounds=100_000,
        target_reports=10,
        over_selection=1.3,
        min_reports=8,
        selection_deadline_s=60.0,
        reporting_deadline_s=120.0,
        batch_size=8,
        max_network_share=max_network_share,
    ).validate()


class FloodSimulation:
    def __init__(
        self,
        model_bytes: bytes,
        scenario: str,
        data_dir: pathlib.Path,
        honest: int = 50,
        sybils: int = 1000,
        seed: int = 0,
        hammer_s: float = 10.0,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}")
        self.scenario = scenario
        self.clock = SimClock()
        self.rng = np.random.default_rng(seed)
        self.hammer_s = hammer_s
        defended = scenario != "undefended"
        store = SqliteStore(data_dir / f"{scenario}.sqlite")
        networks = (
            NetworkSettings()
            if defended
            else NetworkSettings(
                enroll_per_network=RateLimit(per_s=1e9, burst=1e9),
                counted_devices_per_network=1 << 30,
            )
        )
        identities = DeviceIdentities(
            store, self.clock, EnrollmentPolicy.shared_secret(SECRET), networks=networks
        )
        self.coordinator = Coordinator(
            store,
            self.clock,
            CoordinatorSettings(
                # A fixed capacity (25 check-ins/s for devices) keeps the windows, and so the
                # run, independent of this machine's speed.
                pace=PaceSteeringSettings(capacity_check_ins_per_s=50.0),
                enforce_retry_windows=defended,
            ),
            rng=np.random.default_rng(seed),
            identities=identities,
        )
        self.coordinator.register_task(task_config(0.1 if defended else 1.0), model_bytes)
        self.num_parameters = self.coordinator.task("t1").record.num_parameters
        self.devices = [
            Device(f"h{i}", self._key(f"h{i}"), f"ipv4:10.{i // 250}.{i % 250}.7:4000", True)
            for i in range(honest)
        ]
        attacking = scenario != "baseline"
        self.sybils = [
            Device(f"s{i}", self._key(f"s{i}"), f"ipv4:203.0.113.{i % 250 + 1}:5000", False)
            for i in range(sybils if attacking else 0)
        ]
        self._events: list[tuple[float, int, str, Device, bytes]] = []
        self._order = itertools.count()
        self._reporters: dict[int, list[Device]] = {}
        self._round_of_token: dict[bytes, int] = {}
        self.attacker_check_ins = 0

    def _key(self, name: str) -> identity.DeviceKey:
        return identity.DeviceKey.from_seed(f"{self.scenario}-{name}".encode())

    def _at(self, delay_s: float, action: str, device: Device, token: bytes = b"") -> None:
        when = self.clock.time + max(0.0, delay_s)
        heapq.heappush(self._events, (when, next(self._order), action, device, token))

    # ----- device behaviour ----------------------------------------------------------------

    def _enroll(self, device: Device) -> bool:
        request = device_pb2.EnrollRequest(
            protocol_version=constants.PROTOCOL_VERSION,
            population=POPULATION,
            public_key=device.key.public_key_der,
            enrollment_secret=b""
            if self.scenario == "no-credential" and not device.honest
            else SECRET,
        )
        request.signature = device.key.sign(identity.enroll_signed_bytes(request))
        try:
            self.coordinator.identities.enroll(request, device.peer)
        except CoordinatorError:
            return False
        device.enrolled = True
        return True

    def _secret_of(self, device: Device) -> bytes:
        return b"" if self.scenario == "no-credential" and not device.honest else SECRET

    def _check_in(self, device: Device) -> None:
        request = device_pb2.CheckInRequest(
            protocol_version=constants.PROTOCOL_VERSION,
            population=POPULATION,
            runtime_version=constants.RUNTIME_VERSION,
            example_count=40,
        )
        identity.sign_check_in(device.key, request, self.clock.now())
        if not device.honest:
            self.attacker_check_ins += 1
        try:
            response = self.coordinator.check_in(request, device.peer)
        except CoordinatorError:
            if device.honest:
                self._at(60.0, "check_in", device)
            return
        window = response.retry_window
        if device.honest:
            delay = float(
                self.rng.uniform(window.min_delay_s, max(window.min_delay_s, window.max_delay_s))
            )
        elif self.scenario == "undefended":
            delay = self.hammer_s
        else:
            delay = window.min_delay_s  # the earliest the coordinator lets it back
        if response.WhichOneof("outcome") == "assignment":
            token = response.assignment.upload_token
            self._round_of_token[token] = response.assignment.round_number
            train_s = float(self.rng.uniform(20.0, 40.0)) if device.honest else 0.0
            self._at(train_s, "upload", device, token)
            # The runtime sleeps its delay after the report, as device_runtime does.
            self._at(train_s + delay, "check_in", device)
        else:
            self._at(delay, "check_in", device)

    def _upload(self, device: Device, token: bytes) -> None:
        header = device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            example_count=40,
            num_elements=self.num_parameters,
            encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
            metrics=common_pb2.ClientMetrics(
                loss=1.0, accuracy=0.5, num_examples=40, num_batches=5
            ),
        )
        header.device_signature = device.key.sign(identity.upload_signed_bytes(header))
        payload = np.zeros(self.num_parameters, "<f4").tobytes()
        try:
            self.coordinator.accept_upload(header, payload, len(payload))
        except CoordinatorError:
            self._round_of_token.pop(token, None)
            return  # too late: the round closed
        self._reporters.setdefault(self._round_of_token.pop(token), []).append(device)
        # The round driver, woken by a report that completes its round, ends it at once.
        self.coordinator.tick()

    # ----- the run -------------------------------------------------------------------------

    def run(self, duration_s: float) -> FloodResult:
        for device in self.devices:
            self._enroll(device)
            self._at(float(self.rng.uniform(0.0, 60.0)), "check_in", device)
        for device in self.sybils:
            self._at(0.0, "enroll", device)
        end = self.clock.time + duration_s
        while self._events and self._events[0][0] <= end:
            when, _, action, device, token = heapq.heappop(self._events)
            self.clock.time = when
            self.coordinator.tick()
            if action == "check_in":
                self._check_in(device)
            elif action == "upload":
                self._upload(device, token)
            elif action == "enroll":
                if self._enroll(device):
                    self._at(0.0, "check_in", device)
                else:
                    self._at(600.0, "enroll", device)  # the attacker keeps trying
        committed = {
            r.round_number for r in self.coordinator.rounds("t1") if r.state is RoundState.COMMITTED
        }
        counted = [d for n in committed for d in self._reporters.get(n, [])]
        return FloodResult(
            scenario=self.scenario,
            committed_rounds=len(committed),
            honest_reports=sum(d.honest for d in counted),
            attacker_reports=sum(not d.honest for d in counted),
            attacker_enrolled=sum(d.enrolled for d in self.sybils),
            attacker_check_ins=self.attacker_check_ins,
        )


def simulate(
    model_bytes: bytes, scenario: str, duration_s: float, seed: int = 0, sybils: int = 1000
) -> FloodResult:
    with tempfile.TemporaryDirectory(prefix="sybil-flood-") as tmp:
        simulation = FloodSimulation(
            model_bytes, scenario, pathlib.Path(tmp), sybils=sybils, seed=seed
        )
        return simulation.run(duration_s)


def _export_model(directory: pathlib.Path) -> bytes:
    from tflite_export.exporter import export_model
    from tflite_export.model_zoo import create_digits_mlp

    path = directory / "digits_mlp.tflite"
    export_model(create_digits_mlp(hidden_units=16, seed=1), path, learning_rate=0.1, batch_size=8)
    return path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=2.0, help="virtual hours per scenario")
    parser.add_argument(
        "--undefended-minutes",
        type=float,
        default=20.0,
        help="virtual minutes of the undefended run (1,000 identities hammering is slow)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = _export_model(pathlib.Path(tmp))
    results = {}
    for scenario in SCENARIOS:
        duration = 60 * args.undefended_minutes if scenario == "undefended" else 3600 * args.hours
        results[scenario] = (duration, simulate(model_bytes, scenario, duration, args.seed))
    base_duration, base = results["baseline"]
    base_rate = base.honest_reports / base_duration
    rows = []
    for scenario, (duration, r) in results.items():
        rate = r.honest_reports / duration
        rows.append(
            (
                scenario,
                f"{duration / 60:.0f}",
                str(r.committed_rounds),
                str(r.honest_reports),
                str(r.attacker_reports),
                f"{100 * r.attacker_share:.1f}%",
                f"{rate / base_rate:.2f}x",
                str(r.attacker_enrolled),
                str(r.attacker_check_ins),
            )
        )
    head = (
        "scenario",
        "virtual min",
        "committed rounds",
        "honest reports",
        "attacker reports",
        "attacker share",
        "honest reports/h vs baseline",
        "attacker ids enrolled",
        "attacker check-ins",
    )
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    if args.markdown or args.record:
        print("\n".join(table))
    else:
        for row in [head, *rows]:
            print("  ".join(f"{c:>14}" for c in row))
    if args.record:
        note = (
            "50 honest phones (one network each) and one attacker with 1,000 identities on "
            "one /24; task: 10 reports per round, over-selection 1.3. Defaults: enrollment "
            "20 per network at once then 10/h, max_network_share 0.1 (1 of 13 slots), retry "
            "windows enforced, pace steering counts at most 8 devices per network. Virtual "
            f"time, seed {args.seed}; reports counted in committed rounds. Run: "
            "`.venv/bin/python -m benchmarks.sybil_flood --record`."
        )
        record_section(
            "Sybil flood, with and without defences (issue 11)",
            "\n".join(table) + "\n\n" + note,
        )


if __name__ == "__main__":
    main()
