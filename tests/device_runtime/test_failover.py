"""A device given several coordinators, over real gRPC and TLS on loopback: calls spread round
robin, a coordinator that goes away is failed over, and a round it reported to keeps its
report exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import sys
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest

from device_runtime import constants
from device_runtime.channel import target_and_options
from device_runtime.examples import LocalExamples
from device_runtime.runtime import Attempt, DeviceRuntime, Outcome
from device_runtime.transport import CoordinatorClient, TransportError
from emulator.data import load_digits
from server import limits
from server.config import TaskConfig
from server.coordinator import CoordinatorSettings
from server.grpc_service import CoordinatorServer
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore
from server.store import RoundRecord, RoundState
from tests.device_listener import (
    CallLog,
    DeviceListener,
    FirstDownloadBrokenOff,
    FirstUploadAnswerLost,
    device_listener,
)
from tests.dns_responder import dns_responder
from tests.fakes import FakeClock, ScriptedConditions
from tests.frozen_link import frozen_link
from tests.harness import (
    POPULATION,
    RunningCoordinator,
    loopback_tls,
    loopback_trust,
    running_coordinator,
    task_config,
)
from tests.identities import ENROLLMENT_SECRET, make_coordinator

SETTINGS = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=30.0))
EXAMPLES = 40
DEVICE_CALLS = {"Enroll", "CheckIn", "Download", "UploadUpdate"}
REPO = pathlib.Path(__file__).resolve().parents[2]
HANG_GUARD_S = 300.0  # waits are on the process's output; this only stops a hang


def _runtime(
    client: CoordinatorClient,
    clock: FakeClock,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> DeviceRuntime:
    digits = load_digits()
    return DeviceRuntime(
        client=client,
        population=POPULATION,
        enrollment_secret=ENROLLMENT_SECRET,
        examples=LocalExamples(digits.x[:EXAMPLES], digits.y[:EXAMPLES]),
        conditions=ScriptedConditions(),
        clock=clock,
        rng=np.random.default_rng(11),
        on_attempt=on_attempt,
    )


@contextlib.asynccontextmanager
async def _two_listeners(
    tmp_path: pathlib.Path,
    model_bytes: bytes,
    config: TaskConfig,
    clock: FakeClock,
    first: grpc.aio.ServerInterceptor,
    second: grpc.aio.ServerInterceptor,
) -> AsyncIterator[tuple[RunningCoordinator, DeviceListener, CoordinatorClient]]:
    """One coordinator with two device listeners (a stand-in for two replicas), `first` on
    its own listener and `second` on the other, and a client given both addresses."""
    async with (
        running_coordinator(
            str(tmp_path / "s.sqlite"),
            model_bytes,
            config,
            clock,
            SETTINGS,
            interceptors=[first],
        ) as running,
        device_listener(running.coordinator, [second]) as other,
    ):
        client = CoordinatorClient(
            f"{running.address},{other.address}", running.trust, wall_clock=clock.now
        )
        yield running, other, client


def test_a_device_reports_through_the_other_coordinator_when_one_stops(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=2)
    first, second = CallLog(), CallLog()
    attempts: list[Attempt] = []

    async def scenario() -> tuple[list[str], list[str], list[RoundRecord]]:
        async with _two_listeners(tmp_path, model_bytes, config, clock, first, second) as (
            running,
            other,
            client,
        ):
            runtime = _runtime(client, clock, attempts.append)
            await runtime.run(max_reports=1)
            await running.settled()
            first_before, second_before = list(first.methods), list(second.methods)
            await other.stop()
            clock.advance(attempts[-1].next_delay_s)
            await runtime.run(max_reports=1)
            await client.close()
            await running.settled()
            return first_before, second_before, running.store.rounds("t1")

    first_before, second_before, rounds = asyncio.run(scenario())

    # Round robin: both coordinators served the device while both were up.
    assert set(first_before) & DEVICE_CALLS and set(second_before) & DEVICE_CALLS
    # Once one stopped, the other took the whole of round 2 and no attempt failed.
    assert {"CheckIn", "Download", "UploadUpdate"} <= set(first.methods[len(first_before) :])
    assert Outcome.UNREACHABLE not in [a.outcome for a in attempts]
    assert [a.round_number for a in attempts if a.outcome is Outcome.REPORTED] == [1, 2]
    assert [(r.state, r.reported) for r in rounds] == [
        (RoundState.COMMITTED, 1),
        (RoundState.COMMITTED, 1),
    ]


def test_a_call_to_a_hung_coordinator_goes_to_the_next_one_before_its_deadline(
    tmp_path: pathlib.Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0)
    first, second = CallLog(), CallLog()
    # The device's pings, shortened so the test is quick (the defaults are checked below).
    monkeypatch.setattr(constants, "keepalive_time_s", 0.5)
    monkeypatch.setattr(constants, "keepalive_timeout_s", 1.0)

    async def scenario() -> tuple[int, list[str]]:
        async with (
            running_coordinator(
                str(tmp_path / "s.sqlite"),
                model_bytes,
                config,
                clock,
                SETTINGS,
                interceptors=[first],
            ) as running,
            device_listener(running.coordinator, [second]) as other,
            frozen_link(running.address) as link,
        ):
            client = CoordinatorClient(
                f"{link.address},{other.address}", running.trust, wall_clock=clock.now
            )
            await client.enroll(POPULATION, ENROLLMENT_SECRET)
            while not (first.methods and second.methods):  # both links are up and in use
                await client.check_in(POPULATION, EXAMPLES)
            link.freeze()  # the first coordinator hangs: no answer, no reset
            before = len(second.methods)
            for _ in range(4):  # round robin sends some of these down the frozen link
                await client.check_in(POPULATION, EXAMPLES)  # TransportError fails the test
            await client.close()
            return link.held_bytes, second.methods[before:]

    held_bytes, after_freeze = asyncio.run(scenario())

    # A call went down the frozen link (it holds what was sent), yet every call after the
    # freeze was answered, all by the coordinator still up: the device found the hung one
    # dead by its unanswered pings and retried there, instead of waiting out its 30 s deadline.
    assert held_bytes > 0
    assert after_freeze == ["CheckIn"] * 4


def test_devices_ping_often_enough_to_beat_their_deadline_and_coordinators_allow_it() -> None:
    _, options = target_and_options("127.0.0.1:1", loopback_trust())
    given = dict(options)

    time_s = given["grpc.keepalive_time_ms"] / 1000
    timeout_s = given["grpc.keepalive_timeout_ms"] / 1000
    assert time_s + timeout_s < constants.rpc_timeout_s
    assert given["grpc.http2.ping_timeout_ms"] / 1000 == timeout_s
    assert limits.min_client_ping_interval_ms / 1000 <= time_s


def test_a_dns_name_with_several_addresses_spreads_the_device_over_them(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=1)
    first, second = CallLog(), CallLog()

    async def scenario() -> Attempt:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, config, clock, SETTINGS, interceptors=[first]
        ) as running:
            port = running.server.port
            # One name, two addresses (127.0.0.2 is loopback too), one port: gRPC's DNS
            # resolver asks our DNS server and gets both.
            async with (
                device_listener(running.coordinator, [second], f"127.0.0.2:{port}"),
                dns_responder("coordinators.test", ["127.0.0.1", "127.0.0.2"]) as dns,
            ):
                # The loopback certificate does not carry the DNS name: name one it carries.
                trust = dataclasses.replace(running.trust, server_name="localhost")
                client = CoordinatorClient(
                    f"dns://{dns}/coordinators.test:{port}", trust, wall_clock=clock.now
                )
                attempt = await _runtime(client, clock).attempt()
                await client.close()
                return attempt

    attempt = asyncio.run(scenario())

    assert attempt.outcome is Outcome.REPORTED
    assert set(first.methods) & DEVICE_CALLS and set(second.methods) & DEVICE_CALLS


def test_a_list_of_ipv6_coordinators_spreads_the_device_over_them(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=1)
    first, second = CallLog(), CallLog()

    async def scenario() -> Attempt:
        async with (
            running_coordinator(
                str(tmp_path / "s.sqlite"), model_bytes, config, clock, SETTINGS
            ) as running,
            device_listener(running.coordinator, [first], "[::1]:0") as one,
            device_listener(running.coordinator, [second], "[::1]:0") as other,
        ):
            client = CoordinatorClient(
                f"{one.address},{other.address}", running.trust, wall_clock=clock.now
            )
            attempt = await _runtime(client, clock).attempt()
            await client.close()
            return attempt

    attempt = asyncio.run(scenario())

    assert attempt.outcome is Outcome.REPORTED
    assert set(first.methods) & DEVICE_CALLS and set(second.methods) & DEVICE_CALLS


def test_every_coordinator_of_a_list_must_carry_the_certificate_name(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    async def scenario() -> tuple[TransportError, str]:
        async with (
            running_coordinator(str(tmp_path / "s.sqlite"), model_bytes) as running,
            device_listener(running.coordinator) as other,
        ):
            target = f"{running.address},{other.address}"
            # The loopback certificate is for localhost, 127.0.0.1 and ::1 only.
            wrong = CoordinatorClient(
                target, dataclasses.replace(running.trust, server_name="coordinators.example")
            )
            with pytest.raises(TransportError) as refused:
                await wrong.enroll(POPULATION, ENROLLMENT_SECRET)
            right = CoordinatorClient(
                target, dataclasses.replace(running.trust, server_name="localhost")
            )
            enrolled = await right.enroll(POPULATION, ENROLLMENT_SECRET)
            await wrong.close()
            await right.close()
            return refused.value, enrolled.device_id

    refused, enrolled = asyncio.run(scenario())

    assert refused.code is grpc.StatusCode.UNAVAILABLE  # no coordinator passed the TLS check
    assert enrolled  # the name the certificate carries passes it


def test_an_upload_whose_answer_was_lost_is_counted_once_and_not_sent_again(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=1)
    lost = FirstUploadAnswerLost()

    async def scenario() -> tuple[Attempt, list[RoundRecord]]:
        async with _two_listeners(tmp_path, model_bytes, config, clock, lost, lost) as (
            running,
            other,
            client,
        ):
            attempt = await _runtime(client, clock).attempt()
            await client.close()
            await running.settled()
            return attempt, running.store.rounds("t1")

    attempt, rounds = asyncio.run(scenario())

    # The first call was recorded and went unanswered; gRPC replayed it once on a
    # coordinator, which found the token's update already in the round.
    assert lost.uploads == 2
    assert attempt.outcome is Outcome.REPORTED and attempt.round_number == 1
    assert "answer was lost" in attempt.detail
    [record] = rounds
    assert (record.state, record.reported) == (RoundState.COMMITTED, 1)


def test_a_download_broken_off_mid_stream_starts_again_on_the_next_coordinator(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=1)
    broken = FirstDownloadBrokenOff()

    async def scenario() -> tuple[Attempt, int]:
        async with _two_listeners(tmp_path, model_bytes, config, clock, broken, broken) as (
            running,
            other,
            client,
        ):
            attempt = await _runtime(client, clock).attempt()
            await client.close()
            return attempt, client.counters.downloaded_bytes

    attempt, downloaded = asyncio.run(scenario())

    # The model broke off after its first chunk and came again whole; then the weights.
    assert attempt.outcome is Outcome.REPORTED and attempt.round_number == 1
    assert broken.downloads == 3
    assert downloaded > len(model_bytes)


def test_a_device_keeps_going_when_its_coordinator_restarts_mid_round(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    # Two reports complete a round: the device's report leaves round 1 open.
    config = task_config(target_reports=2, over_selection=1.0, reporting_deadline_s=1000.0)
    path = str(tmp_path / "s.sqlite")
    restarted_log = CallLog()
    attempts: list[Attempt] = []

    async def serve(address: str, interceptors: list[CallLog]) -> CoordinatorServer:
        coordinator = make_coordinator(SqliteStore(path), clock, SETTINGS)
        if not coordinator.task_ids():
            coordinator.register_task(config, model_bytes)
        server = CoordinatorServer(
            coordinator, address, interceptors=interceptors, tls=loopback_tls()
        )
        await server.start()
        return server

    async def scenario() -> tuple[Attempt, list[RoundRecord]]:
        server = await serve("127.0.0.1:0", [])
        client = CoordinatorClient(server.address, loopback_trust(), wall_clock=clock.now)
        runtime = _runtime(client, clock, attempts.append)
        await runtime.run(max_reports=1)
        before_restart = attempts[-1]
        attempts.clear()
        await server.stop(0)  # the process dies with round 1 open, the device's report in it
        server.coordinator.store.close()
        server = await serve(server.address, [restarted_log])
        # The channel reconnects by itself; waiting for it keeps gRPC's reconnection backoff
        # (real time) out of the device's attempts (virtual time).
        await client.channel.channel_ready()
        await runtime.run(max_reports=1)
        await client.close()
        await server.stop(0)
        rounds = server.coordinator.rounds("t1")
        server.coordinator.store.close()
        return before_restart, rounds

    before_restart, rounds = asyncio.run(scenario())

    assert (before_restart.outcome, before_restart.round_number) == (Outcome.REPORTED, 1)
    # The restart abandoned round 1 with the device's report in it (a single coordinator
    # keeps no open round across a restart). The device reached the restarted coordinator
    # through the same channel, did not send its round 1 update again, and reported once in
    # round 2.
    assert Outcome.UNREACHABLE not in [a.outcome for a in attempts]
    assert [(a.outcome, a.round_number) for a in attempts][-1] == (Outcome.REPORTED, 2)
    assert restarted_log.methods.count("UploadUpdate") == 1
    assert rounds[0].state is RoundState.ABANDONED


def test_the_device_command_goes_on_through_the_other_coordinator_when_one_stops(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    digits = load_digits()
    examples_path = tmp_path / "examples.npz"
    LocalExamples(digits.x[:EXAMPLES], digits.y[:EXAMPLES]).save(examples_path)
    secret_path = tmp_path / "enrollment.secret"
    secret_path.write_bytes(ENROLLMENT_SECRET + b"\n")
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=2)
    # Short retry windows: the process sleeps on the real clock between rounds.
    settings = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=0.2, horizon_s=1.0))
    first, second = CallLog(), CallLog()

    async def scenario() -> tuple[int, list[str], list[str], list[RoundRecord]]:
        async with (
            running_coordinator(
                str(tmp_path / "s.sqlite"),
                model_bytes,
                config,
                settings=settings,
                interceptors=[first],
            ) as running,
            device_listener(running.coordinator, [second]) as other,
        ):
            assert running.trust.root_certificates is not None
            (tmp_path / "ca.pem").write_bytes(running.trust.root_certificates)
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "overnight", "device"),
                *("--server", f"{running.address},{other.address}"),
                *("--root-certs", str(tmp_path / "ca.pem")),
                *("--population", POPULATION, "--examples", str(examples_path)),
                *("--cache-dir", str(tmp_path / "cache")),
                *("--enrollment-secret-file", str(secret_path)),
                *("--max-reports", "2", "--seed", "0"),
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert process.stdout is not None
            lines: list[str] = []
            while not lines or not lines[-1].startswith("reported round 1"):
                line = await asyncio.wait_for(process.stdout.readline(), HANG_GUARD_S)
                assert line, "".join(lines)
                lines.append(line.decode())
            before_stop = list(second.methods)
            await other.stop()
            rest, _ = await asyncio.wait_for(process.communicate(), HANG_GUARD_S)
            lines.append(rest.decode())
            await running.settled()
            return process.returncode or 0, before_stop, lines, running.store.rounds("t1")

    code, before_stop, lines, rounds = asyncio.run(scenario())

    output = "".join(lines)
    assert code == 0, output
    assert set(first.methods) & DEVICE_CALLS and set(before_stop) & DEVICE_CALLS
    assert "reported round 2" in output and "unreachable" not in output
    assert [(r.state, r.reported) for r in rounds] == [
        (RoundState.COMMITTED, 1),
        (RoundState.COMMITTED, 1),
    ]
