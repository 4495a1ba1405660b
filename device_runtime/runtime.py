"""The device runtime: enroll, check in, honour retry windows, download, train, upload.

Everything platform-specific comes in through small interfaces (clock, conditions, transport,
random generator), so the same loop runs on an edge box, in `overnight device` and inside each
emulated phone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
from collections.abc import Callable

import grpc
import numpy as np

from device_runtime import constants
from device_runtime.aggregation.client import encode_for_upload
from device_runtime.aggregation.codec_spec import CodecError
from device_runtime.cache import ResourceCache
from device_runtime.clock import Clock
from device_runtime.conditions import DeviceConditions
from device_runtime.examples import LocalExamples
from device_runtime.manifest import ManifestError
from device_runtime.model_runner import TrainableModel
from device_runtime.secagg.errors import SecAggError
from device_runtime.secagg.secure_upload import SecureUpload
from device_runtime.transport import CoordinatorClient, TransportError
from protos import common_pb2, device_pb2

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    INELIGIBLE = "ineligible"  # conditions not met; did not check in
    REJECTED = "rejected"  # checked in, no assignment
    REPORTED = "reported"  # trained and the update was accepted
    INTERRUPTED = "interrupted"  # conditions changed mid-training; reported as a dropout
    LATE = "late"  # trained, but the round had closed (it had its reports): not a fault
    FAILED = "failed"  # assignment failed (download, model, refused upload)
    UNREACHABLE = "unreachable"  # could not talk to the coordinator


@dataclasses.dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    next_delay_s: float
    round_number: int = -1
    detail: str = ""


# An upload's first attempt reached a coordinator that recorded it, and the answer was lost
# with that coordinator; gRPC's retry on the next one (device_runtime/channel.py) then hears
# that the token already has its update. The device sent each token's update once, so this
# is its own: the round has it, and nothing is sent again.
_ANSWER_LOST = "accepted by a coordinator whose answer was lost"


def _landed_earlier(exc: TransportError) -> bool:
    return exc.code is grpc.StatusCode.ALREADY_EXISTS


def _refused(exc: TransportError | SecAggError) -> Outcome:
    """A report the coordinator refused: LATE when the round no longer took reports
    (FAILED_PRECONDITION, as over-selected devices after the round reached its target),
    FAILED otherwise."""
    late = isinstance(exc, TransportError) and exc.code is grpc.StatusCode.FAILED_PRECONDITION
    return Outcome.LATE if late else Outcome.FAILED


def pick_delay(window: common_pb2.RetryWindow, rng: np.random.Generator) -> float:
    low = max(0.0, window.min_delay_s)
    high = max(low, window.max_delay_s)
    return float(rng.uniform(low, high)) if high > low else low


class DeviceRuntime:
    def __init__(
        self,
        client: CoordinatorClient,
        population: str,
        examples: LocalExamples,
        conditions: DeviceConditions,
        clock: Clock,
        rng: np.random.Generator,
        cache: ResourceCache | None = None,
        ineligible_poll_s: float = constants.ineligible_poll_s,
        on_attempt: Callable[[Attempt], None] | None = None,
        model_loader: Callable[[bytes], TrainableModel] = TrainableModel,
        enrollment_secret: bytes = b"",
    ) -> None:
        """The device is `client`'s key; it enrolls with `population` on its first attempt,
        presenting `enrollment_secret`."""
        self._client = client
        self._population = population
        # A device id is logged at DEBUG only (device_runtime/logs.py): in the `device` field.
        self._log = logging.LoggerAdapter(log, {"device": client.device_id})
        self._enrollment_secret = enrollment_secret
        self._enrolled = False
        self._examples = examples
        self._conditions = conditions
        self._clock = clock
        self._rng = rng
        self._cache = cache or ResourceCache()
        self._model: TrainableModel | None = None
        self._model_sha256 = ""
        self._unreachable_backoff_s = constants.unreachable_backoff_min_s
        self._ineligible_poll_s = ineligible_poll_s
        self._on_attempt = on_attempt
        # Injected so the emulator can wrap the real model (slower device tiers).
        self._model_loader = model_loader

    async def run(self, max_reports: int | None = None, stop: asyncio.Event | None = None) -> None:
        """Loops until `max_reports` updates were accepted or `stop` is set."""
        reports = 0
        while (max_reports is None or reports < max_reports) and not (stop and stop.is_set()):
            attempt = await self.attempt()
            if self._on_attempt is not None:
                self._on_attempt(attempt)
            reports += attempt.outcome is Outcome.REPORTED
            if max_reports is not None and reports >= max_reports:
                break
            await self._sleep_unless_stopped(attempt.next_delay_s, stop)

    async def _sleep_unless_stopped(self, seconds: float, stop: asyncio.Event | None) -> None:
        if stop is None:
            await self._clock.sleep(seconds)
            return
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([sleeper, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in (sleeper, stopper):
            task.cancel()

    async def attempt(self) -> Attempt:
        """One check-in and, when assigned, the whole assignment."""
        snapshot = self._conditions.current()
        if not snapshot.eligible:
            return Attempt(Outcome.INELIGIBLE, self._ineligible_poll_s, detail=snapshot.describe())
        try:
            response = await self._signed_check_in()
        except TransportError as exc:
            delay = self._unreachable_backoff_s
            self._unreachable_backoff_s = min(delay * 2, constants.unreachable_backoff_max_s)
            if exc.retry_after_s is not None:  # the coordinator said when it can serve again
                delay = max(delay, exc.retry_after_s)
            self._log.warning("check-in failed: %s", exc)
            return Attempt(Outcome.UNREACHABLE, delay, detail=str(exc))
        self._unreachable_backoff_s = constants.unreachable_backoff_min_s
        delay = pick_delay(response.retry_window, self._rng)
        if response.WhichOneof("outcome") != "assignment":
            return Attempt(Outcome.REJECTED, delay, detail=response.rejection.message)
        return await self._run_assignment(response.assignment, delay)

    async def _signed_check_in(self) -> device_pb2.CheckInResponse:
        """Enrolls first if needed. A check-in refused UNAUTHENTICATED (the coordinator lost
        the enrollment, or the clocks drifted apart) enrolls again and retries once."""
        for retry in (False, True):
            if not self._enrolled:
                await self._client.enroll(self._population, self._enrollment_secret)
                self._enrolled = True
            try:
                return await self._client.check_in(self._population, len(self._examples))
            except TransportError as exc:
                if exc.code is not grpc.StatusCode.UNAUTHENTICATED or retry:
                    raise
                self._log.info("check-in refused (%s); enrolling again", exc)
                self._enrolled = False
        raise AssertionError("unreachable")

    async def _run_assignment(self, assignment: device_pb2.Assignment, delay: float) -> Attempt:
        round_number = assignment.round_number
        token = assignment.upload_token
        secure = None
        if (
            assignment.HasField("secure_aggregation")
            and assignment.kind != device_pb2.Assignment.EVALUATION
        ):
            # Keys are agreed while the device downloads and trains: the session waits for
            # the last selected device's keys.
            secure = SecureUpload(self._client.channel, assignment, self._client.key)
            secure.start()

        async def fail(cause: device_pb2.FailureReport.Cause, detail: str) -> Attempt:
            if secure is not None:
                secure.cancel()
            return await self._fail(token, cause, detail, round_number, delay)

        try:
            model = await self._load_model(assignment.model)
            weights_bytes = await self._fetch(assignment.weights)
        except TransportError as exc:
            return await fail(device_pb2.FailureReport.DOWNLOAD_ERROR, str(exc))
        except ManifestError as exc:
            return await fail(device_pb2.FailureReport.MODEL_REJECTED, str(exc))
        initial = np.frombuffer(weights_bytes, dtype="<f4").astype(np.float32)
        try:
            model.set_weights(initial)
        except ValueError as exc:
            return await fail(device_pb2.FailureReport.MODEL_REJECTED, str(exc))
        if assignment.plan.batch_size and assignment.plan.batch_size != model.batch_size:
            detail = (
                f"plan batch size {assignment.plan.batch_size} "
                f"!= model batch size {model.batch_size}"
            )
            return await fail(device_pb2.FailureReport.MODEL_REJECTED, detail)

        examples = self._examples.sample(assignment.plan.max_examples, self._rng)
        if assignment.kind == device_pb2.Assignment.EVALUATION:
            return await self._evaluate(assignment, model, examples, delay)
        train_rng = np.random.default_rng(self._rng.integers(2**63))
        # The round's seed for the dropout masks; a coordinator that sends none leaves the
        # masks to this device's own generator.
        mask_seed = assignment.plan.dropout_seed or int(self._rng.integers(2**63))
        try:
            result = await asyncio.to_thread(
                functools.partial(
                    model.train,
                    examples.x,
                    examples.y,
                    max(1, assignment.plan.epochs),
                    train_rng,
                    lambda: not self._conditions.current().eligible,
                    shuffle=not assignment.plan.keep_order,
                    proximal_mu=assignment.plan.fedprox_mu,
                    dropout_seed=mask_seed,
                )
            )
        except (ValueError, RuntimeError) as exc:
            return await fail(device_pb2.FailureReport.TRAINING_ERROR, str(exc))
        if result.interrupted:
            now = self._conditions.current().describe()
            detail = f"interrupted after {result.num_batches} batches: {now}"
            attempt = await fail(device_pb2.FailureReport.INTERRUPTED, detail)
            return dataclasses.replace(attempt, outcome=Outcome.INTERRUPTED)

        delta = model.get_weights() - initial
        metrics = common_pb2.ClientMetrics(
            loss=result.loss,
            accuracy=result.accuracy,
            num_examples=result.num_examples,
            num_batches=result.num_batches,
        )
        encode_rng = np.random.default_rng(self._rng.integers(2**63))
        if secure is not None:
            return await self._report_securely(
                secure, assignment, delta, len(examples), metrics, encode_rng, delay
            )
        try:
            update = await asyncio.to_thread(
                encode_for_upload, assignment.aggregation, delta, encode_rng
            )
        except CodecError as exc:
            return await self._fail(
                token, device_pb2.FailureReport.TRAINING_ERROR, str(exc), round_number, delay
            )
        try:
            await self._client.upload(token, update, len(examples), metrics)
        except TransportError as exc:
            if not _landed_earlier(exc):
                self._log.info("upload for round %d refused: %s", round_number, exc)
                return Attempt(_refused(exc), delay, round_number, detail=str(exc))
            return Attempt(Outcome.REPORTED, delay, round_number, detail=_ANSWER_LOST)
        return Attempt(Outcome.REPORTED, delay, round_number)

    async def _report_securely(
        self,
        secure: SecureUpload,
        assignment: device_pb2.Assignment,
        delta: np.ndarray,
        example_count: int,
        metrics: common_pb2.ClientMetrics,
        rng: np.random.Generator,
        delay: float,
    ) -> Attempt:
        """Masked input to SecAggService, metrics to the coordinator, then unmasking."""
        round_number, token = assignment.round_number, assignment.upload_token
        try:
            await secure.send_update(delta, float(example_count), rng)
            await self._report_secure_metrics(token, example_count, delta.size, metrics)
        except (TransportError, SecAggError) as exc:
            secure.cancel()
            cause = device_pb2.FailureReport.SECURE_AGGREGATION_ERROR
            return await self._fail(token, cause, str(exc), round_number, delay, _refused(exc))
        try:
            await secure.finish()
        except (TransportError, SecAggError) as exc:
            # The update is in the sum and counted; the session may still complete without
            # this device's shares (it then had t other survivors among its neighbours).
            self._log.info("unmasking in round %d: %s", round_number, exc)
        return Attempt(Outcome.REPORTED, delay, round_number, detail="secure")

    async def _report_secure_metrics(
        self, token: bytes, example_count: int, num_elements: int, metrics: common_pb2.ClientMetrics
    ) -> None:
        try:
            await self._client.report_secure_update(token, example_count, num_elements, metrics)
        except TransportError as exc:
            if not _landed_earlier(exc):
                raise

    async def _evaluate(
        self,
        assignment: device_pb2.Assignment,
        model: TrainableModel,
        examples: LocalExamples,
        delay: float,
    ) -> Attempt:
        round_number, token = assignment.round_number, assignment.upload_token
        try:
            result = await asyncio.to_thread(model.evaluate, examples.x, examples.y)
        except (ValueError, RuntimeError) as exc:
            cause = device_pb2.FailureReport.TRAINING_ERROR
            return await self._fail(token, cause, str(exc), round_number, delay)
        metrics = common_pb2.ClientMetrics(
            loss=result.loss,
            accuracy=result.accuracy,
            num_examples=result.num_examples,
            num_batches=-(-result.num_examples // model.batch_size),
        )
        try:
            await self._client.report_evaluation(token, len(examples), metrics)
        except TransportError as exc:
            if not _landed_earlier(exc):
                self._log.info("evaluation report refused: %s", exc)
                return Attempt(_refused(exc), delay, round_number, detail=str(exc))
        return Attempt(Outcome.REPORTED, delay, round_number, detail="evaluation")

    async def _fail(
        self,
        token: bytes,
        cause: device_pb2.FailureReport.Cause,
        detail: str,
        round_number: int,
        delay: float,
        outcome: Outcome = Outcome.FAILED,
    ) -> Attempt:
        self._log.info("round %d not reported: %s", round_number, detail)
        try:
            await self._client.report_failure(token, cause, detail)
        except TransportError as exc:
            # The coordinator counts a silent assignment as a dropout at the deadline anyway.
            if exc.code is not grpc.StatusCode.FAILED_PRECONDITION:
                self._log.info("failure report not delivered: %s", exc)
        return Attempt(outcome, delay, round_number, detail=detail)

    async def _fetch(self, ref: common_pb2.ResourceRef) -> bytes:
        data = self._cache.get(ref.sha256)
        if data is None:
            data = await self._client.download(ref)
            self._cache.put(ref.sha256, data)
        return data

    async def _load_model(self, ref: common_pb2.ResourceRef) -> TrainableModel:
        if self._model is None or self._model_sha256 != ref.sha256:
            model_bytes = await self._fetch(ref)
            # Building an interpreter (manifest checks, allocation) is CPU work: off the event
            # loop, which in the emulator serves thousands of phones' check-ins.
            self._model = await asyncio.to_thread(self._model_loader, model_bytes)
            self._model_sha256 = ref.sha256
        return self._model

    def release_model(self) -> None:
        """Drops the loaded interpreter; the next assignment rebuilds it from the cache.

        Between rounds a phone's OS may evict the app; the emulator does the same so that
        10,000 phones do not each hold an interpreter.
        """
        self._model = None
        self._model_sha256 = ""
