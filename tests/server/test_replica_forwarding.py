"""Two coordinator replicas in process on one real PostgreSQL database, each behind its own
real gRPC listener with TLS: a secure task's calls that reach the replica not hosting its
rounds are forwarded to the host, and the device sees the host's answers
(server/replica_forwarding.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from device_runtime import constants
from protos import device_pb2_grpc, secagg_pb2, secagg_pb2_grpc
from server.grpc_service import CoordinatorServer
from server.postgres_store import PostgresStore
from server.replica_coordinator import ReplicaCoordinator
from server.replica_forwarder import (
    CHECK_IN,
    SECAGG_SEND,
    Forwarder,
    forwarded_mac_metadata,
    forwarded_metadata,
)
from server.replica_forwarding import ReplicaFront
from server.replica_status import cluster_status
from tests.fakes import FakeClock
from tests.harness import loopback_tls, loopback_trust, session_ca, task_config
from tests.identities import (
    check_in_over,
    device_key,
    enroll_request,
    identities_for,
    signed_check_in,
)


class Serving:
    def __init__(self, replica: ReplicaCoordinator, server: CoordinatorServer) -> None:
        self.replica, self.server = replica, server
        self.channel = grpc.aio.secure_channel(server.address, loopback_trust().credentials())

    @property
    def secagg(self) -> secagg_pb2_grpc.SecAggServiceStub:
        return secagg_pb2_grpc.SecAggServiceStub(self.channel)


@contextlib.asynccontextmanager
async def two_replicas(url: str, model_bytes: bytes) -> AsyncIterator[tuple[Serving, Serving]]:
    """(host, other): a secure task led by the host; both listen and publish their address."""
    clock = FakeClock()
    stores = [PostgresStore(url) for _ in range(2)]
    replicas = [
        ReplicaCoordinator(
            store,
            clock,
            f"replica-{i}",
            identities=identities_for(store, clock),
            rng=np.random.default_rng(i),
        )
        for i, store in enumerate(stores)
    ]
    replicas[0].register_task(
        task_config(aggregator="secure_aggregator()", target_reports=10), model_bytes
    )
    serving, fronts = [], []
    for replica in replicas:
        front = ReplicaFront.build(replica, 2, True, session_ca().root_certificate)
        server = CoordinatorServer(
            replica,
            "127.0.0.1:0",
            tls=loopback_tls(),
            device_service=front.device_service,
            secagg_service=front.secagg_service,
        )
        front.publish(server.address)
        fronts.append(front)
        await server.start()
        serving.append(Serving(replica, server))
    for _ in range(2):
        for replica in replicas:
            replica.replicate()  # leases, takeover, addresses
    host, other = sorted(serving, key=lambda s: not s.replica.hosts_secure_rounds("t1"))
    try:
        yield host, other
    finally:
        for s in serving:
            await s.channel.close()
            await s.server.stop(0)
        for front in fronts:
            await front.close()
        for store in stores:
            store.close()


def _poll(
    config: secagg_pb2.SecAggSessionConfig, token: bytes
) -> secagg_pb2.AwaitServerMessageRequest:
    return secagg_pb2.AwaitServerMessageRequest(
        protocol_version=constants.PROTOCOL_VERSION,
        session_id=config.session_id,
        client_id=config.client_id,
        session_token=token,
        after_stage=secagg_pb2.SHARE_KEYS,
    )


async def _status(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded")


def test_a_check_in_at_a_replica_not_hosting_the_secure_task_is_assigned_by_the_host(
    postgres_url: str, model_bytes: bytes
) -> None:
    async def scenario() -> tuple[bool, int, int, dict[str, bool]]:
        async with two_replicas(postgres_url, model_bytes) as (host, other):
            response = await check_in_over(other.channel, "d0")
            round_ = host.replica.task("t1").selecting
            assert round_ is not None
            other.replica.replicate()  # its heartbeat
            shown = {
                r.name: (r.address, r.forwarded)
                for r in cluster_status(host.replica).replicas  # what `overnight status` shows
            }
            expected = {
                host.replica.replica_name: (host.server.address, 0),
                other.replica.replica_name: (other.server.address, 1),
            }
            return (
                response.assignment.HasField("secure_aggregation"),
                round_.selected,
                len(other.replica.task("t1").open_rounds),
                {name: shown[name] == seen for name, seen in expected.items()},
            )

    secure, selected_on_host, open_on_other, shown = asyncio.run(scenario())

    assert secure and selected_on_host == 1 and open_on_other == 0
    assert all(shown.values()), shown


def test_secagg_refusals_through_a_forwarding_replica_are_the_hosts(
    postgres_url: str, model_bytes: bytes
) -> None:
    async def scenario() -> list[tuple[tuple[grpc.StatusCode, str], tuple[grpc.StatusCode, str]]]:
        async with two_replicas(postgres_url, model_bytes) as (host, other):
            config = (await check_in_over(host.channel, "d0")).assignment.secure_aggregation
            calls = [
                # A session token that is not the device's.
                lambda stub: stub.AwaitServerMessage(_poll(config, b"\x00" * 16)),
                # Past the pending stage before the session opened.
                lambda stub: stub.AwaitServerMessage(_poll(config, config.session_token)),
                # A masked input for a session that has not opened.
                lambda stub: stub.SendMaskedInput(
                    iter(
                        [
                            secagg_pb2.MaskedInputChunk(
                                header=secagg_pb2.MaskedInputHeader(
                                    protocol_version=constants.PROTOCOL_VERSION,
                                    session_id=config.session_id,
                                    client_id=config.client_id,
                                    session_token=config.session_token,
                                    vector_length=config.vector_length,
                                )
                            )
                        ]
                    )
                ),
            ]
            return [
                (await _status(call(host.secagg)), await _status(call(other.secagg)))
                for call in calls
            ]

    answers = asyncio.run(scenario())

    assert [direct[0] for direct, _ in answers] == [
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.FAILED_PRECONDITION,
    ]
    for direct, forwarded in answers:
        assert forwarded == direct


def test_a_forged_forwarding_assertion_is_refused_unauthenticated(
    postgres_url: str, model_bytes: bytes
) -> None:
    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with two_replicas(postgres_url, model_bytes) as (host, _):
            request = signed_check_in("d0", time.time())
            assertion = f"ipv4:10.9.8.7:1|{time.time():.3f}|{CHECK_IN}"
            call = host.channel.unary_unary(
                CHECK_IN, request_serializer=type(request).SerializeToString
            )
            return await _status(
                call(
                    request,
                    metadata=((forwarded_metadata, assertion), (forwarded_mac_metadata, "00" * 32)),
                )
            )

    code, details = asyncio.run(scenario())

    assert code is grpc.StatusCode.UNAUTHENTICATED and "does not verify" in details


@pytest.mark.parametrize(
    ("asserted_for", "expected"),
    [(CHECK_IN, grpc.StatusCode.OK), (SECAGG_SEND, grpc.StatusCode.UNAUTHENTICATED)],
)
def test_a_forwarding_assertion_holds_only_for_the_method_it_names(
    postgres_url: str, model_bytes: bytes, asserted_for: str, expected: grpc.StatusCode
) -> None:
    async def scenario() -> grpc.StatusCode:
        async with two_replicas(postgres_url, model_bytes) as (host, _):
            secret = host.replica.routes.forwarding_secret()
            metadata = Forwarder(secret, None).metadata("ipv4:10.9.8.7:1", asserted_for)
            stub = device_pb2_grpc.DeviceServiceStub(host.channel)
            await stub.Enroll(enroll_request(device_key("d1")))
            request = signed_check_in("d1", host.replica.now())
            try:
                await stub.CheckIn(request, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    assert asyncio.run(scenario()) is expected


def test_a_forwarding_replica_answers_unavailable_when_the_host_is_unreachable(
    postgres_url: str, model_bytes: bytes
) -> None:
    async def scenario() -> grpc.StatusCode:
        async with two_replicas(postgres_url, model_bytes) as (host, other):
            config = (await check_in_over(host.channel, "d0")).assignment.secure_aggregation
            await host.server.stop(0)  # its lease and address stay in the database
            code, _ = await _status(
                other.secagg.AwaitServerMessage(_poll(config, config.session_token))
            )
            return code

    assert asyncio.run(scenario()) is grpc.StatusCode.UNAVAILABLE
