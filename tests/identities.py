"""Enrolled test devices for in-process coordinator tests: real keys, real signatures.

Each device name maps to a key derived from the name, enrolled with the coordinator's shared
test secret on first use. Tokens remember the key they were issued to, so an upload or a
failure report is signed the way the device that checked in would sign it.
"""

from __future__ import annotations

import time
import weakref

import grpc
import numpy as np

from device_runtime import constants, identity
from device_runtime.clock import Clock
from protos import device_pb2, device_pb2_grpc
from server.coordinator import Coordinator, CoordinatorSettings
from server.device_identity import DeviceIdentities, IdentitySettings
from server.enrollment.config import EnrollmentPolicy
from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
from server.store import Store

ENROLLMENT_SECRET = b"overnight-test-enrollment-secret"
POPULATION = "digits"

_token_keys: dict[bytes, identity.DeviceKey] = {}
_keys: dict[str, identity.DeviceKey] = {}


def device_key(name: str) -> identity.DeviceKey:
    if name not in _keys:
        _keys[name] = identity.DeviceKey.from_seed(name.encode())
    return _keys[name]


def identities_for(
    store: Store,
    clock: Clock,
    networks: NetworkSettings | None = None,
    settings: IdentitySettings | None = None,
) -> DeviceIdentities:
    """Shared-secret enrollment; loopback exempt from the network limits (tests run every
    device from this host), unless `networks` says otherwise."""
    return DeviceIdentities(
        store,
        clock,
        EnrollmentPolicy.shared_secret(ENROLLMENT_SECRET),
        settings,
        networks or NetworkSettings(exempt=LOOPBACK_NETWORKS),
    )


def make_coordinator(
    store: Store, clock: Clock, settings: CoordinatorSettings | None = None, **kwargs: object
) -> Coordinator:
    return Coordinator(
        store,
        clock,
        settings,
        identities=identities_for(store, clock),
        **kwargs,  # type: ignore[arg-type]
    )


_enrolled: weakref.WeakKeyDictionary[Coordinator, set[tuple[str, str]]] = (
    weakref.WeakKeyDictionary()
)


def enroll_request(
    key: identity.DeviceKey, population: str = POPULATION, secret: bytes = ENROLLMENT_SECRET
) -> device_pb2.EnrollRequest:
    request = device_pb2.EnrollRequest(
        protocol_version=constants.PROTOCOL_VERSION,
        population=population,
        public_key=key.public_key_der,
        enrollment_secret=secret,
    )
    request.signature = key.sign(identity.enroll_signed_bytes(request))
    return request


def enroll(coordinator: Coordinator, name: str, population: str = POPULATION) -> None:
    done = _enrolled.setdefault(coordinator, set())
    if (name, population) not in done:
        coordinator.identities.enroll(enroll_request(device_key(name), population))
        done.add((name, population))


def signed_check_in(
    name: str,
    now_s: float,
    population: str = POPULATION,
    example_count: int = 10,
    runtime_version: str = "",
) -> device_pb2.CheckInRequest:
    request = device_pb2.CheckInRequest(
        protocol_version=constants.PROTOCOL_VERSION,
        population=population,
        example_count=example_count,
        runtime_version=runtime_version,
    )
    identity.sign_check_in(device_key(name), request, now_s)
    return request


def check_in(
    coordinator: Coordinator,
    name: str,
    population: str = POPULATION,
    example_count: int = 10,
    peer: str = "",
    runtime_version: str = "",
) -> device_pb2.CheckInResponse:
    """Enrolls `name` if needed, then checks in signed (timestamped on the coordinator's
    clock); remembers whose token came back."""
    enroll(coordinator, name, population)
    now = coordinator._clock.now()
    request = signed_check_in(name, now, population, example_count, runtime_version)
    return send_check_in(coordinator, request, name, peer)


def send_check_in(
    coordinator: Coordinator, request: device_pb2.CheckInRequest, name: str, peer: str = ""
) -> device_pb2.CheckInResponse:
    """Sends a check-in `signed_check_in` made for `name`; remembers whose token came back."""
    response = coordinator.check_in(request, peer)
    if response.WhichOneof("outcome") == "assignment":
        _token_keys[response.assignment.upload_token] = device_key(name)
    return response


def sign_header(header: device_pb2.UploadHeader) -> device_pb2.UploadHeader:
    """Signs in place with the key the header's token was issued to (if any); returns it."""
    key = _token_keys.get(header.upload_token)
    if key is not None:
        header.device_signature = key.sign(identity.upload_signed_bytes(header))
    return header


def sign_failure(report: device_pb2.FailureReport) -> device_pb2.FailureReport:
    key = _token_keys.get(report.upload_token)
    if key is not None:
        report.device_signature = key.sign(identity.failure_signed_bytes(report))
    return report


def random_key(rng: np.random.Generator) -> identity.DeviceKey:
    return identity.DeviceKey.from_seed(rng.bytes(16))


async def check_in_over(
    channel: grpc.aio.Channel,
    name: str,
    population: str = POPULATION,
    example_count: int = 10,
) -> device_pb2.CheckInResponse:
    """Over gRPC: enrolls `name` (idempotent), then checks in signed, timestamped on the
    coordinator's clock as the enrollment reported it."""
    stub = device_pb2_grpc.DeviceServiceStub(channel)
    key = device_key(name)
    enrolled = await stub.Enroll(enroll_request(key, population))
    offset = enrolled.server_time_s - time.time()
    request = signed_check_in(name, time.time() + offset, population, example_count)
    response = await stub.CheckIn(request)
    if response.WhichOneof("outcome") == "assignment":
        _token_keys[response.assignment.upload_token] = key
    return response
