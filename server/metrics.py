"""Prometheus metrics of one coordinator, for the on-call (TensorBoard's per-round scalars are
for the ML engineer). Served over HTTP by `overnight serve --metrics-address host:port`.

Each coordinator has its own `CollectorRegistry`, so several run in one process (tests).
Where the numbers come from:
- `RpcMetrics`, a server interceptor on the device and admin listeners: every RPC's latency
  and status,
  bytes received and sent (serialized messages, as gRPC hands them over), check-ins by
  population and outcome, failure reports by cause;
- the coordinator's round observers: round outcome and duration per task, reports and
  dropouts (by cause) per task;
- the round driver's commit hook: the store's commit latency;
- a sampler task on the event loop: the loop's lag;
- `CoordinatorState`, read at each scrape: upload slots in use, uploads waiting, open rounds,
  open SecAgg sessions by stage.

Label values never come from a device unchecked: a population the coordinator does not
serve is counted as "unknown", causes and reasons are enum names, methods are those the
server has (an unknown method never reaches an interceptor's wrapper).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protos import device_pb2, secagg_pb2
from server.coordinator import Coordinator
from server.method_wrapping import WrappingInterceptor
from server.secagg.round_bridge import SecureRounds
from server.store import RoundRecord
from server.task_runtime import TaskRuntime
from server.upload_slots import UploadSlots

CHECK_IN = "/overnight.v1.DeviceService/CheckIn"
REPORT_FAILURE = "/overnight.v1.DeviceService/ReportFailure"
_DROPOUTS_PREFIX = "round/dropouts/"  # per-cause dropout counts in a closed round's record

rpc_buckets_s = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
round_buckets_s = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
commit_buckets_s = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
lag_buckets_s = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# How often the sampler measures the event loop's lag.
lag_sample_interval_s = 0.5


class CoordinatorMetrics:
    """Every metric of one coordinator. Its interceptor goes into the server when the server
    is built; `instrument` then hooks the metrics into the coordinator and its upload slots."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self._coordinator: Coordinator | None = None
        self.registry = registry or prometheus_client.CollectorRegistry()
        r = self.registry
        self.check_ins = prometheus_client.Counter(
            "overnight_check_ins",
            "Check-ins by population and outcome: assigned; rejected (reason: round_full, "
            "not_eligible, no_task, too_early, shutting_down); refused (reason: the gRPC status "
            "code)",
            ["population", "outcome", "reason"],
            registry=r,
        )
        self.rpcs = prometheus_client.Counter(
            "overnight_rpcs",
            "RPCs answered, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = prometheus_client.Histogram(
            "overnight_rpc_duration_seconds",
            "Time from a call's start to its answer, by method (streams: the whole stream)",
            ["method"],
            buckets=rpc_buckets_s,
            registry=r,
        )
        self.received_bytes = prometheus_client.Counter(
            "overnight_received_bytes",
            "Request message bytes received, by method",
            ["method"],
            registry=r,
        )
        self.sent_bytes = prometheus_client.Counter(
            "overnight_sent_bytes", "Response message bytes sent, by method", ["method"], registry=r
        )
        self.failure_reports = prometheus_client.Counter(
            "overnight_failure_reports",
            "Failure reports devices sent, by cause",
            ["cause"],
            registry=r,
        )
        self.rounds = prometheus_client.Counter(
            "overnight_rounds",
            "Rounds ended, by task and outcome (committed, failed, abandoned)",
            ["task", "outcome"],
            registry=r,
        )
        self.round_seconds = prometheus_client.Histogram(
            "overnight_round_duration_seconds",
            "Time from a round's opening to its end, by task and outcome",
            ["task", "outcome"],
            buckets=round_buckets_s,
            registry=r,
        )
        self.reports = prometheus_client.Counter(
            "overnight_reports", "Updates counted in ended rounds, by task", ["task"], registry=r
        )
        self.dropouts = prometheus_client.Counter(
            "overnight_dropouts",
            "Selected devices whose update did not count, by task and cause (a failure "
            "report's cause, no_report, abandoned)",
            ["task", "cause"],
            registry=r,
        )
        self.store_commit_seconds = prometheus_client.Histogram(
            "overnight_store_commit_duration_seconds",
            "Time the store takes to make a round's commit durable",
            buckets=commit_buckets_s,
            registry=r,
        )
        self.event_loop_lag_seconds = prometheus_client.Histogram(
            "overnight_event_loop_lag_seconds",
            f"How late the event loop runs a timer due every {lag_sample_interval_s} s",
            buckets=lag_buckets_s,
            registry=r,
        )

    def interceptor(self) -> RpcMetrics:
        return RpcMetrics(self)

    def instrument(self, coordinator: Coordinator, slots: UploadSlots) -> None:
        """Observes the coordinator's rounds and commits, and reports at each scrape the
        state it holds (see CoordinatorState). Once per coordinator."""
        self._coordinator = coordinator
        coordinator.observers.append(self.observe_round)
        coordinator.driver.commit_observers.append(self.store_commit_seconds.observe)
        self.registry.register(CoordinatorState(coordinator, slots))

    def observe_round(self, task: TaskRuntime, record: RoundRecord) -> None:
        outcome = record.state.value
        self.rounds.labels(record.task_id, outcome).inc()
        self.round_seconds.labels(record.task_id, outcome).observe(
            max(0.0, record.finished_at - record.started_at)
        )
        self.reports.labels(record.task_id).inc(record.reported)
        for key, count in record.metrics.items():
            if key.startswith(_DROPOUTS_PREFIX) and count > 0:
                cause = key.removeprefix(_DROPOUTS_PREFIX)
                self.dropouts.labels(record.task_id, cause).inc(count)

    def population_label(self, population: object) -> str:
        tasks = self._coordinator.tasks() if self._coordinator is not None else []
        known = {t.config.population for t in tasks}
        return population if isinstance(population, str) and population in known else "unknown"

    async def sample_event_loop(self, interval_s: float = lag_sample_interval_s) -> None:
        """Measures the loop's lag until cancelled: how much later than due a timer fires."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            self.event_loop_lag_seconds.observe(max(0.0, loop.time() - due))


class CoordinatorState(Collector):
    """Gauges read at each scrape, from the HTTP server's thread. They only read: counts,
    and lists copied in one step (atomic under the GIL), so a scrape never changes or blocks
    the coordinator."""

    def __init__(self, coordinator: Coordinator, slots: UploadSlots) -> None:
        self._coordinator = coordinator
        self._slots = slots

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "overnight_upload_slots_in_use",
            "Uploads staged in memory now",
            value=self._slots.in_use,
        )
        yield GaugeMetricFamily(
            "overnight_upload_slots",
            "Uploads that may be staged at once (--max-concurrent-uploads)",
            value=self._slots.capacity,
        )
        yield GaugeMetricFamily(
            "overnight_uploads_waiting", "Uploads waiting for a slot", value=self._slots.waiting
        )
        open_rounds = GaugeMetricFamily(
            "overnight_open_rounds", "Rounds open now, by task and state", labels=["task", "state"]
        )
        stages = {name.lower(): 0 for name, _ in secagg_pb2.SecAggStage.items()}
        rounds: dict[tuple[str, str], int] = {}
        for task in list(self._coordinator.tasks()):
            for round_ in list(task.open_rounds.values()):
                key = (task.task_id, round_.state.value)
                rounds[key] = rounds.get(key, 0) + 1
                aggregate = SecureRounds.aggregator(round_)
                if aggregate is not None and aggregate.session is not None:
                    stage = secagg_pb2.SecAggStage.Name(aggregate.session.stage).lower()
                    stages[stage] += 1
        for (task_id, state), count in sorted(rounds.items()):
            open_rounds.add_metric([task_id, state], count)
        yield open_rounds
        sessions = GaugeMetricFamily(
            "overnight_secagg_sessions",
            "SecAgg sessions of open rounds, by stage",
            labels=["stage"],
        )
        for stage, count in stages.items():
            if stage != "stage_unspecified":
                sessions.add_metric([stage], count)
        yield sessions


Behaviour = Callable[..., Any]


class RpcMetrics(WrappingInterceptor):
    """Counts and times every call of the listener it is on. Outermost, before the request
    guard, so it sees each call's final status. Open services (health, reflection) are not
    counted: probes would drown the devices' calls."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        m = self._metrics
        received = m.received_bytes.labels(method)
        sent = m.sent_bytes.labels(method)
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer

        def counted_deserialize(raw: bytes) -> Any:
            received.inc(len(raw))
            return deserialize(raw) if deserialize is not None else raw

        def counted_serialize(response: Any) -> bytes:
            raw: bytes = serialize(response) if serialize is not None else response
            sent.inc(len(raw))
            return raw

        fields: dict[str, Any] = {
            "request_deserializer": counted_deserialize,
            "response_serializer": counted_serialize,
        }
        if handler.unary_unary is not None:
            fields["unary_unary"] = self._unary(method, handler.unary_unary)
        elif handler.unary_stream is not None:
            fields["unary_stream"] = self._unary_stream(method, handler.unary_stream)
        elif handler.stream_unary is not None:
            fields["stream_unary"] = self._stream_unary(method, handler.stream_unary)
        else:
            return handler  # no bidirectional streams on the device listener
        return handler._replace(**fields)

    def _finish(
        self,
        method: str,
        started: float,
        context: grpc.aio.ServicerContext,
        request: Any,
        response: Any,
        raised: bool,
    ) -> None:
        m = self._metrics
        code = context.code()
        if code is None:
            code = grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK
        m.rpcs.labels(method, code.name).inc()
        m.rpc_seconds.labels(method).observe(time.perf_counter() - started)
        if method == CHECK_IN:
            population = m.population_label(getattr(request, "population", None))
            if code is not grpc.StatusCode.OK or response is None:
                m.check_ins.labels(population, "refused", code.name.lower()).inc()
            elif response.WhichOneof("outcome") == "assignment":
                m.check_ins.labels(population, "assigned", "").inc()
            else:
                reason = device_pb2.Rejection.Reason.Name(response.rejection.reason).lower()
                m.check_ins.labels(population, "rejected", reason).inc()
        elif method == REPORT_FAILURE and code is grpc.StatusCode.OK:
            cause = device_pb2.FailureReport.Cause.Name(request.cause).lower()
            m.failure_reports.labels(cause).inc()

    def _unary(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            response, raised = None, True
            try:
                response = await behaviour(request, context)
                raised = False
                return response
            finally:
                self._finish(method, started, context, request, response, raised)

        return observed

    def _unary_stream(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            raised = True
            try:
                async for response in behaviour(request, context):
                    yield response
                raised = False
            finally:
                self._finish(method, started, context, request, None, raised)

        return observed

    def _stream_unary(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def observed(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            response, raised = None, True
            try:
                response = await behaviour(requests, context)
                raised = False
                return response
            finally:
                self._finish(method, started, context, None, response, raised)

        return observed


class MetricsEndpoint:
    """The HTTP endpoint Prometheus scrapes (GET /metrics), in a thread of its own."""

    def __init__(self, address: str, registry: prometheus_client.CollectorRegistry) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--metrics-address must be host:port, got {address!r}")
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = prometheus_client.start_http_server(
            int(port), host.strip("[]"), registry
        )
        self.address = f"{host}:{self._server.server_port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@contextlib.asynccontextmanager
async def metrics_served(
    address: str, metrics: CoordinatorMetrics, coordinator: Coordinator, slots: UploadSlots
) -> AsyncIterator[MetricsEndpoint]:
    """`overnight serve --metrics-address`: the metrics of a started server, on `address`,
    with the event loop sampled, until the block ends."""
    metrics.instrument(coordinator, slots)
    endpoint = MetricsEndpoint(address, metrics.registry)
    sampler = asyncio.create_task(metrics.sample_event_loop())
    try:
        yield endpoint
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        endpoint.close()
