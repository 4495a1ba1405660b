"""Prometheus metrics as a scraper meets them: rounds over real gRPC on loopback, the
endpoint over real HTTP, the page parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from device_runtime import constants
from protos import admin_pb2, admin_pb2_grpc, common_pb2, device_pb2, device_pb2_grpc
from server.metrics import CoordinatorMetrics, MetricsEndpoint
from tests.harness import POPULATION, RunningCoordinator, running_coordinator, task_config
from tests.identities import check_in_over, sign_failure, sign_header

V = constants.PROTOCOL_VERSION
CHECK_IN = "/overnight.v1.DeviceService/CheckIn"
UPLOAD = "/overnight.v1.DeviceService/UploadUpdate"
LIST_TASKS = "/overnight.v1.AdminService/ListTasks"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextlib.asynccontextmanager
async def _instrumented(
    tmp_path: pathlib.Path, model_bytes: bytes
) -> AsyncIterator[tuple[RunningCoordinator, MetricsEndpoint]]:
    metrics = CoordinatorMetrics()
    observed = [metrics.interceptor()]  # as `overnight serve` has it: on both listeners
    async with running_coordinator(
        str(tmp_path / "s.sqlite"),
        model_bytes,
        task_config(),
        interceptors=observed,
        admin_interceptors=observed,
    ) as running:
        metrics.instrument(running.coordinator, running.server.device_service.upload_slots)
        endpoint = MetricsEndpoint("127.0.0.1:0", metrics.registry)
        try:
            yield running, endpoint
        finally:
            endpoint.close()


async def _scrape(endpoint: MetricsEndpoint) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://{endpoint.address}/metrics", timeout=10) as page:
            return page.read().decode()

    text = await asyncio.to_thread(get)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def _scrape_once_timed(endpoint: MetricsEndpoint, method: str, calls: int) -> Samples:
    """The page once `calls` calls of `method` are timed. A refused call's status reaches
    the client (context.abort sends it) a moment before the server's interceptor records
    it, so a test that scrapes right after a refusal waits for that record, not for time."""
    for _ in range(1000):
        samples = await _scrape(endpoint)
        if _value(samples, "overnight_rpc_duration_seconds_count", method=method) >= calls:
            return samples
        await asyncio.sleep(0.01)
    return samples  # the assertions on it then say what is missing


def _run(
    tmp_path: pathlib.Path,
    model_bytes: bytes,
    body: Callable[[RunningCoordinator, MetricsEndpoint, grpc.aio.Channel], Awaitable[Samples]],
) -> Samples:
    async def scenario() -> Samples:
        async with (
            _instrumented(tmp_path, model_bytes) as (running, endpoint),
            running.device_channel() as channel,
        ):
            return await body(running, endpoint, channel)

    return asyncio.run(scenario())


async def _check_in(
    channel: grpc.aio.Channel, device_id: str, population: str = POPULATION
) -> device_pb2.CheckInResponse:
    return await check_in_over(channel, device_id, population)


def _upload_parts(token: bytes, n: int) -> tuple[device_pb2.UploadChunk, list[bytes]]:
    header = device_pb2.UploadHeader(
        protocol_version=V,
        upload_token=token,
        example_count=5,
        num_elements=n,
        encoding="float32_delta",
        metrics=common_pb2.ClientMetrics(num_examples=5, num_batches=1),
    )
    payload = np.full(n, 0.25, "<f4").tobytes()
    half = len(payload) // 2
    return device_pb2.UploadChunk(header=sign_header(header)), [payload[:half], payload[half:]]


async def _upload(channel: grpc.aio.Channel, token: bytes, n: int) -> None:
    header, halves = _upload_parts(token, n)
    chunks = [header, *(device_pb2.UploadChunk(data=h) for h in halves)]
    await device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate(iter(chunks))


def test_check_ins_are_counted_by_population_and_outcome(tmp_path, model_bytes) -> None:
    async def body(running, endpoint, channel) -> Samples:
        for device in ("a", "b", "c", "d"):  # the round selects 3 (2 * over-selection 1.5)
            await _check_in(channel, device)
        with pytest.raises(grpc.aio.AioRpcError):
            await _check_in(channel, "e", population="made-up-by-a-device")
        return await _scrape_once_timed(endpoint, CHECK_IN, 5)

    samples = _run(tmp_path, model_bytes, body)

    name = "overnight_check_ins_total"
    assert _value(samples, name, population=POPULATION, outcome="assigned", reason="") == 3
    assert (
        _value(samples, name, population=POPULATION, outcome="rejected", reason="round_full") == 1
    )
    assert _value(samples, name, population="unknown", outcome="refused", reason="not_found") == 1
    assert _value(samples, "overnight_rpcs_total", method=CHECK_IN, code="OK") == 4
    assert _value(samples, "overnight_rpc_duration_seconds_count", method=CHECK_IN) == 5


def test_a_committed_round_shows_its_outcome_reports_dropouts_and_commit(
    tmp_path, model_bytes
) -> None:
    async def body(running, endpoint, channel) -> Samples:
        tokens = [(await _check_in(channel, d)).assignment.upload_token for d in "abc"]
        n = running.coordinator.task("t1").record.num_parameters
        await device_pb2_grpc.DeviceServiceStub(channel).ReportFailure(
            sign_failure(
                device_pb2.FailureReport(
                    protocol_version=V,
                    upload_token=tokens[2],
                    cause=device_pb2.FailureReport.INTERRUPTED,
                )
            )
        )
        for token in tokens[:2]:
            await _upload(channel, token, n)
        await running.settled()
        return await _scrape(endpoint)

    samples = _run(tmp_path, model_bytes, body)

    assert _value(samples, "overnight_rounds_total", task="t1", outcome="committed") == 1
    assert (
        _value(samples, "overnight_round_duration_seconds_count", task="t1", outcome="committed")
        == 1
    )
    assert _value(samples, "overnight_reports_total", task="t1") == 2
    assert _value(samples, "overnight_dropouts_total", task="t1", cause="interrupted") == 1
    assert _value(samples, "overnight_failure_reports_total", cause="interrupted") == 1
    assert _value(samples, "overnight_store_commit_duration_seconds_count") == 1
    assert _value(samples, "overnight_rpcs_total", method=UPLOAD, code="OK") == 2


def test_admin_calls_are_timed_and_counted_refused_ones_too(tmp_path, model_bytes) -> None:
    async def body(running, endpoint, channel) -> Samples:
        async with running.admin_channel() as admin_channel:
            admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
            request = admin_pb2.ListTasksRequest(protocol_version=V)
            await admin.ListTasks(request, metadata=running.admin_metadata())
            with pytest.raises(grpc.aio.AioRpcError):
                await admin.ListTasks(request)  # no operator token
        return await _scrape_once_timed(endpoint, LIST_TASKS, 2)

    samples = _run(tmp_path, model_bytes, body)

    assert _value(samples, "overnight_rpc_duration_seconds_count", method=LIST_TASKS) == 2
    assert _value(samples, "overnight_rpcs_total", method=LIST_TASKS, code="OK") == 1
    assert _value(samples, "overnight_rpcs_total", method=LIST_TASKS, code="UNAUTHENTICATED") == 1


def test_bytes_received_and_sent_are_the_messages_on_the_wire(tmp_path, model_bytes) -> None:
    sizes: dict[str, int] = {}

    async def body(running, endpoint, channel) -> Samples:
        response = await _check_in(channel, "a")
        n = running.coordinator.task("t1").record.num_parameters
        header, halves = _upload_parts(response.assignment.upload_token, n)
        chunks = [header, *(device_pb2.UploadChunk(data=h) for h in halves)]
        sizes["check_in"] = response.ByteSize()
        sizes["upload"] = sum(c.ByteSize() for c in chunks)
        await device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate(iter(chunks))
        return await _scrape(endpoint)

    samples = _run(tmp_path, model_bytes, body)

    assert _value(samples, "overnight_received_bytes_total", method=UPLOAD) == sizes["upload"]
    assert _value(samples, "overnight_sent_bytes_total", method=CHECK_IN) == sizes["check_in"]


def test_upload_slots_in_use_and_uploads_waiting_are_shown_mid_upload(
    tmp_path, model_bytes
) -> None:
    async def body(running, endpoint, channel) -> Samples:
        tokens = [(await _check_in(channel, d)).assignment.upload_token for d in "abc"]
        n = running.coordinator.task("t1").record.num_parameters
        slots = running.server.device_service.upload_slots  # 2 slots: one upload waits
        calls = []
        for token in tokens:
            header, halves = _upload_parts(token, n)
            call = device_pb2_grpc.DeviceServiceStub(channel).UploadUpdate()
            await call.write(header)
            await call.write(device_pb2.UploadChunk(data=halves[0]))
            calls.append((call, halves[1]))
        while (slots.in_use, slots.waiting) != (2, 1):
            await asyncio.sleep(0.01)  # until the server has read the three headers
        samples = await _scrape(endpoint)
        for call, rest in calls:
            await call.write(device_pb2.UploadChunk(data=rest))
            await call.done_writing()
        # The round closed at its target of 2: the waiting third upload is then refused.
        await asyncio.gather(*(call for call, _ in calls), return_exceptions=True)
        return samples

    samples = _run(tmp_path, model_bytes, body)

    assert _value(samples, "overnight_upload_slots_in_use") == 2
    assert _value(samples, "overnight_uploads_waiting") == 1
    assert _value(samples, "overnight_upload_slots") == 2
    assert _value(samples, "overnight_open_rounds", task="t1", state="reporting") == 1


def test_the_event_loop_lag_is_sampled() -> None:
    async def scenario() -> Samples:
        metrics = CoordinatorMetrics()
        sampler = asyncio.create_task(metrics.sample_event_loop(interval_s=0.001))
        while not _count(metrics):
            await asyncio.sleep(0.01)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        endpoint = MetricsEndpoint("127.0.0.1:0", metrics.registry)
        try:
            return await _scrape(endpoint)
        finally:
            endpoint.close()

    samples = asyncio.run(scenario())

    assert _value(samples, "overnight_event_loop_lag_seconds_count") >= 1


def _count(metrics: CoordinatorMetrics) -> float:
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "overnight_event_loop_lag_seconds_count":
                return sample.value
    return 0.0


def test_each_coordinator_has_its_own_registry() -> None:
    first, second = CoordinatorMetrics(), CoordinatorMetrics()

    first.rounds.labels("t1", "committed").inc()

    assert first.registry is not second.registry
    assert first.registry is not prometheus_client.REGISTRY
    assert (
        second.registry.get_sample_value(
            "overnight_rounds_total", {"task": "t1", "outcome": "committed"}
        )
        is None
    )


@pytest.mark.parametrize("address", ["9100", "localhost", "host:port"])
def test_a_metrics_address_must_be_host_and_port(address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        MetricsEndpoint(address, prometheus_client.CollectorRegistry())
