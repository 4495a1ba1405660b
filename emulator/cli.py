"""`overnight emulate`: a fleet of realistic virtual phones against a running coordinator."""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import pathlib
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

import grpc

from device_runtime.channel import ServerTrust, open_blocking_channel
from device_runtime.cli import add_server_option, add_trust_options, trust_from
from emulator.data import ClientDatasets, SampledDigits
from emulator.federated_files import EmnistH5Clients, FederatedFileError, FemnistJsonClients
from emulator.fleet_config import FleetConfig, FleetConfigError

if TYPE_CHECKING:  # the fleet's modules load when `emulate` runs, not when `overnight` starts
    from emulator.fleet_processes import FleetProcesses, WorkerLoss

DAY_S = 86400.0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "emulate",
        help="run N virtual phones (real device runtime, real gRPC) against a coordinator",
        description=(
            "Runs N virtual phones over worker processes, each phone the real device runtime. "
            "Phones live in their own time zones and train only while charging, idle and on "
            "Wi-Fi, mostly at night; their availability follows a virtual clock that runs "
            "--speedup times faster than real time (training and gRPC stay real). Slow device "
            "tiers and networks add delays on top. Runs until interrupted or for --duration "
            "seconds, then writes participation over the simulated time (CSV and PNG)."
        ),
    )
    add_server_option(parser, "127.0.0.1:50051")
    add_trust_options(parser)
    parser.add_argument("--population", default="digits", help="population to check in with")
    parser.add_argument("--phones", type=int, default=50, help="number of phones (default 50)")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes, each an asyncio loop of phones"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help=(
            "lower the workers' CPU priority by this much (0-19; default 0). Use e.g. 10 when "
            "the coordinator runs on the same machine, so the emulated load does not starve it"
        ),
    )
    parser.add_argument(
        "--speedup",
        type=float,
        default=60.0,
        help="virtual seconds per real second for availability (default 60: a day in 24 min)",
    )
    parser.add_argument(
        "--start-hour-utc",
        type=float,
        default=6.0,
        help="virtual UTC hour at start (default 6: night across the Americas)",
    )
    parser.add_argument("--fleet-config", help="TOML file with a [fleet] table (see emulator/)")
    parser.add_argument(
        "--data",
        default="digits",
        help=(
            "client data: 'digits' (shipped, sampled per phone with label and quantity skew), "
            "'emnist-h5:PATH' (TFF's federated EMNIST file) or 'femnist-json:PATH' (LEAF)"
        ),
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="digits: Dirichlet label-skew alpha"
    )
    parser.add_argument(
        "--mean-examples", type=float, default=40.0, help="digits: mean examples per phone"
    )
    parser.add_argument("--seed", type=int, help="fleet seed (overrides the fleet config)")
    parser.add_argument(
        "--enrollment-secret-file",
        help=(
            "file holding the population's shared enrollment secret (the coordinator's "
            "--enrollment-secret-file); each phone enrolls a key derived from the fleet seed"
        ),
    )
    parser.add_argument("--duration", type=float, help="stop after this many real seconds")
    parser.add_argument(
        "--report-dir", help="write participation.csv and participation.png here at the end"
    )
    parser.add_argument(
        "--task",
        help="with --report-dir: also fetch this task's rounds from the coordinator's admin "
        "service (rounds.csv; needs --admin-server and an admin token)",
    )
    parser.add_argument(
        "--admin-server", default="127.0.0.1:50052", help="the coordinator's admin host:port"
    )
    parser.add_argument(
        "--admin-token-file",
        help="with --task: file holding an admin token (else OVERNIGHT_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--tolerate-worker-loss",
        action="store_true",
        help=(
            "when a worker process dies, run on with the other workers and exit 0 (by default "
            "the fleet stops at once and emulate exits 1); the dead worker's phones count as "
            "lost either way"
        ),
    )
    parser.add_argument(
        "--save-test-split",
        metavar="NPZ",
        help="digits: write the held-out split (for `overnight serve --eval-data`) and continue",
    )
    parser.set_defaults(func=run)


def client_datasets(args: argparse.Namespace, seed: int) -> ClientDatasets:
    kind, _, path = args.data.partition(":")
    if kind == "digits":
        return SampledDigits(alpha=args.alpha, mean_examples=args.mean_examples, seed=seed)
    if kind == "emnist-h5" and path:
        source = EmnistH5Clients(path)
        source.client_ids()  # fail now, not in a worker
        return source
    if kind == "femnist-json" and path:
        return FemnistJsonClients(path)
    raise ValueError(f"--data {args.data!r}: expected digits, emnist-h5:PATH or femnist-json:PATH")


def write_causes_csv(causes: collections.Counter[str], path: pathlib.Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["cause", "dropouts"])
        writer.writerows(causes.most_common())


def write_rounds_csv(
    admin_server: str, trust: ServerTrust, token: str | None, task_id: str, path: pathlib.Path
) -> None:
    """Per-round selection, reports, dropouts and duration, as the coordinator recorded them
    (its admin service, with a viewer or operator token)."""
    from device_runtime import constants as protocol
    from protos import admin_pb2, admin_pb2_grpc
    from server.operator_access import bearer_metadata

    with open_blocking_channel(admin_server, trust) as channel:
        rounds = (
            admin_pb2_grpc.AdminServiceStub(channel)
            .ListRounds(
                admin_pb2.ListRoundsRequest(
                    protocol_version=protocol.PROTOCOL_VERSION, task_id=task_id
                ),
                timeout=30,
                metadata=bearer_metadata(token),
            )
            .rounds
        )
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["round", "state", "selected", "reported", "dropped", "seconds"])
        for r in rounds:
            seconds = r.finished_at - r.started_at if r.finished_at else float("nan")
            writer.writerow(
                [r.round_number, r.state, r.selected, r.reported, r.dropped, f"{seconds:.2f}"]
            )


