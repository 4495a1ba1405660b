"""`overnight status`, `overnight task ...` and `overnight admin-token ...`: the operator's
commands. The first two call a running coordinator's admin service with an admin token; the
last manages the hashed tokens of a data directory."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import grpc
import numpy as np

from device_runtime import constants as protocol
from device_runtime.channel import ServerTrust, insecure_warning, open_blocking_channel
from protos import admin_pb2, admin_pb2_grpc
from server.config import TaskConfig
from server.errors import CoordinatorError
from server.grpc_service import admin_max_message_bytes
from server.operator_access import (
    FIRST_TOKEN_FILE,
    TOKEN_ENV,
    AdminTokens,
    Role,
    bearer_metadata,
    read_admin_token,
)
from server.private_files import prepare_data_dir, write_private_file


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = subparsers.add_parser(
        "status",
        help="show populations, tasks, current rounds and recent history",
        description="Without --task: every task by population. With --task: its round history.",
    )
    _add_admin_client_options(status)
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
    _add_admin_client_options(create)
    create.set_defaults(func=run_task_create)
    for action, verb in (
        ("pause", "stop assigning devices until resumed (open rounds run to their deadlines)"),
        ("resume", "let a paused task assign devices again"),
        ("cancel", "end a task for good: its open rounds are abandoned"),
    ):
        control = task_commands.add_parser(action, help=verb, description=f"{action}: {verb}.")
        control.add_argument("task_id", metavar="ID", help="the task")
        _add_admin_client_options(control)
        control.set_defaults(func=run_task_control, action=action)
    status.set_defaults(func=run_status)

    tokens = subparsers.add_parser(
        "admin-token",
        help="create, list or revoke admin tokens of a data directory",
        description=(
            "Admin tokens are kept hashed in DATA_DIR/admin_tokens.json; a running coordinator "
            "sees changes at once. Roles: operator (everything), viewer (status and lists)."
        ),
    )
    token_commands = tokens.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    token_create = token_commands.add_parser("create", help="make a token (shown once)")
    token_create.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default="operator",
        help="operator: everything; viewer: status and lists only (default operator)",
    )
    token_create.add_argument(
        "--output", help="write the token to this file (0600) instead of printing it"
    )
    token_list = token_commands.add_parser("list", help="list token ids and roles")
    token_revoke = token_commands.add_parser("revoke", help="revoke a token by its id")
    token_revoke.add_argument("token_id", metavar="ID")
    for command, func in (
        (token_create, run_token_create),
        (token_list, run_token_list),
        (token_revoke, run_token_revoke),
    ):
        command.add_argument("--data-dir", default="overnight-data", help="coordinator data dir")
        command.set_defaults(func=func)


def _add_admin_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default="127.0.0.1:50052", help="the coordinator's admin host:port"
    )
    parser.add_argument(
        "--admin-token-file",
        help=f"file holding an admin token (else the {TOKEN_ENV} environment variable)",
    )
    parser.add_argument(
        "--root-certs", help="CA certificates (PEM) to verify the coordinator (default: system)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext, no TLS (coordinator run --insecure)"
    )


@dataclasses.dataclass
class AdminConnection:
    """The admin stub on an open channel, and the metadata carrying the caller's token."""

    channel: grpc.Channel
    stub: admin_pb2_grpc.AdminServiceStub
    metadata: tuple[tuple[str, str], ...]


def connect_admin(args: argparse.Namespace, command: str) -> AdminConnection:
    """Opens the admin channel the options ask for. Raises ValueError or OSError."""
    trust = ServerTrust.from_files(args.root_certs, args.insecure)
    if trust.insecure:
        print(insecure_warning(command), file=sys.stderr, flush=True)
    token = read_admin_token(args.admin_token_file)
    if token is None:
        raise ValueError(
            f"needs an admin token: --admin-token-file FILE or {TOKEN_ENV} (serve writes the "
            f"first one to DATA_DIR/{FIRST_TOKEN_FILE})"
        )
    channel = open_blocking_channel(
        args.server, trust, [("grpc.max_send_message_length", admin_max_message_bytes)]
    )
    return AdminConnection(
        channel, admin_pb2_grpc.AdminServiceStub(channel), bearer_metadata(token)
    )


def _print_round(r: admin_pb2.RoundSummary) -> None:
    acc = r.metrics.get("eval/accuracy")
    loss = r.metrics.get("client_work/train/loss")
    print(
        f"  round {r.round_number:4d} {r.state:10s} selected {r.selected:5d} "
        f"reported {r.reported:5d} dropped {r.dropped:5d}"
        + (f"  train loss {loss:.4f}" if loss is not None else "")
        + (f"  eval accuracy {acc:.4f}" if acc is not None else "")
    )


