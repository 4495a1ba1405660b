"""Limits against floods and Sybils: retry windows, per-network slot caps, enrollment rates."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from device_runtime import constants
from protos import common_pb2, device_pb2
from server.coordinator import Coordinator, CoordinatorSettings
from server.device_identity import DeviceIdentities, ReplayGuard
from server.enrollment.config import EnrollmentPolicy
from server.errors import ResourceExhausted
from server.flood_limits import (
    LOOPBACK_NETWORKS,
    NetworkSettings,
    RateLimit,
    RateLimiter,
    RetryWindowMemory,
    SourceNetworks,
    network_slot_cap,
)
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore
from tests.fakes import FakeClock
from tests.harness import POPULATION, task_config
from tests.identities import (
    ENROLLMENT_SECRET,
    check_in,
    device_key,
    enroll_request,
    identities_for,
    sign_header,
)


def _coordinator(
    tmp_path: pathlib.Path,
    clock: FakeClock,
    model_bytes: bytes,
    networks: NetworkSettings | None = None,
    **config: object,
) -> Coordinator:
    store = SqliteStore(tmp_path / "s.sqlite")
    coordinator = Coordinator(
        store,
        clock,
        CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=30.0)),
        identities=identities_for(store, clock, networks or NetworkSettings()),
    )
    coordinator.register_task(task_config(**config), model_bytes)
    return coordinator


def _upload_zeros(coordinator: Coordinator, token: bytes) -> None:
    n = coordinator.task("t1").record.num_parameters
    header = sign_header(
        device_pb2.UploadHeader(
            protocol_version=constants.PROTOCOL_VERSION,
            upload_token=token,
            example_count=10,
            num_elements=n,
            encoding=constants.UPDATE_ENCODING_FLOAT32_DELTA,
            metrics=common_pb2.ClientMetrics(num_examples=10, num_batches=1),
        )
    )
    payload = np.zeros(n, "<f4").tobytes()
    coordinator.accept_upload(header, payload, len(payload))
    coordinator.tick()  # the round driver ends the round if this report completed it


# ----- retry windows -----------------------------------------------------------------------


def test_a_device_back_before_its_window_opens_is_not_selected(tmp_path, model_bytes) -> None:
    clock = FakeClock()
    coordinator = _coordinator(tmp_path, clock, model_bytes, target_reports=1, over_selection=1.0)
    token = check_in(coordinator, "a").assignment.upload_token
    told = check_in(coordinator, "b")  # round full: told when to come back
    _upload_zeros(coordinator, token)  # round 1 commits; the next check-in opens round 2
    clock.advance(1.0)

    early = check_in(coordinator, "b")
    clock.advance(told.retry_window.min_delay_s)
    on_time = check_in(coordinator, "b")

    assert told.rejection.reason == device_pb2.Rejection.ROUND_FULL
    assert early.rejection.reason == device_pb2.Rejection.TOO_EARLY
    assert early.retry_window.min_delay_s == pytest.approx(told.retry_window.min_delay_s - 2.0)
    assert on_time.assignment.round_number == 2


def test_retry_window_memory_forgets_opened_windows_and_stays_bounded() -> None:
    memory = RetryWindowMemory(max_devices=3, tolerance_s=0.0)
    for index in range(5):
        memory.remember(f"d{index}", now=0.0, min_delay_s=10.0 + index)

    assert len(memory) == 3
    assert memory.too_early("d0", 0.0) == 0.0  # the soonest-opening were forgotten first
    assert memory.too_early("d4", 0.0) == pytest.approx(14.0)
    assert memory.too_early("d4", 14.0) == 0.0
    memory.remember("x", now=20.0, min_delay_s=1.0)
    assert len(memory) == 1  # the others' windows opened


# ----- networks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "network"),
    [
        ("ipv4:10.1.2.3:5555", "10.1.2.0/24"),
        ("ipv6:[2001:db8:aa:bb::1]:443", "2001:db8:aa::/48"),
        ("ipv6:[::ffff:10.0.0.1]:1", "10.0.0.0/24"),
        ("unix:/tmp/socket", None),
        ("", None),
        ("ipv4:127.0.0.1:40000", None),  # exempt below
    ],
)
def test_source_network_of_a_peer(peer: str, network: str | None) -> None:
    networks = SourceNetworks(NetworkSettings(exempt=LOOPBACK_NETWORKS))

    assert networks.of(peer) == network


def test_loopback_is_a_network_like_any_other_unless_exempt() -> None:
    assert SourceNetworks(NetworkSettings()).of("ipv4:127.0.0.1:1") == "127.0.0.0/24"


@pytest.mark.parametrize(
    ("share", "quota", "cap"), [(0.1, 13, 1), (0.1, 100, 10), (0.25, 13, 3), (1.0, 13, 13)]
)
def test_network_slot_cap(share: float, quota: int, cap: int) -> None:
    assert network_slot_cap(share, quota) == cap


def test_one_network_takes_at_most_its_share_of_a_round(tmp_path, model_bytes) -> None:
    clock = FakeClock()
    coordinator = _coordinator(
        tmp_path, clock, model_bytes, target_reports=10, over_selection=1.0, max_network_share=0.2
    )

    same = [check_in(coordinator, f"s{i}", peer=f"ipv4:10.0.0.{i + 1}:999") for i in range(5)]
    other = check_in(coordinator, "o", peer="ipv4:10.0.1.1:999")

    outcomes = [r.WhichOneof("outcome") for r in same]
    assert outcomes == ["assignment", "assignment", "rejection", "rejection", "rejection"]
    assert same[2].rejection.reason == device_pb2.Rejection.ROUND_FULL
    assert other.HasField("assignment")
    assert coordinator.task("t1").current.network_slots == {"10.0.0.0/24": 2, "10.0.1.0/24": 1}


def test_an_exempt_network_is_not_capped(tmp_path, model_bytes) -> None:
    clock = FakeClock()
    coordinator = _coordinator(
        tmp_path,
        clock,
        model_bytes,
        NetworkSettings(exempt=LOOPBACK_NETWORKS),
        target_reports=10,
        over_selection=1.0,
        max_network_share=0.1,
    )

    answers = [check_in(coordinator, f"p{i}", peer="ipv4:127.0.0.1:5") for i in range(4)]

    assert all(a.HasField("assignment") for a in answers)


# ----- enrollment rates --------------------------------------------------------------------


def _identities(tmp_path: pathlib.Path, clock: FakeClock, **limits: RateLimit) -> DeviceIdentities:
    store = SqliteStore(tmp_path / "s.sqlite")
    return DeviceIdentities(
        store,
        clock,
        EnrollmentPolicy.shared_secret(ENROLLMENT_SECRET),
        networks=NetworkSettings(**limits),  # type: ignore[arg-type]
    )


def test_enrollment_is_rate_limited_per_source_network(tmp_path) -> None:
    clock = FakeClock()
    identities = _identities(tmp_path, clock, enroll_per_network=RateLimit(per_s=1 / 60, burst=3))
    for i in range(3):
        identities.enroll(enroll_request(device_key(f"n{i}")), "ipv4:10.9.9.1:1")

    with pytest.raises(ResourceExhausted, match="10.9.9.0/24"):
        identities.enroll(enroll_request(device_key("n3")), "ipv4:10.9.9.2:1")
    identities.enroll(enroll_request(device_key("elsewhere")), "ipv4:10.9.10.1:1")
    clock.advance(60.0)
    identities.enroll(enroll_request(device_key("n3")), "ipv4:10.9.9.2:1")  # refilled

    assert identities.enrolled_key(device_key("n3").device_id, POPULATION) is not None
    assert identities._store.enrolled_devices(POPULATION) == 5


def test_a_refused_enrollment_stores_nothing(tmp_path) -> None:
    clock = FakeClock()
    identities = _identities(tmp_path, clock, enroll_per_credential=RateLimit(per_s=0.0, burst=1))
    identities.enroll(enroll_request(device_key("first")))

    with pytest.raises(ResourceExhausted, match="credential"):
        identities.enroll(enroll_request(device_key("second")))

    assert identities._store.enrolled_devices(POPULATION) == 1
    assert identities.enrolled_key(device_key("second").device_id, POPULATION) is None


def test_rate_limiter_keeps_a_bounded_number_of_buckets() -> None:
    limiter = RateLimiter(RateLimit(per_s=0.0, burst=1), max_keys=2)
    assert limiter.try_take("a", 0.0) and limiter.try_take("b", 0.0) and limiter.try_take("c", 0.0)

    assert limiter.try_take("a", 0.0)  # forgotten, so full again: memory stays bounded
    assert not limiter.try_take("c", 0.0)


def test_the_replay_guard_refuses_past_its_capacity_and_forgets_expired_nonces() -> None:
    guard = ReplayGuard(keep_s=600.0, capacity=2)
    guard.add("d", b"1", 0.0)
    guard.add("d", b"2", 1.0)

    with pytest.raises(ResourceExhausted):
        guard.add("d", b"3", 2.0)
    assert guard.seen("d", b"1", 599.0)
    assert not guard.seen("d", b"1", 600.0)
    guard.add("d", b"3", 601.0)
    assert len(guard) == 1


def test_over_grpc_the_peer_address_decides_the_network(tmp_path, model_bytes) -> None:
    import asyncio

    from device_runtime.channel import open_channel
    from server.grpc_service import CoordinatorServer
    from tests.harness import loopback_tls, loopback_trust
    from tests.identities import check_in_over

    async def scenario() -> list[str | None]:
        store = SqliteStore(tmp_path / "s.sqlite")
        clock = FakeClock()
        coordinator = Coordinator(
            store, clock, identities=identities_for(store, clock, NetworkSettings())
        )
        config = task_config(target_reports=4, over_selection=1.0, max_network_share=0.25)
        coordinator.register_task(config, model_bytes)
        server = CoordinatorServer(coordinator, "127.0.0.1:0", tls=loopback_tls())
        await server.start()
        try:
            async with open_channel(server.address, loopback_trust()) as channel:
                answers = [await check_in_over(channel, f"loop{i}") for i in range(2)]
        finally:
            await server.stop(0)
            store.close()
        return [a.WhichOneof("outcome") for a in answers]

    # Loopback is not exempt here: both devices come from 127.0.0.0/24, which gets 1 of 4.
    assert asyncio.run(scenario()) == ["assignment", "rejection"]
