"""SecAggService over real gRPC on loopback: devices run whole sessions through the RPCs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import pytest

from device_runtime import constants
from device_runtime.secagg.errors import SecAggAborted
from device_runtime.secagg.parameters import choose_parameters
from device_runtime.secagg.session_runner import SecAggSessionRunner
from protos import secagg_pb2, secagg_pb2_grpc
from server.secagg.grpc_service import SecAggService
from server.secagg.server import SecAggServer

LENGTH = 3000
N = 8

Body = Callable[[SecAggService, SecAggServer, str], Awaitable[None]]


def _inputs(seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 1 << 20, LENGTH, dtype=np.uint32) for c in range(1, N + 1)}


def _serve(body: Body, service_type: type[SecAggService] = SecAggService) -> SecAggServer:
    server = SecAggServer(choose_parameters(N), 32, LENGTH)

    async def scenario() -> None:
        service = service_type()
        service.add_session(server)
        grpc_server = grpc.aio.server()
        secagg_pb2_grpc.add_SecAggServiceServicer_to_server(service, grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        try:
            await body(service, server, f"127.0.0.1:{port}")
        finally:
            await grpc_server.stop(0)

    asyncio.run(scenario())
    return server


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def _expected(inputs: dict[int, np.ndarray], survivors: set[int]) -> np.ndarray:
    return np.sum([inputs[c] for c in sorted(survivors)], axis=0, dtype=np.uint32)


def test_eight_devices_sum_over_grpc_with_one_dropping_after_sharing_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(constants, "chunk_size_bytes", 4096)  # several chunks per input
    inputs = _inputs(1)
    dropped = 3
    results: dict[int, secagg_pb2.SessionResult] = {}

    async def body(service: SecAggService, server: SecAggServer, address: str) -> None:
        async def device(c: int) -> None:
            async with grpc.aio.insecure_channel(address) as channel:
                runner = SecAggSessionRunner(channel, server.session_config(c))
                await runner.advertise_and_share_keys()
                if c == dropped:
                    return  # the phone goes away before sending its masked input
                results[c] = await runner.contribute(inputs[c])

        devices = asyncio.gather(*(device(c) for c in range(1, N + 1)))
        # At the masked-input stage (earlier stages may also briefly wait for it alone).
        await _until(
            lambda: (
                server.stage == secagg_pb2.MASKED_INPUT_COLLECTION
                and server.waiting_for() == {dropped}
            )
        )
        await service.close_stage(
            server.session_id, secagg_pb2.MASKED_INPUT_COLLECTION
        )  # the stage's deadline passes
        await devices

    server = _serve(body)

    survivors = set(range(1, N + 1)) - {dropped}
    assert set(results) == survivors
    assert {r.num_summed for r in results.values()} == {N - 1}
    total, count = server.result()
    assert count == N - 1
    assert np.array_equal(total, _expected(inputs, survivors))


def test_devices_learn_of_an_abort_below_threshold() -> None:
    inputs = _inputs(2)
    outcomes: dict[int, str] = {}

    async def body(service: SecAggService, server: SecAggServer, address: str) -> None:
        async def device(c: int) -> None:
            async with grpc.aio.insecure_channel(address) as channel:
                runner = SecAggSessionRunner(channel, server.session_config(c))
                await runner.advertise_and_share_keys()
                if c > 2:
                    return  # six of eight vanish: fewer than t masked inputs
                try:
                    await runner.contribute(inputs[c])
                except SecAggAborted as exc:
                    outcomes[c] = str(exc)

        devices = asyncio.gather(*(device(c) for c in range(1, N + 1)))
        await _until(
            lambda: (
                server.stage == secagg_pb2.MASKED_INPUT_COLLECTION
                and server.waiting_for() == set(range(3, N + 1))
            )
        )
        await service.close_stage(server.session_id, secagg_pb2.MASKED_INPUT_COLLECTION)
        await devices

    server = _serve(body)

    assert server.stage == secagg_pb2.ABORTED
    assert set(outcomes) == {1, 2}
    assert all("server aborted" in reason for reason in outcomes.values())


def test_bad_calls_get_their_documented_status_codes() -> None:
    codes: dict[str, grpc.StatusCode] = {}

    async def body(service: SecAggService, server: SecAggServer, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = secagg_pb2_grpc.SecAggServiceStub(channel)
            config = server.session_config(1)

            async def code(name: str, call: Awaitable[object]) -> None:
                try:
                    await call
                    codes[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    codes[name] = exc.code()

            runner = SecAggSessionRunner(channel, config)
            good = runner.client.envelope()
            good.advertise_keys.CopyFrom(runner.client.advertise_keys())
            forged = secagg_pb2.SecAggClientMessage()
            forged.CopyFrom(good)
            forged.session_token = b"f" * 16
            await code("forged token", stub.Send(forged))
            await code("first advertise", stub.Send(good))
            await code("second advertise", stub.Send(good))
            bad_key = server.session_config(2)
            other = SecAggSessionRunner(channel, bad_key).client
            message = other.envelope()
            message.advertise_keys.CopyFrom(other.advertise_keys())
            message.advertise_keys.keys.mask_public_key = b"short"
            await code("malformed key", stub.Send(message))

            async def no_header() -> AsyncIterator[secagg_pb2.MaskedInputChunk]:
                yield secagg_pb2.MaskedInputChunk(data=b"\x00" * 8)

            await code("stream without header", stub.SendMaskedInput(no_header()))
            poll = secagg_pb2.AwaitServerMessageRequest(
                protocol_version=constants.PROTOCOL_VERSION,
                session_id=b"unknown",
                client_id=1,
                session_token=config.session_token,
            )
            await code("unknown session", stub.AwaitServerMessage(poll))
            carrying = secagg_pb2.AwaitServerMessageRequest(
                protocol_version=constants.PROTOCOL_VERSION,
                session_id=config.session_id,
                client_id=1,
                session_token=config.session_token,
                after_stage=secagg_pb2.ADVERTISE_KEYS,
                message=good,
            )
            await code("poll with a second advertise", stub.AwaitServerMessage(carrying))
            carrying.message.client_id = 2
            await code("poll with another client's message", stub.AwaitServerMessage(carrying))

    _serve(body)

    assert codes == {
        "forged token": grpc.StatusCode.UNAUTHENTICATED,
        "first advertise": grpc.StatusCode.OK,
        "second advertise": grpc.StatusCode.ALREADY_EXISTS,
        "malformed key": grpc.StatusCode.INVALID_ARGUMENT,
        "stream without header": grpc.StatusCode.INVALID_ARGUMENT,
        "unknown session": grpc.StatusCode.UNAUTHENTICATED,
        "poll with a second advertise": grpc.StatusCode.ALREADY_EXISTS,
        "poll with another client's message": grpc.StatusCode.INVALID_ARGUMENT,
    }


def test_a_message_sent_with_a_poll_that_times_out_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each stage's message goes with the poll for the next stage; a poll the server ends
    DEADLINE_EXCEEDED has taken it, so the device polls again without it."""
    from server.secagg import grpc_service

    monkeypatch.setattr(grpc_service, "await_server_message_s", 0.05)
    inputs = _inputs(3)
    polls: list[bool] = []  # whether each poll carried a message
    results: dict[int, secagg_pb2.SessionResult] = {}

    class CountingService(SecAggService):
        async def AwaitServerMessage(
            self, request: secagg_pb2.AwaitServerMessageRequest, context: grpc.aio.ServicerContext
        ) -> secagg_pb2.SecAggServerMessage:
            polls.append(request.HasField("message"))
            return await super().AwaitServerMessage(request, context)

    async def body(service: SecAggService, server: SecAggServer, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:

            async def device(c: int) -> None:
                runner = SecAggSessionRunner(channel, server.session_config(c))
                await runner.advertise_and_share_keys()
                results[c] = await runner.contribute(inputs[c])

            first = asyncio.ensure_future(device(1))
            # Device 1 advertised and its poll timed out twice: R0 waits for the others.
            await _until(lambda: polls.count(False) >= 2 or first.done())
            assert not first.done(), first.exception()
            assert polls[0] and server.stage == secagg_pb2.ADVERTISE_KEYS
            await asyncio.gather(first, *(device(c) for c in range(2, N + 1)))

    server = _serve(body, CountingService)

    assert set(results) == set(range(1, N + 1))
    total, count = server.result()
    assert count == N
    assert np.array_equal(total, _expected(inputs, set(range(1, N + 1))))


def test_a_pending_session_answers_its_config_once_opened_and_refuses_the_rest() -> None:
    from device_runtime.secagg.session_runner import await_session_config
    from server.secagg.server import SessionEnrollment

    enrollment = SessionEnrollment()
    partial = [
        secagg_pb2.SecAggSessionConfig(
            session_id=enrollment.session_id,
            client_id=c,
            session_token=enrollment.enroll(c),
            modulus_bits=32,
            vector_length=LENGTH,
        )
        for c in range(1, N + 1)
    ]
    codes: dict[str, grpc.StatusCode] = {}
    received: list[secagg_pb2.SecAggSessionConfig] = []

    async def scenario() -> None:
        service = SecAggService()
        service.expect_session(enrollment)
        grpc_server = grpc.aio.server()
        secagg_pb2_grpc.add_SecAggServiceServicer_to_server(service, grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = secagg_pb2_grpc.SecAggServiceStub(channel)
                poll = asyncio.ensure_future(await_session_config(channel, partial[0]))
                wrong = secagg_pb2.AwaitServerMessageRequest(
                    protocol_version=constants.PROTOCOL_VERSION,
                    session_id=enrollment.session_id,
                    client_id=2,
                    session_token=b"x" * 16,
                )
                message = secagg_pb2.SecAggClientMessage(
                    protocol_version=constants.PROTOCOL_VERSION,
                    session_id=enrollment.session_id,
                    client_id=2,
                    session_token=partial[1].session_token,
                )
                message.abort.reason = "early"
                for name, call in (
                    ("wrong token", stub.AwaitServerMessage(wrong)),
                    ("send before open", stub.Send(message)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    codes[name] = refused.value.code()
                await asyncio.sleep(0.05)
                assert not poll.done()
                server = SecAggServer(choose_parameters(N), 32, LENGTH, enrollment)
                service.add_session(server)
                received.append(await asyncio.wait_for(poll, 5.0))
        finally:
            await grpc_server.stop(0)

    asyncio.run(scenario())

    assert codes == {
        "wrong token": grpc.StatusCode.UNAUTHENTICATED,
        "send before open": grpc.StatusCode.FAILED_PRECONDITION,
    }
    assert received[0].num_clients == N and received[0].threshold > 0
    assert received[0].session_token == partial[0].session_token