def _print_cluster(cluster: admin_pb2.Cluster) -> None:
    """Replicas (`serve --replica`) only: who is up, who leads what, who served what."""
    if not cluster.replicas:
        return
    print(f"replicas ({len(cluster.replicas)})")
    for r in cluster.replicas:
        print(
            f"  {r.name}{' (answering)' if r.answering else ''}: pid {r.pid} on {r.host}, "
            f"seen {r.seen_s_ago:.1f} s ago, {r.check_ins} check-ins, {r.uploads} uploads, "
            f"{r.forwarded} calls forwarded; replicas reach it at {r.address or '(no address)'}"
        )
    for lease in cluster.leases:
        held = (
            f"lease expires in {lease.expires_in_s:.1f} s"
            if lease.expires_in_s >= 0
            else "lease expired, no leader"
        )
        print(f"  task {lease.task_id}: led by {lease.leader} (epoch {lease.epoch}), {held}")
    for c in cluster.counts:
        print(f"  {c.replica} served task {c.task_id}: {c.selected} selected, {c.reported} uploads")


def run_status(args: argparse.Namespace) -> int:
    try:
        admin = connect_admin(args, "status")
    except (ValueError, OSError) as exc:
        print(f"status: {exc}", file=sys.stderr)
        return 2
    version = protocol.PROTOCOL_VERSION
    try:
        with admin.channel:
            tasks = admin.stub.ListTasks(
                admin_pb2.ListTasksRequest(protocol_version=version), metadata=admin.metadata
            ).tasks
            rounds = (
                admin.stub.ListRounds(
                    admin_pb2.ListRoundsRequest(protocol_version=version, task_id=args.task),
                    metadata=admin.metadata,
                ).rounds
                if args.task
                else []
            )
            cluster = admin.stub.GetCluster(
                admin_pb2.GetClusterRequest(protocol_version=version), metadata=admin.metadata
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
    _print_cluster(cluster)
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
    try:
        admin = connect_admin(args, "task create")
    except (ValueError, OSError) as exc:
        print(f"task create: {exc}", file=sys.stderr)
        return 2
    try:
        with admin.channel:
            response = admin.stub.RegisterTask(request, metadata=admin.metadata)
    except grpc.RpcError as exc:
        print(f"task create: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(
        f"registered task {response.task_id}: model {response.model_sha256[:12]}, "
        f"{response.num_parameters} parameters"
    )
    return 0


def run_task_control(args: argparse.Namespace) -> int:
    command = f"task {args.action}"
    try:
        admin = connect_admin(args, command)
    except (ValueError, OSError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    version = protocol.PROTOCOL_VERSION
    try:
        with admin.channel:
            match args.action:
                case "pause":
                    status = admin.stub.PauseTask(
                        admin_pb2.PauseTaskRequest(protocol_version=version, task_id=args.task_id),
                        metadata=admin.metadata,
                    )
                case "resume":
                    status = admin.stub.ResumeTask(
                        admin_pb2.ResumeTaskRequest(protocol_version=version, task_id=args.task_id),
                        metadata=admin.metadata,
                    )
                case "cancel":
                    status = admin.stub.CancelTask(
                        admin_pb2.CancelTaskRequest(protocol_version=version, task_id=args.task_id),
                        metadata=admin.metadata,
                    )
                case _:
                    raise AssertionError(f"unknown task action {args.action!r}")
    except grpc.RpcError as exc:
        print(f"{command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"task {args.task_id}: {status.state}")
    return 0


def run_token_create(args: argparse.Namespace) -> int:
    prepare_data_dir(args.data_dir)
    entry, token = AdminTokens(args.data_dir).create(Role(args.role))
    if args.output:
        write_private_file(args.output, f"{token}\n".encode())
        print(f"{entry.role.value} token {entry.token_id} written to {args.output} (0600)")
    else:
        print(token)
        print(f"{entry.role.value} token {entry.token_id}; shown once", file=sys.stderr)
    return 0


def run_token_list(args: argparse.Namespace) -> int:
    for entry in AdminTokens(args.data_dir).entries():
        print(f"{entry.token_id}  {entry.role.value}")
    return 0


def run_token_revoke(args: argparse.Namespace) -> int:
    if not AdminTokens(args.data_dir).revoke(args.token_id):
        print(f"admin-token revoke: no token {args.token_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.token_id}")
    return 0
