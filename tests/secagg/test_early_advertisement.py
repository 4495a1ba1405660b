"""Keys advertised while a round's session is pending: key agreement overlaps selection.

A device advertises from its Assignment's partial config (session id, client id, token); the
pending session checks the advertisement exactly as R0 does (signed by the enrolled key, well
formed, no key twice) and the session opens with it.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from device_runtime.secagg import client_r0_advertise_keys
from device_runtime.secagg.client import EarlyAdvertisement, SecAggClient
from device_runtime.secagg.key_agreement import KeyPair
from device_runtime.secagg.parameters import SecAggParameters
from device_runtime.secagg.session_runner import (
    SecAggSessionRunner,
    await_share_keys_request,
)
from protos import secagg_pb2, secagg_pb2_grpc
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unauthenticated
from server.secagg.grpc_service import SecAggService
from server.secagg.server import SecAggServer, SessionEnrollment
from tests.secagg.stepper import Stepper, device_key_of

N = 5
LENGTH = 40
MODULUS_BITS = 20
PARAMETERS = SecAggParameters(N, N - 1, 3, 1, 1)


def _enrollment() -> tuple[SessionEnrollment, dict[int, secagg_pb2.SecAggSessionConfig]]:
    """A pending session with N signed devices, and each device's partial config."""
    enrollment = SessionEnrollment()
    partial = {}
    for c in range(1, N + 1):
        enrollment.device_keys[c] = device_key_of(c).public_key_der
        partial[c] = secagg_pb2.SecAggSessionConfig(
            session_id=enrollment.session_id,
            client_id=c,
            session_token=enrollment.enroll(c),
            modulus_bits=MODULUS_BITS,
            vector_length=LENGTH,
        )
    return enrollment, partial


def _advertise_all(
    enrollment: SessionEnrollment, partial: dict[int, secagg_pb2.SecAggSessionConfig]
) -> dict[int, EarlyAdvertisement]:
    early = {c: EarlyAdvertisement.make(partial[c], device_key_of(c)) for c in partial}
    for advertisement in early.values():
        enrollment.advertise_early(advertisement.message)
    return early


def _clients(server: SecAggServer, early: dict[int, EarlyAdvertisement]) -> dict[int, SecAggClient]:
    return {c: SecAggClient(server.session_config(c), device_key_of(c), early[c]) for c in early}


def test_a_session_whose_devices_all_advertised_early_opens_at_share_keys() -> None:
    enrollment, partial = _enrollment()
    _advertise_all(enrollment, partial)

    server = SecAggServer(PARAMETERS, MODULUS_BITS, LENGTH, enrollment)

    assert server.stage == secagg_pb2.SHARE_KEYS


def test_early_advertisements_carry_a_session_to_the_right_sum() -> None:
    # Prepare
    enrollment, partial = _enrollment()
    early = _advertise_all(enrollment, partial)
    server = SecAggServer(PARAMETERS, MODULUS_BITS, LENGTH, enrollment)
    clients = _clients(server, early)
    rng = np.random.default_rng(3)
    inputs = {c: rng.integers(0, 1 << 16, LENGTH, dtype=np.uint32) for c in clients}

    # Execute: R1 to R3 as devices run them, with the signed keys checked at R1.
    def message_to(c: int) -> secagg_pb2.SecAggServerMessage:
        return server.server_message(enrollment.session_id, c, partial[c].session_token)

    for c, client in clients.items():
        message = client.envelope()
        message.share_keys.CopyFrom(client.share_keys(message_to(c).share_keys_request))
        server.receive(message)
    for c, client in clients.items():
        masked = client.masked_input(message_to(c).masked_input_request, inputs[c])
        server.receive_masked_input(enrollment.session_id, c, partial[c].session_token, masked)
    for c, client in clients.items():
        message = client.envelope()
        request = message_to(c).unmasking_request
        message.unmasking_response.CopyFrom(client.unmasking_response(request))
        server.receive(message)

    # Assert
    total, count = server.result()
    expected = np.sum(list(inputs.values()), axis=0, dtype=np.uint64) % (1 << MODULUS_BITS)
    assert count == N
    assert np.array_equal(total, expected.astype(np.uint32))


def test_the_session_waits_at_advertise_keys_for_devices_that_did_not_advertise_early() -> None:
    enrollment, partial = _enrollment()
    for c in (1, 2, 3, 4):
        enrollment.advertise_early(EarlyAdvertisement.make(partial[c], device_key_of(c)).message)

    server = SecAggServer(PARAMETERS, MODULUS_BITS, LENGTH, enrollment)

    assert server.stage == secagg_pb2.ADVERTISE_KEYS
    assert server.waiting_for() == {5}


def test_a_device_that_failed_before_the_session_opened_is_nobodys_neighbour_with_keys() -> None:
    # Prepare: 5 advertised early, then reported a failure before selection closed.
    enrollment, partial = _enrollment()
    _advertise_all(enrollment, partial)

    # Execute
    server = SecAggServer(PARAMETERS, MODULUS_BITS, LENGTH, enrollment, dropped={5})

    # Assert
    request = server.server_message(enrollment.session_id, 1, partial[1].session_token)
    assert server.stage == secagg_pb2.SHARE_KEYS
    assert 5 not in {n.client_id for n in request.share_keys_request.neighbours}


def test_a_pending_session_refuses_keys_not_signed_by_the_devices_enrolled_key() -> None:
    enrollment, partial = _enrollment()
    # Device 2's keys signed by device 3's enrolled key: a substitution.
    forged = EarlyAdvertisement.make(partial[2], device_key_of(3))

    with pytest.raises(InvalidArgument, match="not signed by its enrolled key"):
        enrollment.advertise_early(forged.message)
    assert enrollment.advertised == {} and enrollment.key_owners == {}


