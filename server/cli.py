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
from server.errors import AlreadyExists, CoordinatorError
from server.evaluation import HeldOutEvaluator
from server.grpc_service import CoordinatorServer
from server.pace_steering import PaceSteeringSettings
from server.sqlite_store import SqliteStore

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
    serve.set_defaults(func=run_serve)

    status = subparsers.add_parser("status", help="show a task's state and round history")
    status.add_argument("--server", default="127.0.0.1:50051", help="coordinator host:port")
    status.add_argument("--task", required=True, help="task id")
    status.set_defaults(func=run_status)


async def serve(args: argparse.Namespace) -> None:
    store = SqliteStore.in_data_dir(args.data_dir)
    evaluator = HeldOutEvaluator(LocalExamples.load(args.eval_data)) if args.eval_data else None
    pace = PaceSteeringSettings(min_delay_s=args.min_retry_s, max_delay_s=args.max_retry_s)
    settings = CoordinatorSettings(pace=pace)
    coordinator = Coordinator(
        store, RealClock(), settings, evaluator, np.random.default_rng(args.seed)
    )
    if args.task:
        if not args.model:
            raise SystemExit("--task needs --model")
        config = TaskConfig.from_toml(args.task)
        with contextlib.suppress(AlreadyExists):
            coordinator.register_task(config, pathlib.Path(args.model).read_bytes())
    server = CoordinatorServer(coordinator, args.address)
    await server.start()
    print(f"coordinator listening on {server.address}, data in {args.data_dir}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    store.close()


def run_serve(args: argparse.Namespace) -> int:
    try:
        asyncio.run(serve(args))
    except CoordinatorError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    return 0


def run_status(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.server) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            status = stub.GetTaskStatus(
                admin_pb2.GetTaskStatusRequest(
                    protocol_version=protocol.PROTOCOL_VERSION, task_id=args.task
                )
            )
            rounds = stub.ListRounds(
                admin_pb2.ListRoundsRequest(
                    protocol_version=protocol.PROTOCOL_VERSION, task_id=args.task
                )
            ).rounds
        except grpc.RpcError as exc:
            print(f"status: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(
        f"task {status.config.task_id} ({status.config.population}): {status.state}, "
        f"{status.committed_rounds}/{status.config.total_rounds} rounds committed, "
        f"{status.num_parameters} parameters"
    )
    if status.HasField("current_round"):
        r = status.current_round
        print(
            f"current round {r.round_number}: {r.state}, "
            f"{r.selected} selected, {r.reported} reported"
        )
    for r in rounds:
        acc = r.metrics.get("eval/accuracy")
        print(
            f"  round {r.round_number:4d} {r.state:9s} "
            f"reported {r.reported:4d} dropped {r.dropped:4d}"
            + (f" eval accuracy {acc:.4f}" if acc is not None else "")
        )
    return 0
