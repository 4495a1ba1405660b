"""`overnight serve` and `overnight status`: run the coordinator, and look at it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import pathlib
import signal
import sys

import grpc
import numpy as np

from device_runtime import constants as protocol
from device_runtime.clock import RealClock
from device_runtime.examples import LocalExamples
from protos import admin_pb2, admin_pb2_grpc
from server.config import TaskConfig
from server.coordinator import Coordinator, CoordinatorSettings
from server.device_identity import DeviceIdentities, IdentitySettings
from server.enrollment.config import EnrollmentPolicy
from server.errors import AlreadyExists, CoordinatorError
from server.evaluation import HeldOutEvaluator
from server.flood_limits import NetworkSettings
from server.grpc_service import CoordinatorServer, admin_max_message_bytes, freeze_startup_heap
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore
from server.tensorboard_sink import TensorBoardSink

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = subparsers.add_parser(
        "serve",
        help="run the coordinator (gRPC; SQLite state in a data directory)",
        description=(
            "Runs the coordinator: device and admin gRPC services on one port, state in "
            "DATA_DIR/coordinator.sqlite. Restarting with the same data directory resumes every "
            "task from its last committed round."
        ),
    )
    serve.add_argument(
        "--address",
        default="127.0.0.1:50051",
        help="host:port to listen on (default 127.0.0.1:50051)",
    )
    serve.add_argument(
        "--data-dir",
        default="overnight-data",
        help="directory for the SQLite store (default ./overnight-data)",
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
    serve.add_argument("--seed", type=int, help="seed for retry-window jitter")
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
    serve.set_defaults(func=run_serve)

    status = subparsers.add_parser(
        "status",
        help="show populations, tasks, current rounds and recent history",
        description="Without --task: every task by population. With --task: its round history.",
    )
    status.add_argument("--server", default="127.0.0.1:50051", help="coordinator host:port")
    status.add_argument("--task", help="show this task's round history")
    status.add_argument(
        "--last", type=int, default=20, help="rounds of history to show (default 20)"
    )

    task = subparsers.add_parser("task", help="manage tasks on a running coordinator")
    task_commands = task.add_subparsers(dest="task_command", metavar="ACTION", required=True)
    create = task_commands.add_parser(
        "create",
        help="register a task from a TOML config and an exported model",
        description=(
            "Registers a task on a running coordinator through its admin API. The config is a "
            "TOML file with a [task] table; a wrong field is reported by name."
        ),
    )
    create.add_argument("config", help="task config (TOML)")
    create.add_argument("--model", required=True, help="exported .tflite training model")
    create.add_argument("--initial-weights", help="optional .npy float32 vector of initial weights")
    create.add_argument("--server", default="127.0.0.1:50051", help="coordinator host:port")
    create.set_defaults(func=run_task_create)
    status.set_defaults(func=run_status)


async def serve(args: argparse.Namespace) -> None:
    store = SqliteStore.in_data_dir(args.data_dir)
    evaluator = HeldOutEvaluator(LocalExamples.load(args.eval_data)) if args.eval_data else None
    pace = PaceSteeringSettings(min_delay_s=args.min_retry_s, max_delay_s=args.max_retry_s)
    settings = CoordinatorSettings(pace=pace)
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
    server = CoordinatorServer(coordinator, args.address, args.max_concurrent_uploads)
    await server.start()
    freeze_startup_heap()
    print(f"coordinator listening on {server.address}, data in {args.data_dir}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    tensorboard.close()
    store.close()


def run_serve(args: argparse.Namespace) -> int:
    try:
        asyncio.run(serve(args))
    except CoordinatorError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _admin(server: str) -> tuple[grpc.Channel, admin_pb2_grpc.AdminServiceStub]:
    channel = grpc.insecure_channel(
        server,
        options=[("grpc.max_send_message_length", admin_max_message_bytes)],
    )
    return channel, admin_pb2_grpc.AdminServiceStub(channel)


def _print_round(r: admin_pb2.RoundSummary) -> None:
    acc = r.metrics.get("eval/accuracy")
    loss = r.metrics.get("client_work/train/loss")
    print(
        f"  round {r.round_number:4d} {r.state:10s} selected {r.selected:5d} "
        f"reported {r.reported:5d} dropped {r.dropped:5d}"
        + (f"  train loss {loss:.4f}" if loss is not None else "")
        + (f"  eval accuracy {acc:.4f}" if acc is not None else "")
    )


def run_status(args: argparse.Namespace) -> int:
    channel, stub = _admin(args.server)
    version = protocol.PROTOCOL_VERSION
    try:
        with channel:
            tasks = stub.ListTasks(admin_pb2.ListTasksRequest(protocol_version=version)).tasks
            rounds = (
                stub.ListRounds(
                    admin_pb2.ListRoundsRequest(protocol_version=version, task_id=args.task)
                ).rounds
                if args.task
                else []
            )
    except grpc.RpcError as exc:
        print(f"status: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    by_population: dict[str, list[admin_pb2.TaskStatus]] = {}
    for t in tasks:
        by_population.setdefault(t.config.population, []).append(t)
    if not tasks:
        print("no tasks registered")
    for population, members in sorted(by_population.items()):
        print(f"population {population}")
        for t in members:
            if args.task and t.config.task_id != args.task:
                continue
            print(
                f"  task {t.config.task_id}: {t.state}, {t.committed_rounds}/"
                f"{t.config.total_rounds} rounds committed, {t.num_parameters} parameters, "
                f"server optimizer {t.config.server_optimizer.name or 'sgd'}"
            )
            if t.HasField("current_round"):
                r = t.current_round
                print(
                    f"    latest round {r.round_number}: {r.state}, {r.selected} selected, "
                    f"{r.reported} reported"
                )
    if args.task:
        print(f"history of {args.task}:")
        for r in rounds[-args.last :]:
            _print_round(r)
    return 0


def run_task_create(args: argparse.Namespace) -> int:
    try:
        config = TaskConfig.from_toml(args.config)
    except CoordinatorError as exc:
        print(f"task create: {exc}", file=sys.stderr)
        return 2
    initial = b""
    if args.initial_weights:
        initial = np.load(args.initial_weights).astype("<f4").tobytes()
    request = admin_pb2.RegisterTaskRequest(
        protocol_version=protocol.PROTOCOL_VERSION,
        config=config.to_proto(),
        model_tflite=pathlib.Path(args.model).read_bytes(),
        initial_weights=initial,
    )
    channel, stub = _admin(args.server)
    try:
        with channel:
            response = stub.RegisterTask(request)
    except grpc.RpcError as exc:
        print(f"task create: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(
        f"registered task {response.task_id}: model {response.model_sha256[:12]}, "
        f"{response.num_parameters} parameters"
    )
    return 0
