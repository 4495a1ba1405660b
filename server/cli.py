"""`overnight serve`: run the coordinator. The operator's commands that talk to it (`status`,
`task`, `admin-token`) are in server/operator_cli.py."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib
import signal
import sys

import numpy as np

from device_runtime.channel import insecure_warning
from device_runtime.clock import RealClock
from device_runtime.examples import LocalExamples
from server import operator_cli
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.data_dir import DataDirectory, DataDirError, default_full_check_below_bytes
from server.device_identity import DeviceIdentities, IdentitySettings
from server.drain import Ending, abandon_open_rounds, default_drain_timeout_s, wait_for_drain
from server.enrollment.config import EnrollmentPolicy
from server.errors import AlreadyExists, CoordinatorError
from server.evaluation import HeldOutEvaluator
from server.flood_limits import NetworkSettings
from server.grpc_service import CoordinatorServer, freeze_startup_heap
from server.metrics import CoordinatorMetrics, metrics_served
from server.operator_access import (
    FIRST_TOKEN_FILE,
    AdminTokens,
    ensure_first_token,
)
from server.pace_steering import PaceSteeringSettings
from server.retention import RetentionSettings
from server.sqlite_store import SqliteStore
from server.tensorboard_sink import TensorBoardSink
from server.transport_security import ServerTls

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = subparsers.add_parser(
        "serve",
        help="run the coordinator (gRPC; SQLite state in a data directory)",
        description=(
            "Runs the coordinator: the device services on --address and the admin service on "
            "--admin-address, both over TLS (--tls-cert, --tls-key); state in "
            "DATA_DIR/coordinator.sqlite. Restarting with the same data directory resumes every "
            "task from its last committed round. On first start it makes an operator token "
            f"and writes it to DATA_DIR/{FIRST_TOKEN_FILE}. SIGTERM (or SIGINT) drains: "
            "check-ins are turned away, calls under way finish and completed rounds commit "
            "within --drain-timeout, open rounds are recorded abandoned, and it exits 0."
        ),
    )
    serve.add_argument(
        "--address",
        default="127.0.0.1:50051",
        help="host:port for devices (default 127.0.0.1:50051)",
    )
    serve.add_argument(
        "--admin-address",
        default="127.0.0.1:50052",
        help="host:port for the admin service; keep it on loopback or a private network "
        "(default 127.0.0.1:50052)",
    )
    serve.add_argument("--tls-cert", help="the coordinator's certificate chain (PEM)")
    serve.add_argument("--tls-key", help="the coordinator's private key (PEM)")
    serve.add_argument(
        "--operator-ca",
        help="CA (PEM) of operator client certificates: the admin listener then requires one, "
        "and its subject OU (operator or viewer) is the caller's role",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext listeners, no TLS: only for a closed test network",
    )
    serve.add_argument(
        "--data-dir",
        default="overnight-data",
        help="directory for the SQLite store (default ./overnight-data)",
    )
    serve.add_argument(
        "--repair",
        action="store_true",
        help=(
            "if the store fails its start-up check, rebuild it from what is readable, keeping "
            "each task's last good committed round (the damaged file is kept beside it)"
        ),
    )
    serve.add_argument(
        "--full-check-below-mb",
        type=float,
        default=default_full_check_below_bytes / (1 << 20),
        help=(
            "at start, stores smaller than this get SQLite's full integrity_check, larger ones "
            "the faster quick_check (default %(default)g)"
        ),
    )
    serve.add_argument(
        "--task", help="task config (TOML) to register at start, if not yet registered"
    )
    serve.add_argument("--model", help="the task's exported .tflite model (with --task)")
    serve.add_argument(
        "--eval-data", help=".npz with held-out 'x' and 'y' to evaluate each committed round on"
    )
    pace = PaceSteeringSettings()
    serve.add_argument(
        "--min-retry-s",
        type=float,
        default=pace.min_delay_s,
        help="shortest retry window start handed to devices (default %(default)s)",
    )
    serve.add_argument(
        "--max-retry-s",
        type=float,
        default=pace.max_delay_s,
        help="longest retry delay handed to devices (default %(default)s)",
    )
    serve.add_argument(
        "--check-in-capacity",
        type=float,
        help=(
            "check-ins per second this coordinator serves; pace steering spreads devices so "
            "they use at most half of it (default: measured from its own check-in handling)"
        ),
    )
    serve.add_argument("--seed", type=int, help="seed for retry-window jitter")
    serve.add_argument(
        "--retention-s",
        type=float,
        default=RetentionSettings().age_s,
        help=(
            "how long the store keeps assignments and old checkpoints of closed rounds "
            "(default %(default)g s, a week; a task's min_separation_s keeps them longer)"
        ),
    )
    serve.add_argument(
        "--enrollment-secret-file",
        help=(
            "file holding a shared enrollment secret (at least 16 bytes; surrounding "
            "whitespace ignored) that devices of every population present to enroll their "
            "keys; only its salted hash is kept in memory. Without this or "
            "--enrollment-config no device can enroll, so none can check in"
        ),
    )
    serve.add_argument(
        "--enrollment-config",
        help=(
            "TOML file with a verifier per population, overriding --enrollment-secret-file: "
            '[population.NAME] secret_file = "FILE" (a shared secret) or '
            'allowlist_file = "FILE" (device ids, one per line); paths relative to the file'
        ),
    )
    serve.add_argument(
        "--exempt-network",
        action="append",
        default=[],
        metavar="CIDR",
        help=(
            "a network (e.g. 127.0.0.0/8 for an emulated fleet on this host) exempt from the "
            "per-network enrollment rate limit and the tasks' max_network_share; repeatable. "
            "Nothing is exempt by default: phones of an emulated fleet all connect from "
            "loopback, so run `overnight emulate` against a coordinator started with "
            "--exempt-network 127.0.0.0/8"
        ),
    )
    serve.add_argument(
        "--freshness-s",
        type=float,
        default=IdentitySettings().freshness_s,
        help="how far a signed check-in's timestamp may be from this clock (default %(default)s)",
    )
    serve.add_argument(
        "--max-concurrent-uploads",
        type=int,
        default=2,
        help="uploads staged in memory at once; more wait under flow control (default 2)",
    )
    serve.add_argument(
        "--metrics-address",
        help="host:port to serve Prometheus metrics on (GET /metrics); off unless given. "
        "Keep it on loopback or a private network",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=default_drain_timeout_s,
        help="on SIGTERM, seconds to let uploads and downloads under way finish and completed "
        "rounds commit before stopping; a second SIGTERM stops at once (default %(default)g)",
    )
    serve.set_defaults(func=run_serve)
    operator_cli.register(subparsers)


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    """The listeners' TLS from --tls-cert/--tls-key, or None with an explicit --insecure."""
    if args.insecure:
        if args.tls_cert or args.tls_key or args.operator_ca:
            raise ValueError("--insecure excludes --tls-cert, --tls-key and --operator-ca")
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError(
            "serve needs --tls-cert and --tls-key (PEM); for a closed test network only, "
            "--insecure runs without TLS"
        )
    return ServerTls.from_files(args.tls_cert, args.tls_key, args.operator_ca)


