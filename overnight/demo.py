"""`overnight demo`: a coordinator and a fleet of emulated phones training the digits MLP.

Exports the Keras model, starts the coordinator on loopback over TLS (a throwaway CA made for
the run), registers the task through the admin API with an operator token, runs the fleet, and
prints each committed round as it lands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import pathlib
import secrets
import tempfile
import time
from collections.abc import Callable

import numpy as np

from device_runtime import constants as protocol
from device_runtime.channel import open_channel
from device_runtime.clock import RealClock
from protos import admin_pb2, admin_pb2_grpc
from server.certificates import loopback_security
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.device_identity import DeviceIdentities
from server.enrollment.config import EnrollmentPolicy
from server.evaluation import HeldOutEvaluator
from server.flood_limits import LOOPBACK_NETWORKS, NetworkSettings
from server.grpc_service import CoordinatorServer, admin_max_message_bytes
from server.operator_access import AdminTokens, Role, bearer_metadata
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    phones: int = 50
    rounds: int = 10
    clients_per_round: int = 10
    alpha: float = 0.5
    epochs: int = 10
    batch_size: int = 10
    client_learning_rate: float = 0.2
    server_learning_rate: float = 1.0
    hidden_units: int = 64
    seed: int = 0
    data_dir: str | None = None
    metrics_address: str | None = None  # host:port for Prometheus metrics, as in `serve`


@dataclasses.dataclass(frozen=True)
class DemoResult:
    rounds: list[admin_pb2.RoundSummary]
    model_bytes: int
    num_parameters: int
    wall_time_s: float
    fleet_outcomes: dict[str, int]

    @property
    def final_accuracy(self) -> float:
        committed = [r for r in self.rounds if r.state == "committed"]
        return committed[-1].metrics["eval/accuracy"] if committed else 0.0


def export_demo_model(settings: DemoSettings, path: pathlib.Path) -> bytes:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tflite_export.exporter import export_model
    from tflite_export.model_zoo import create_digits_mlp

    export_model(
        create_digits_mlp(settings.hidden_units, settings.seed),
        path,
        learning_rate=settings.client_learning_rate,
        batch_size=settings.batch_size,
    )
    return path.read_bytes()


def format_round(r: admin_pb2.RoundSummary) -> str:
    m = r.metrics
    if r.state != "committed":
        return (
            f"round {r.round_number:3d}  {r.state}: {r.reported} reports of {r.selected} selected"
        )
    return (
        f"round {r.round_number:3d}  reports {r.reported:3d}/{r.selected:<3d} "
        f"eval accuracy {m['eval/accuracy']:.4f}  eval loss {m['eval/loss']:.4f}  "
        f"train loss {m['client_work/train/loss']:.4f}  "
        f"broadcast {m['broadcasted_bits'] / 8 / 1e6:7.3f} MB  "
        f"aggregated {m['aggregated_bits'] / 8 / 1e6:7.3f} MB"
    )


async def run_demo(
    settings: DemoSettings,
    on_round: Callable[[admin_pb2.RoundSummary], None],
    on_metrics: Callable[[str], None] = lambda address: None,
) -> DemoResult:
    """`on_metrics` is told the metrics endpoint's address once it serves (with
    `settings.metrics_address` only)."""
    from emulator.data import federated_digits
    from emulator.fleet import Fleet
    from emulator.phone import RandomConditionsSettings
    from server.metrics import CoordinatorMetrics, metrics_served

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="overnight-demo-") as tmp:
        data_dir = pathlib.Path(settings.data_dir or tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        data = federated_digits(settings.phones, alpha=settings.alpha, seed=settings.seed)
        model_bytes = export_demo_model(settings, data_dir / "digits_mlp.tflite")

        store = SqliteStore.in_data_dir(data_dir)
        clock = RealClock()
        # Phones enroll with a throwaway shared secret; all of them connect from this host,
        # so loopback is exempt from the per-network limits.
        enrollment_secret = secrets.token_bytes(32)
        identities = DeviceIdentities(
            store,
            clock,
            EnrollmentPolicy.shared_secret(enrollment_secret),
            networks=NetworkSettings(exempt=LOOPBACK_NETWORKS),
        )
        coordinator = Coordinator(
            store,
            clock,
            # The emulated fleet lives minutes, not days: retry windows start at 0.1 s.
            CoordinatorSettings(pace=PaceSteeringSettings(min_delay_s=0.1, horizon_s=60.0)),
            HeldOutEvaluator(data.test),
            np.random.default_rng(settings.seed),
            identities,
        )
        # The secure path, as in production, with a CA that dies with the demo.
        tls, trust = loopback_security()
        tokens = AdminTokens(data_dir)
        _, operator_token = tokens.create(Role.OPERATOR)
        metrics = CoordinatorMetrics() if settings.metrics_address else None
        observed = [] if metrics is None else [metrics.interceptor()]
        server = CoordinatorServer(
            coordinator,
            "127.0.0.1:0",
            tls=tls,
            admin_tokens=tokens,
            interceptors=observed,
            admin_interceptors=observed,
        )
        await server.start()
        serving = contextlib.AsyncExitStack()
        if metrics is not None and settings.metrics_address:
            slots = server.device_service.upload_slots
            endpoint = await serving.enter_async_context(
                metrics_served(settings.metrics_address, metrics, coordinator, slots)
            )
            on_metrics(endpoint.address)
        assert server.admin_address is not None
        credential = bearer_metadata(operator_token)
        config = TaskConfig(
            task_id="digits-mlp",
            population="digits",
            total_rounds=settings.rounds,
            target_reports=settings.clients_per_round,
            min_reports=max(1, int(0.8 * settings.clients_per_round)),
            selection_deadline_s=2.0,
            reporting_deadline_s=30.0,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            server_learning_rate=settings.server_learning_rate,
        )
        channel = open_channel(
            server.admin_address,
            trust,
            [("grpc.max_send_message_length", admin_max_message_bytes)],
        )
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        registered = await admin.RegisterTask(
            admin_pb2.RegisterTaskRequest(
                protocol_version=protocol.PROTOCOL_VERSION,
                config=config.to_proto(),
                model_tflite=model_bytes,
            ),
            metadata=credential,
        )

        fleet = Fleet(
            server.address,
            trust,
            config.population,
            data.clients,
            seed=settings.seed,
            conditions=RandomConditionsSettings(mean_state_s=20.0),
            enrollment_secret=enrollment_secret,
        )
        stop = asyncio.Event()
        fleet_task = asyncio.create_task(fleet.run(stop))
        seen = 0
        rounds: list[admin_pb2.RoundSummary] = []
        try:
            while True:
                rounds = list(
                    (
                        await admin.ListRounds(
                            admin_pb2.ListRoundsRequest(
                                protocol_version=protocol.PROTOCOL_VERSION, task_id=config.task_id
                            ),
                            metadata=credential,
                        )
                    ).rounds
                )
                for r in rounds[seen:]:
                    on_round(r)
                seen = len(rounds)
                if sum(r.state == "committed" for r in rounds) >= settings.rounds:
                    break
                if fleet_task.done():
                    fleet_task.result()
                    raise RuntimeError("the fleet stopped before the task completed")
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await fleet_task
            await channel.close()
            await serving.aclose()
            await server.stop()
            store.close()
    return DemoResult(
        rounds,
        len(model_bytes),
        registered.num_parameters,
        time.perf_counter() - start,
        dict(fleet.stats.outcomes),
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "demo",
        help="coordinator + 50 emulated phones: 10 rounds of federated training on the digits",
        description=(
            "Exports a digits MLP, starts a coordinator on loopback and a fleet of emulated "
            "phones (non-IID digits), and runs federated averaging, printing held-out accuracy, "
            "reports and transferred bytes per round."
        ),
    )
    defaults = DemoSettings()
    parser.add_argument(
        "--phones", type=int, default=defaults.phones, help="emulated phones (default %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=defaults.rounds, help="rounds (default %(default)s)"
    )
    parser.add_argument(
        "--clients-per-round",
        type=int,
        default=defaults.clients_per_round,
        help="target reports per round (default %(default)s)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help="Dirichlet label skew (default %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="local epochs (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--data-dir", help="keep the model and coordinator state here (default: a temp dir)"
    )
    parser.add_argument(
        "--metrics-address",
        help="host:port to serve the coordinator's Prometheus metrics on while the demo runs "
        "(GET /metrics), as `overnight serve --metrics-address` does; off unless given",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings(
        phones=args.phones,
        rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        alpha=args.alpha,
        epochs=args.epochs,
        seed=args.seed,
        data_dir=args.data_dir,
        metrics_address=args.metrics_address,
    )
    print(
        f"Overnight demo: {settings.phones} emulated phones, {settings.rounds} rounds of "
        f"{settings.clients_per_round}, digits split non-IID (Dirichlet alpha={settings.alpha})",
        flush=True,
    )
    result = asyncio.run(
        run_demo(
            settings,
            lambda r: print(format_round(r), flush=True),
            lambda address: print(f"metrics on http://{address}/metrics", flush=True),
        )
    )
    print(
        f"\nfinal held-out accuracy {result.final_accuracy:.4f} after {settings.rounds} rounds; "
        f"wall time {result.wall_time_s:.1f} s; model {result.model_bytes} bytes "
        f"({result.num_parameters} parameters)"
    )
    print(
        "phone attempts: " + ", ".join(f"{k} {v}" for k, v in sorted(result.fleet_outcomes.items()))
    )
    return 0
