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
from typing import TYPE_CHECKING

import numpy as np

from device_runtime import logs
from device_runtime.channel import insecure_warning
from device_runtime.clock import RealClock
from device_runtime.examples import LocalExamples
from server import backup, operator_cli
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.coordinator_config import add_config_option
from server.data_dir import DataDirectory, DataDirError, default_full_check_below_bytes
from server.device_identity import DeviceIdentities, IdentitySettings, SharedLimits
from server.drain import (
    Ending,
    abandon_open_rounds,
    default_drain_timeout_s,
    run_to_exit,
    wait_for_drain,
)
from server.enrollment.config import EnrollmentPolicy
from server.errors import AlreadyExists, CoordinatorError
from server.evaluation import HeldOutEvaluator
from server.flood_limits import NetworkSettings
from server.grpc_service import CoordinatorServer, freeze_startup_heap
from server.leases import default_lease_s
from server.metrics import CoordinatorMetrics, metrics_served
from server.operator_access import (
    FIRST_TOKEN_FILE,
    AdminTokens,
    ensure_first_token,
)
from server.pace_steering import PaceSteeringSettings
from server.retention import RetentionSettings
from server.schema_migrations import IncompatibleStore
from server.store import Store
from server.store_location import check_location, is_postgres, open_store
from server.tensorboard_sink import TensorBoardSink
from server.transport_security import ServerTls

if TYPE_CHECKING:  # psycopg and the replica modules load only for `serve --replica`
    from server.replica_forwarding import ReplicaFront