def test_a_pending_session_refuses_an_unsigned_advertisement() -> None:
    enrollment, partial = _enrollment()
    unsigned = EarlyAdvertisement.make(partial[2], None)

    with pytest.raises(InvalidArgument, match="not signed"):
        enrollment.advertise_early(unsigned.message)
    assert enrollment.advertised == {}


def test_a_pending_session_refuses_a_wrong_token() -> None:
    enrollment, partial = _enrollment()
    message = EarlyAdvertisement.make(partial[2], device_key_of(2)).message
    message.session_token = b"x" * 16

    with pytest.raises(Unauthenticated):
        enrollment.advertise_early(message)
    assert enrollment.advertised == {}


def test_a_pending_session_refuses_a_second_advertisement_and_a_copied_key() -> None:
    # Prepare
    enrollment, partial = _enrollment()
    first = EarlyAdvertisement.make(partial[1], device_key_of(1))
    enrollment.advertise_early(first.message)
    kept = dict(enrollment.advertised)
    second = EarlyAdvertisement.make(partial[1], device_key_of(1))
    # Device 2 signs, with its own enrolled key, device 1's mask key as its own.
    copycat = EarlyAdvertisement.make(partial[2], device_key_of(2)).message
    copycat.advertise_keys.CopyFrom(
        client_r0_advertise_keys.signed_advertisement(
            enrollment.session_id, 2, KeyPair.generate(), first.mask_keys, device_key_of(2)
        )
    )

    # Execute / Assert
    with pytest.raises(AlreadyExists):
        enrollment.advertise_early(second.message)
    with pytest.raises(InvalidArgument, match="client 1 already advertised"):
        enrollment.advertise_early(copycat)
    assert enrollment.advertised == kept


def test_a_pending_session_takes_no_other_message() -> None:
    enrollment, partial = _enrollment()
    message = EarlyAdvertisement.make(partial[1], device_key_of(1)).message
    message.abort.reason = "early"  # replaces the advertisement in the oneof

    with pytest.raises(FailedPrecondition, match="not opened"):
        enrollment.advertise_early(message)


def test_an_opened_session_takes_no_more_early_advertisements() -> None:
    enrollment, partial = _enrollment()
    SecAggServer(PARAMETERS, MODULUS_BITS, LENGTH, enrollment)

    with pytest.raises(FailedPrecondition, match="opened"):
        enrollment.advertise_early(EarlyAdvertisement.make(partial[1], device_key_of(1)).message)


def test_an_early_advertisement_is_for_its_own_session_only() -> None:
    enrollment, partial = _enrollment()
    early = EarlyAdvertisement.make(partial[1], device_key_of(1))
    other, _ = _enrollment()
    server = SecAggServer(PARAMETERS, MODULUS_BITS, LENGTH, other)

    with pytest.raises(ValueError, match="another session"):
        SecAggClient(server.session_config(1), device_key_of(1), early)


def test_devices_advertise_to_a_pending_session_over_grpc_and_finish_the_sum() -> None:
    # Prepare
    enrollment, partial = _enrollment()
    rng = np.random.default_rng(4)
    inputs = {c: rng.integers(0, 1 << 16, LENGTH, dtype=np.uint32) for c in partial}
    results: dict[int, secagg_pb2.SessionResult] = {}
    stage_at_open: list[int] = []
    configs: dict[int, secagg_pb2.SecAggSessionConfig] = {}

    async def scenario() -> None:
        service = SecAggService()
        service.expect_session(enrollment)
        grpc_server = grpc.aio.server()
        secagg_pb2_grpc.add_SecAggServiceServicer_to_server(service, grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()

        async def device(c: int) -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                # R0 alone with Send, as a device without the combined poll sends it.
                early = EarlyAdvertisement.make(partial[c], device_key_of(c))
                await secagg_pb2_grpc.SecAggServiceStub(channel).Send(early.message)
                request = await await_share_keys_request(channel, partial[c])
                configs[c] = config = request.session_config
                runner = SecAggSessionRunner(channel, config, device_key_of(c), early)
                await runner.share_keys(request)
                results[c] = await runner.contribute(inputs[c])

        try:
            devices = asyncio.gather(*(device(c) for c in partial))
            while len(enrollment.advertised) < N:  # an event: every key is in
                await asyncio.sleep(0.01)
            # Execute: selection closes.
            server = SecAggServer(PARAMETERS, MODULUS_BITS, LENGTH, enrollment)
            stage_at_open.append(server.stage)
            service.add_session(server)
            await asyncio.wait_for(devices, 30.0)
        finally:
            await grpc_server.stop(0)

    asyncio.run(scenario())

    # Assert
    assert stage_at_open == [secagg_pb2.SHARE_KEYS]
    assert {(c.num_clients, c.threshold) for c in configs.values()} == {(N, PARAMETERS.threshold)}
    assert {r.num_summed for r in results.values()} == {N}
    assert set(results) == set(partial)


def test_only_the_call_that_may_end_the_unmasking_is_for_a_worker_thread() -> None:
    s = Stepper()
    assert not s.server.unmasking_may_close(None)  # at ADVERTISE_KEYS
    s.to_unmasking()
    *first, last = sorted(s.clients)
    for c in first:
        s.server.receive(s.unmask(c))

    assert not s.server.unmasking_may_close(first[0])  # answered already; `last` is awaited
    assert s.server.unmasking_may_close(last)
    assert s.server.unmasking_may_close(None)  # a deadline close or a drop
