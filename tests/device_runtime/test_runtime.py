"""The device runtime against a real coordinator on loopback, with a fake clock and conditions."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable

import numpy as np

from device_runtime.examples import LocalExamples
from device_runtime.runtime import Attempt, DeviceRuntime, Outcome
from device_runtime.transport import CoordinatorClient
from emulator.data import load_digits
from protos import common_pb2, device_pb2
from server.coordinator import CoordinatorSettings
from server.pace_steering import PaceSteeringSettings
from server.rounds.round import AssignmentState
from tests.fakes import FakeClock, ScriptedConditions
from tests.harness import POPULATION, RunningCoordinator, running_coordinator, task_config
from tests.identities import ENROLLMENT_SECRET

SETTINGS = CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=30.0))
EXAMPLES = 40


def _runtime(
    client: CoordinatorClient,
    clock: FakeClock,
    conditions: ScriptedConditions,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> DeviceRuntime:
    digits = load_digits()
    return DeviceRuntime(
        client=client,
        population=POPULATION,
        enrollment_secret=ENROLLMENT_SECRET,
        examples=LocalExamples(digits.x[:EXAMPLES], digits.y[:EXAMPLES]),
        conditions=conditions,
        clock=clock,
        rng=np.random.default_rng(7),
        on_attempt=on_attempt,
    )


async def _seated(
    running: RunningCoordinator, clock: FakeClock
) -> tuple[CoordinatorClient, device_pb2.Assignment]:
    """Another device, enrolled and checked in: it holds a seat of the open round."""
    other = CoordinatorClient(running.address, running.trust, wall_clock=clock.now)
    await other.enroll(POPULATION, ENROLLMENT_SECRET)
    return other, (await other.check_in(POPULATION, EXAMPLES)).assignment


def test_rejected_device_waits_for_the_next_round_as_told(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0, reporting_deadline_s=1000.0)
    attempts: list[Attempt] = []

    async def scenario() -> None:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, config, clock, SETTINGS
        ) as running:
            holder, _ = await _seated(running, clock)  # takes the only seat
            client = CoordinatorClient(running.address, running.trust, wall_clock=clock.now)
            stop = asyncio.Event()

            def record(attempt: Attempt) -> None:
                attempts.append(attempt)
                if attempt.outcome is not Outcome.REJECTED or len(attempts) == 12:
                    stop.set()

            await _runtime(client, clock, ScriptedConditions(), record).run(stop=stop)
            await holder.close()
            await client.close()

    asyncio.run(scenario())

    # The only seat is taken by a device that never reports, and the round may report for
    # 1000 s. With no round measured yet, pace steering expects the round to end at twice the
    # time it has reported for (never before the 30 s minimum delay), at most at the deadline:
    # the device comes back at about doubling times, each within its window (the expected end
    # plus up to 10 % jitter of the 1 s spread, plus the spread), and round 2 selects it.
    *rejected, reported = attempts
    assert [a.outcome for a in rejected] == [Outcome.REJECTED] * len(rejected)
    assert reported.outcome is Outcome.REPORTED and reported.round_number == 2
    returns = np.cumsum([a.next_delay_s for a in rejected])
    assert 30.0 <= returns[0] <= 32.0
    for earlier, later in zip(returns[:-1], returns[1:-1], strict=False):
        assert 2 * earlier - 1.0 <= later <= 2 * earlier + 1.2  # twice the time reported
    assert 1000.0 <= returns[-1] <= 1001.2  # the deadline, when round 1 ends
    assert returns[-2] < 1000.0
    assert clock.sleeps[: len(rejected)] == [a.next_delay_s for a in rejected]


def test_interruption_reaches_the_coordinator_as_a_dropout(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    # One poll before check-in, then one per batch: the phone is picked up after two batches.
    conditions = ScriptedConditions(stop_after=3)

    async def scenario() -> tuple[Attempt, object]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, task_config(), clock, SETTINGS
        ) as running:
            client = CoordinatorClient(running.address, running.trust, wall_clock=clock.now)
            attempt = await _runtime(client, clock, conditions).attempt()
            await client.close()
            return attempt, running.coordinator.task("t1").current

    attempt, current = asyncio.run(scenario())

    assert attempt.outcome is Outcome.INTERRUPTED
    assert "interrupted after 2 batches" in attempt.detail
    [assignment] = current.assignments.values()  # type: ignore[attr-defined]
    assert assignment.state is AssignmentState.FAILED
    assert assignment.failure == "INTERRUPTED"
    assert current.reported == 0  # type: ignore[attr-defined]


def test_ineligible_device_does_not_check_in(tmp_path: pathlib.Path, model_bytes: bytes) -> None:
    clock = FakeClock()

    async def scenario() -> tuple[Attempt, object]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, task_config(), clock, SETTINGS
        ) as running:
            client = CoordinatorClient(running.address, running.trust, wall_clock=clock.now)
            attempt = await _runtime(client, clock, ScriptedConditions(eligible=False)).attempt()
            await client.close()
            return attempt, running.coordinator.task("t1").current

    attempt, current = asyncio.run(scenario())

    assert attempt.outcome is Outcome.INELIGIBLE
    assert "not idle" in attempt.detail
    assert current is None


def test_model_is_downloaded_once_and_weights_once_per_round(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0, total_rounds=2)

    async def scenario() -> tuple[int, int, list]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, config, clock, SETTINGS
        ) as running:
            client = CoordinatorClient(running.address, running.trust, wall_clock=clock.now)
            await _runtime(client, clock, ScriptedConditions()).run(max_reports=2)
            await client.close()
            await running.settled()
            task = running.coordinator.task("t1")
            return (
                client.counters.downloaded_bytes,
                task.record.num_parameters,
                running.store.rounds("t1"),
            )

    downloaded, num_parameters, rounds = asyncio.run(scenario())

    assert [r.reported for r in rounds] == [1, 1]
    assert downloaded == len(model_bytes) + 2 * 4 * num_parameters


def test_a_device_with_a_skewed_clock_learns_the_coordinators_at_enrollment(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=1.0, reporting_deadline_s=1000.0)
    # The phone's clock is stuck in 1970: only the offset learned at enrollment dates it.
    stuck = lambda: 5000.0  # noqa: E731

    async def scenario() -> tuple[Outcome, Outcome, int]:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, config, clock, SETTINGS
        ) as running:
            client = CoordinatorClient(running.address, running.trust, wall_clock=stuck)
            runtime = _runtime(client, clock, ScriptedConditions())
            first = await runtime.attempt()
            clock.advance(900.0)  # the learned offset is now 900 s stale
            second = await runtime.attempt()
            await client.close()
            return first.outcome, second.outcome, running.store.enrolled_devices(POPULATION)

    first, second, enrolled = asyncio.run(scenario())

    assert first is Outcome.REPORTED  # enrolled, then signed on the coordinator's clock
    assert second is not Outcome.UNREACHABLE  # refused once, enrolled again, then answered
    assert enrolled == 1


def test_an_upload_after_the_round_closed_is_late_not_failed(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> None:
    # Two seats for one report (over-selection): the other device reports first and closes
    # the round while this one trains. Being too late is over-selection working, not a fault.
    clock = FakeClock()
    config = task_config(target_reports=1, over_selection=2.0, reporting_deadline_s=1000.0)

    async def scenario() -> Attempt:
        async with running_coordinator(
            str(tmp_path / "s.sqlite"), model_bytes, config, clock, SETTINGS
        ) as running:
            first, seat = await _seated(running, clock)
            n = running.coordinator.task("t1").record.num_parameters
            client = CoordinatorClient(running.address, running.trust, wall_clock=clock.now)
            upload = client.upload

            async def after_the_first(*args: object) -> object:
                metrics = common_pb2.ClientMetrics(num_examples=EXAMPLES, num_batches=1)
                await first.upload(seat.upload_token, np.zeros(n, np.float32), EXAMPLES, metrics)
                await running.settled()  # the round reached its target and closed
                return await upload(*args)  # type: ignore[arg-type]

            client.upload = after_the_first  # type: ignore[method-assign]
            attempt = await _runtime(client, clock, ScriptedConditions()).attempt()
            for c in (first, client):
                await c.close()
            return attempt

    attempt = asyncio.run(scenario())

    assert attempt.outcome is Outcome.LATE, attempt
    assert "FAILED_PRECONDITION" in attempt.detail