async def serve(args: argparse.Namespace, tls: ServerTls | None) -> None:
    data_dir = DataDirectory.open(
        args.data_dir, int(args.full_check_below_mb * (1 << 20)), repair=args.repair
    )
    try:
        await _serve_in(data_dir, args, tls)
    finally:
        data_dir.close()


async def _serve_in(
    data_dir: DataDirectory, args: argparse.Namespace, tls: ServerTls | None
) -> None:
    store = SqliteStore.in_data_dir(data_dir.path)
    first_token = ensure_first_token(args.data_dir)
    evaluator = HeldOutEvaluator(LocalExamples.load(args.eval_data)) if args.eval_data else None
    if args.check_in_capacity is not None and not args.check_in_capacity > 0:
        raise SystemExit("serve: --check-in-capacity must be positive")
    pace = PaceSteeringSettings(
        min_delay_s=args.min_retry_s,
        max_delay_s=args.max_retry_s,
        capacity_check_ins_per_s=args.check_in_capacity,
    )
    if not args.retention_s > 0:
        raise SystemExit("serve: --retention-s must be positive")
    settings = CoordinatorSettings(pace=pace, retention=RetentionSettings(age_s=args.retention_s))
    clock = RealClock()
    try:
        policy = EnrollmentPolicy.from_files(args.enrollment_secret_file, args.enrollment_config)
        networks = NetworkSettings(exempt=tuple(args.exempt_network))
        networks.exempt_networks()  # a malformed CIDR fails here, by name
    except (OSError, ValueError) as exc:
        raise SystemExit(f"serve: {exc}") from None
    identities = DeviceIdentities(
        store, clock, policy, IdentitySettings(freshness_s=args.freshness_s), networks
    )
    if policy.default is None and not policy.by_population:
        print(
            "serve: no --enrollment-secret-file or --enrollment-config: no device can enroll, "
            "so none can check in",
            file=sys.stderr,
        )
    coordinator = Coordinator(
        store, clock, settings, evaluator, np.random.default_rng(args.seed), identities
    )
    tensorboard = TensorBoardSink(pathlib.Path(args.data_dir) / "tensorboard")
    coordinator.observers.append(tensorboard)
    if args.task:
        if not args.model:
            raise SystemExit("--task needs --model")
        config = TaskConfig.from_toml(args.task)
        with contextlib.suppress(AlreadyExists):
            coordinator.register_task(config, pathlib.Path(args.model).read_bytes())
    metrics = CoordinatorMetrics() if args.metrics_address else None
    server = CoordinatorServer(
        coordinator,
        args.address,
        args.max_concurrent_uploads,
        interceptors=[] if metrics is None else [metrics.interceptor()],
        tls=tls,
        admin_address=args.admin_address,
        admin_tokens=AdminTokens(args.data_dir),
    )
    await server.start()
    ending = Ending.INTERRUPTED
    try:
        async with contextlib.AsyncExitStack() as serving:
            if metrics is not None:
                slots = server.device_service.upload_slots
                endpoint = await serving.enter_async_context(
                    metrics_served(args.metrics_address, metrics, coordinator, slots)
                )
                print(f"metrics on http://{endpoint.address}/metrics", flush=True)
            ending = await _serve_until_drained(server, args, tls, first_token)
    finally:
        await server.stop(grace_s=0.0)
    if ending is not Ending.INTERRUPTED:
        abandoned = abandon_open_rounds(coordinator)
        log.info("drain: %d open rounds recorded abandoned", abandoned)
    tensorboard.close()
    store.close()
    print(f"coordinator stopped ({ending.value})", flush=True)