def run(args: argparse.Namespace) -> int:
    from emulator.fleet_processes import FleetProcesses
    from emulator.fleet_worker import FleetSpec

    try:
        config = FleetConfig.from_toml(args.fleet_config) if args.fleet_config else FleetConfig()
        config = dataclasses.replace(
            config,
            phones=args.phones,
            seed=config.seed if args.seed is None else args.seed,
        ).validate()
        datasets = client_datasets(args, config.seed)
        if args.save_test_split:
            if not isinstance(datasets, SampledDigits):
                raise ValueError("--save-test-split needs --data digits")
            datasets.test().save(args.save_test_split)
        if args.speedup <= 0 or args.workers < 1:
            raise ValueError("--speedup must be positive and --workers >= 1")
        if not 0 <= args.nice <= 19:
            raise ValueError(f"--nice must be within 0..19, got {args.nice}")
        secret = (
            pathlib.Path(args.enrollment_secret_file).read_bytes().strip()
            if args.enrollment_secret_file
            else b""
        )
        trust = trust_from(args, "emulate")
    except (FleetConfigError, FederatedFileError, ValueError, OSError) as exc:
        print(f"emulate: {exc}", file=sys.stderr)
        return 2

    day = int(time.time() // DAY_S)
    spec = FleetSpec(
        target=args.server,
        trust=trust,
        population=args.population,
        config=config,
        datasets=datasets,
        virtual_start_s=day * DAY_S + args.start_hour_utc * 3600.0,
        speedup=args.speedup,
        anchor_s=time.time(),
        enrollment_secret=secret,
    )
    fleet = FleetProcesses(spec, args.workers, args.nice)
    print(
        f"{args.phones} phones in {args.workers} worker(s) checking in with {args.server} "
        f"(population {args.population!r}); a virtual day lasts {DAY_S / args.speedup / 60:.1f} "
        "real minutes",
        flush=True,
    )
    fleet.start()
    workers = "; ".join(f"pid {pid}: {len(p)} phones" for pid, p in fleet.phones_by_pid.items())
    print(f"fleet workers: {workers}", flush=True)
    lost = _run_fleet(fleet, args.duration, args.tolerate_worker_loss)
    report = fleet.stop()
    for loss in report.lost:
        if loss not in lost:  # died or hung while stopping
            print(f"emulate: {loss.describe()}", file=sys.stderr, flush=True)
    outcomes = report.participation.outcomes
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    print(
        f"phones: {report.phones} ran to the end, {report.phones_lost} lost with "
        f"{len(report.lost)} worker(s) that died",
        flush=True,
    )
    causes = report.participation.causes
    if causes:
        print("dropout causes: " + ", ".join(f"{k} {v}" for k, v in causes.most_common()))
    print(f"emulator peak memory (sum of workers): {report.peak_rss_bytes / 2**20:.0f} MiB")
    if args.report_dir:
        out = pathlib.Path(args.report_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.participation.write_csv(out / "participation.csv")
        title = f"{args.phones} emulated phones, population {args.population}"
        report.participation.plot(out / "participation.png", title)
        write_causes_csv(report.participation.causes, out / "dropout_causes.csv")
        written = ["participation.csv", "participation.png", "dropout_causes.csv"]
        if args.task:
            from server.operator_access import read_admin_token

            try:
                token = read_admin_token(args.admin_token_file)
                write_rounds_csv(args.admin_server, trust, token, args.task, out / "rounds.csv")
                written.append("rounds.csv")
            except (grpc.RpcError, OSError) as exc:
                print(f"emulate: cannot list rounds of {args.task!r}: {exc}", file=sys.stderr)
        print(f"report written to {out}: {', '.join(written)}")
    return 1 if report.lost and not args.tolerate_worker_loss else 0


def _run_fleet(
    fleet: FleetProcesses, duration_s: float | None, tolerate_loss: bool
) -> list[WorkerLoss]:
    """Runs until `duration_s`, SIGINT/SIGTERM, or (unless `tolerate_loss`) a worker's death,
    which is reported the moment it happens. Returns the workers that died."""
    interrupted = threading.Event()
    wake_reader, wake_writer = socket.socketpair()
    wake_writer.setblocking(False)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: interrupted.set())
    # The signal's number lands on the socket, so waiting on it wakes the loop below at once.
    previous_fd = signal.set_wakeup_fd(wake_writer.fileno(), warn_on_full_buffer=False)
    end = None if duration_s is None else time.monotonic() + duration_s
    lost: list[WorkerLoss] = []
    try:
        while not interrupted.is_set() and fleet.running:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            died = fleet.wait(remaining, wake=[wake_reader])
            for loss in died:
                print(f"emulate: {loss.describe()}", file=sys.stderr, flush=True)
            lost += died
            if died and not tolerate_loss:
                print(
                    "emulate: stopping the fleet (--tolerate-worker-loss runs on without them)",
                    file=sys.stderr,
                    flush=True,
                )
                break
    finally:
        signal.set_wakeup_fd(previous_fd)
        wake_reader.close()
        wake_writer.close()
    return lost