log = logging.getLogger(__name__)
# Progress lines ("listening on ...") go to stdout in the chosen --log-format, at any level.
status = logging.getLogger("overnight.serve")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = subparsers.add_parser(
        "serve",
        help="run the coordinator (gRPC; SQLite state in a data directory)",
        description=(
            "Runs the coordinator: the device services on --address and the admin service on "
            "--admin-address, both over TLS (--tls-cert, --tls-key); state in "
            "DATA_DIR/coordinator.sqlite, or in the PostgreSQL database --store names. "
            "Restarting on the same store resumes every task from its last committed round. "
            "On first start it makes an operator token "
            f"and writes it to DATA_DIR/{FIRST_TOKEN_FILE}. SIGTERM (or SIGINT) drains: "
            "check-ins are turned away, calls under way finish and completed rounds commit "
            "within --drain-timeout, open rounds are recorded abandoned, and it exits 0. "
            "Every flag can also be set in a TOML file given with --config."
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
        help="directory for the SQLite store, the operator tokens and TensorBoard logs "
        "(default ./overnight-data)",
    )
    serve.add_argument(
        "--store",
        metavar="URL",
        help="keep the state in this PostgreSQL database (postgresql://USER@HOST:PORT/DB; "
        "libpq reads the password from PGPASSWORD or ~/.pgpass) instead of "
        "DATA_DIR/coordinator.sqlite; one coordinator per database, or several with --replica",
    )
    serve.add_argument(
        "--replica",
        action="store_true",
        help="run as one of several replicas on the PostgreSQL database --store names: any "
        "replica serves any device, each task is driven by one of them (a lease of "
        f"{default_lease_s:g} s; another takes over when it dies), and each hands the uploads "
        "it received to that leader when a round closes. A secure_aggregator() task's rounds "
        "are hosted by its leader; the other replicas forward its devices' calls there",
    )
    serve.add_argument(
        "--replica-address",
        metavar="HOST:PORT",
        help="where the other replicas reach this one to forward secure tasks' calls (default "
        "the device address as bound); its certificate must be valid for it",
    )
    serve.add_argument(
        "--replica-root-certs",
        metavar="PEM",
        help="the certificate authorities replicas' certificates are checked against when one "
        "forwards to another (default the system's)",
    )
    serve.add_argument(
        "--replica-server-name",
        metavar="NAME",
        help="the name replicas' certificates carry, when it is not the host in their addresses",
    )
    serve.add_argument(
        "--replica-name",
        metavar="NAME",
        help="this replica's name in `overnight status` (default host:pid@address)",
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
    serve.add_argument(
        "--demand-margin",
        type=float,
        default=pace.demand_margin,
        help=(
            "a population too large to bunch into one round comes back at most this many "
            "times as fast as its task's rounds take devices (a selection quota per "
            "reporting time), instead of all checking in for each round; 0 turns the "
            "bound off (default %(default)s)"
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
    serve.add_argument(
        "--log-format",
        choices=logs.LOG_FORMATS,
        default=logs.TEXT,
        help="text (default, for people) or json: one object per line with time, level, "
        "logger, message, and task, round and device where they apply (device ids only at "
        "-vv, debug); progress lines on stdout take the same format",
    )
    add_config_option(serve)  # last: its --help line comes after the flags it can set
    serve.set_defaults(func=run_serve)
    operator_cli.register(subparsers)
    backup.register(subparsers)


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
    check_location(args.store)
    data_dir = DataDirectory.open(
        args.data_dir,
        int(args.full_check_below_mb * (1 << 20)),
        repair=args.repair,
        sqlite_store=not is_postgres(args.store),
    )
    try:
        await _serve_in(data_dir, args, tls)
    finally:
        data_dir.close()


async def _serve_in(
    data_dir: DataDirectory, args: argparse.Namespace, tls: ServerTls | None
) -> None:
    replica = bool(args.replica)
    store = open_store(args.store, data_dir.path, replica=replica)
    first_token = ensure_first_token(args.data_dir)
    evaluator = HeldOutEvaluator(LocalExamples.load(args.eval_data)) if args.eval_data else None
    if args.check_in_capacity is not None and not args.check_in_capacity > 0:
        raise SystemExit("serve: --check-in-capacity must be positive")
    if not args.demand_margin >= 0:
        raise SystemExit("serve: --demand-margin must be 0 (off) or positive")
    pace = PaceSteeringSettings(
        min_delay_s=args.min_retry_s,
        max_delay_s=args.max_retry_s,
        capacity_check_ins_per_s=args.check_in_capacity,
        demand_margin=args.demand_margin or None,
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
        raise ValueError(str(exc)) from None
    identities = DeviceIdentities(
        store,
        clock,
        policy,
        IdentitySettings(freshness_s=args.freshness_s),
        networks,
        _shared_enrollment_limits(store, networks) if replica else None,
    )
    if policy.default is None and not policy.by_population:
        _warn(
            args,
            "serve: no --enrollment-secret-file or --enrollment-config: no device can enroll, "
            "so none can check in",
        )
    coordinator = (
        replica_coordinator(store, clock, args, settings, evaluator, identities)
        if replica
        else Coordinator(
            store, clock, settings, evaluator, np.random.default_rng(args.seed), identities
        )
    )
    tensorboard = TensorBoardSink(pathlib.Path(args.data_dir) / "tensorboard")
    coordinator.observers.append(tensorboard)
    if args.task:
        if not args.model:
            raise ValueError("--task needs --model")
        config = TaskConfig.from_toml(args.task)
        with contextlib.suppress(AlreadyExists):
            coordinator.register_task(config, pathlib.Path(args.model).read_bytes())
    metrics = CoordinatorMetrics() if args.metrics_address else None
    observed = [] if metrics is None else [metrics.interceptor()]  # both listeners' RPCs
    front = replica_front(coordinator, args, tls) if replica else None
    server = CoordinatorServer(
        coordinator,
        args.address,
        args.max_concurrent_uploads,
        interceptors=observed,
        admin_interceptors=observed,
        tls=tls,
        admin_address=args.admin_address,
        admin_tokens=AdminTokens(args.data_dir),
        device_service=front.device_service if front is not None else None,
        secagg_service=front.secagg_service if front is not None else None,
    )
    if front is not None:
        front.publish(args.replica_address or server.address)
    await server.start()
    ending = Ending.INTERRUPTED
    try:
        async with contextlib.AsyncExitStack() as serving:
            if metrics is not None:
                slots = server.device_service.upload_slots
                endpoint = await serving.enter_async_context(
                    metrics_served(args.metrics_address, metrics, coordinator, slots)
                )
                status.info("metrics on http://%s/metrics", endpoint.address)
            ending = await _serve_until_drained(server, args, tls, first_token)
    finally:
        await server.stop(grace_s=0.0)
        if front is not None:
            await front.close()
    if ending is not Ending.INTERRUPTED:
        abandoned = abandon_open_rounds(coordinator)
        log.info("drain: %d open rounds recorded abandoned", abandoned)
    if replica:
        with contextlib.suppress(CoordinatorError):  # else its leases expire, as on a crash
            coordinator.leave()  # type: ignore[attr-defined]
    tensorboard.close()
    store.close()
    status.info("coordinator stopped (%s)", ending.value)


def _shared_enrollment_limits(store: Store, networks: NetworkSettings) -> SharedLimits:
    from server.postgres_store import PostgresStore
    from server.shared_rate_limits import shared_enrollment_limits

    assert isinstance(store, PostgresStore)
    return shared_enrollment_limits(store, networks)


def replica_coordinator(
    store: Store,
    clock: RealClock,
    args: argparse.Namespace,
    settings: CoordinatorSettings,
    evaluator: HeldOutEvaluator | None,
    identities: DeviceIdentities,
) -> Coordinator:
    """`serve --replica`: a coordinator sharing its PostgreSQL database with other replicas."""
    from server.postgres_store import PostgresStore
    from server.replica_coordinator import ReplicaCoordinator, replica_name

    assert isinstance(store, PostgresStore)
    name = args.replica_name or replica_name(args.address)
    rng = np.random.default_rng(args.seed)
    return ReplicaCoordinator(store, clock, name, settings, evaluator, rng, identities)


def replica_front(
    coordinator: Coordinator, args: argparse.Namespace, tls: ServerTls | None
) -> ReplicaFront:
    """A replica's device services, which forward secure tasks' calls to their host."""
    from server.replica_coordinator import ReplicaCoordinator
    from server.replica_forwarding import ReplicaFront

    assert isinstance(coordinator, ReplicaCoordinator)
    roots = pathlib.Path(args.replica_root_certs).read_bytes() if args.replica_root_certs else None
    return ReplicaFront.build(
        coordinator, args.max_concurrent_uploads, tls is not None, roots, args.replica_server_name
    )


async def _serve_until_drained(
    server: CoordinatorServer,
    args: argparse.Namespace,
    tls: ServerTls | None,
    first_token: pathlib.Path | None,
) -> Ending:
    freeze_startup_heap()
    # The first signal starts the drain, a second one ends it at once. Handled before the
    # listening line: a process manager may signal as soon as it reads it.
    stop, interrupted = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (interrupted if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    status.info(
        "coordinator listening on %s (devices) and %s (admin), %s, data in %s",
        server.address,
        server.admin_address,
        "TLS" if tls is not None else "PLAINTEXT",
        args.data_dir,
    )
    if first_token is not None:
        status.info("operator admin token written to %s (0600)", first_token)
    await stop.wait()
    status.info("draining (at most %g s; signal again to stop now)", args.drain_timeout)
    await server.begin_drain()
    return await wait_for_drain(
        server.drain_gate, server.coordinator.driver, args.drain_timeout, interrupted
    )


def run_serve(args: argparse.Namespace) -> int:
    """Expected failures end with one line on stderr and exit status 2, never a traceback."""
    logs.use_format(args.log_format)
    logs.status_logger(status.name, args.log_format)
    try:
        tls = server_tls(args)
        if tls is None:
            _warn(args, insecure_warning("serve"))
        run_to_exit(serve(args, tls))
    except (CoordinatorError, DataDirError, IncompatibleStore, ValueError, OSError) as exc:
        # OSError: a missing --task/--model/certificate file, a port in use.
        _warn(args, f"serve: {exc}", logging.ERROR)
        return 2
    return 0


def _warn(args: argparse.Namespace, message: str, level: int = logging.WARNING) -> None:
    """One line on stderr: as it is in text, a log record in JSON (every line of a JSON
    log parses)."""
    if args.log_format == logs.JSON:
        log.log(level, message)
    else:
        print(message, file=sys.stderr, flush=True)
