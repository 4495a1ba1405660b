"""What a device sends back on its assignment: an upload or a failure report. Each finds its
open assignment by the upload token's hash, is checked against the device's signature and
the assignment's state, and is then counted into its round. A refusal changes nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from device_runtime import identity
from protos import device_pb2
from server.aggregation import Buffer, accumulate_received
from server.assignments import token_digest
from server.device_identity import DeviceIdentities
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unauthenticated
from server.example_credit import credited_header
from server.protocol_version import check_protocol_version
from server.rounds.round import AssignmentState, DeviceAssignment, RoundInProgress
from server.store import Store
from server.task_runtime import TaskRuntime

Opened = tuple[TaskRuntime, RoundInProgress, str]  # task, open round, token hash


def open_assignment(
    token: bytes,
    issued: Mapping[str, tuple[str, int]],
    tasks: Mapping[str, TaskRuntime],
    store: Store,
) -> Opened:
    """The task, open round and token hash an upload or failure report is for. `issued`:
    tokens this process handed out, by hash; others are looked up in the store.

    Raises Unauthenticated (unknown token), AlreadyExists (already counted),
    FailedPrecondition (round no longer open, including rounds lost in a restart).
    """
    if not token:
        raise Unauthenticated("missing upload token")
    digest = token_digest(token)
    found = issued.get(digest)
    if found is None:
        stored = store.assignment(digest)
        if stored is None:
            raise Unauthenticated("unknown upload token")
        found = (stored.task_id, stored.round_number)
    task = tasks[found[0]]
    round_ = task.open_rounds.get(found[1])
    if round_ is None or not round_.open:
        if store.is_counted(digest):
            raise AlreadyExists("an update for this upload token was already counted")
        outcome = task.recent_outcomes.get(found[1])
        state = outcome.value if outcome is not None else "closed"
        raise FailedPrecondition(
            f"round {found[1]} of task {found[0]!r} is {state} and takes no reports"
        )
    return task, round_, digest


def check_upload(
    header: device_pb2.UploadHeader,
    opened: Opened,
    identities: DeviceIdentities,
    now: float,
    checked_again: bool = False,
) -> None:
    """Raises unless the assignment `opened` for this header may still report.
    `checked_again`: the header is checked once more when its payload is added."""
    task, round_, _ = opened
    signed = identity.upload_signed_bytes(header)
    assignment = _signed_by_assignee(
        opened, header.device_signature, signed, identities, checked_again
    )
    if assignment.state is AssignmentState.REPORTED:
        raise AlreadyExists("an update for this upload token was already accepted")
    if assignment.state is AssignmentState.FAILED:
        raise FailedPrecondition("this assignment was reported as failed")
    # The ticker closes the round within a tick of its deadline; nothing late gets in.
    if now >= round_.reporting_deadline:
        raise FailedPrecondition(
            f"round {round_.round_number} of task {task.task_id!r} passed its reporting deadline"
        )


def _signed_by_assignee(
    opened: Opened,
    signature: bytes,
    signed: bytes,
    identities: DeviceIdentities,
    checked_again: bool = False,
) -> DeviceAssignment:
    """The assignment, once the device it went to is found to have signed the message."""
    task, round_, digest = opened
    assignment = round_.assignments[digest]
    identities.verify_report(
        signature, signed, assignment.device_id, task.config.population, checked_again
    )
    return assignment


def add_upload(
    opened: Opened,
    header: device_pb2.UploadHeader,
    payload: Buffer | Sequence[Buffer],
    wire_bytes: int,
) -> None:
    """Adds one checked update (the payload, or the chunks it arrived in) to its round."""
    task, round_, digest = opened
    header = credited_header(header, task.config, round_.assignments[digest])
    # The aggregator checks the header against its encoding before it decodes.
    chunks = [payload] if isinstance(payload, bytes | memoryview) else payload
    accumulate_received(round_.aggregate, header, chunks)
    round_.client_metrics.accumulate(header.metrics)
    round_.upload_bytes += wire_bytes
    round_.set_state(digest, AssignmentState.REPORTED)


def check_failure_report(report: device_pb2.FailureReport) -> None:
    """What a failure report must be before its token is looked up."""
    check_protocol_version(report.protocol_version)
    if report.cause not in device_pb2.FailureReport.Cause.values():
        raise InvalidArgument(f"failure cause {report.cause} is not a FailureReport.Cause")


def record_failure(
    report: device_pb2.FailureReport, opened: Opened, identities: DeviceIdentities
) -> None:
    """Marks the assignment `opened` for this report failed, if the device signed it and the
    assignment is still out."""
    _, round_, digest = opened
    signed = identity.failure_signed_bytes(report)
    assignment = _signed_by_assignee(opened, report.device_signature, signed, identities)
    if assignment.state is not AssignmentState.ASSIGNED:
        raise FailedPrecondition(f"assignment already {assignment.state.value}")
    round_.set_state(
        digest, AssignmentState.FAILED, device_pb2.FailureReport.Cause.Name(report.cause)
    )