async def _serve_until_drained(
    server: CoordinatorServer,
    args: argparse.Namespace,
    tls: ServerTls | None,
    first_token: pathlib.Path | None,
) -> Ending:
    freeze_startup_heap()
    print(
        f"coordinator listening on {server.address} (devices) and {server.admin_address} "
        f"(admin), {'TLS' if tls is not None else 'PLAINTEXT'}, data in {args.data_dir}",
        flush=True,
    )
    if first_token is not None:
        print(f"operator admin token written to {first_token} (0600)", flush=True)
    # The first signal starts the drain, a second one ends it at once.
    stop, interrupted = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (interrupted if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    print(f"draining (at most {args.drain_timeout:g} s; signal again to stop now)", flush=True)
    await server.begin_drain()
    return await wait_for_drain(
        server.drain_gate, server.coordinator.driver, args.drain_timeout, interrupted
    )


def run_serve(args: argparse.Namespace) -> int:
    """Expected failures end with one line on stderr and exit status 2, never a traceback."""
    try:
        tls = server_tls(args)
        if tls is None:
            print(insecure_warning("serve"), file=sys.stderr, flush=True)
        asyncio.run(serve(args, tls))
    except (CoordinatorError, DataDirError, ValueError, OSError) as exc:
        # OSError: a missing --task/--model/certificate file, a port in use.
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    return 0
