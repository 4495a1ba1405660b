"""`overnight device`: the device runtime as a standalone process. Never imports TensorFlow."""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys

import numpy as np

from device_runtime.cache import ResourceCache
from device_runtime.channel import ServerTrust, insecure_warning, target_and_options
from device_runtime.clock import RealClock
from device_runtime.conditions import AlwaysEligible
from device_runtime.examples import LocalExamples
from device_runtime.identity import DeviceKey, IdentityError
from device_runtime.runtime import Attempt, DeviceRuntime
from device_runtime.transport import CoordinatorClient


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "device",
        help="run the device runtime: check in, train with LiteRT, upload updates",
        description=(
            "Runs one device against a coordinator. It checks in, honours the retry windows it "
            "is given, downloads the model and weights (cached by hash), trains on its local "
            "examples with LiteRT and uploads the weight delta. Needs no TensorFlow. This build "
            "treats the device as always charging, idle and unmetered (an edge box); phones get "
            "their conditions from the platform."
        ),
    )
    add_server_option(parser, "127.0.0.1:50051")
    add_trust_options(parser)
    parser.add_argument("--population", required=True, help="population to check in with")
    parser.add_argument(
        "--examples", required=True, help=".npz file with local examples 'x' and 'y'"
    )
    parser.add_argument(
        "--cache-dir",
        default=str(_default_cache_dir()),
        help=(
            "directory for downloads and the device's key (device_key.pem, mode 0600, made on "
            "first run; the device id is the SHA-256 of its public key) (default %(default)s)"
        ),
    )
    parser.add_argument(
        "--enrollment-secret-file",
        help=(
            "file holding the population's shared enrollment secret, presented once to enroll "
            "the device's key (not needed where the coordinator uses a key allowlist)"
        ),
    )
    parser.add_argument("--max-reports", type=int, help="exit after this many accepted updates")
    parser.add_argument("--seed", type=int, help="seed for shuffling and retry jitter")
    parser.set_defaults(func=run)


def _default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "overnight-device"


def _print_attempt(attempt: Attempt) -> None:
    where = f" round {attempt.round_number}" if attempt.round_number >= 0 else ""
    detail = f": {attempt.detail}" if attempt.detail else ""
    print(
        f"{attempt.outcome.value}{where}{detail}; next check-in in {attempt.next_delay_s:.1f}s",
        flush=True,
    )


def add_server_option(parser: argparse.ArgumentParser, default: str) -> None:
    """--server, as the device and the emulator take it: one or several coordinators."""
    parser.add_argument(
        "--server",
        default=default,
        help=(
            "the coordinator(s): host:port, where a DNS name with several addresses means "
            "several coordinators; or a comma-separated list of IP address:port, all IPv4 or "
            "all IPv6 ([::1]:50051); or a gRPC dns: target (dns://DNS-SERVER/host:port). Calls "
            "are spread round robin over the coordinators whose connection is up, and a call "
            "that fails UNAVAILABLE is tried on the next one (default %(default)s)"
        ),
    )


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    """--root-certs, --server-name and --insecure, as every command that dials a coordinator
    takes them."""
    parser.add_argument(
        "--root-certs",
        help="CA certificates (PEM) that may sign the coordinator's certificate "
        "(default: the system trust store)",
    )
    parser.add_argument(
        "--server-name",
        help="the name the coordinators' TLS certificate must carry (default: the host in "
        "--server; needed when --server lists different IP addresses)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no TLS: only against a coordinator run with --insecure",
    )


def trust_from(args: argparse.Namespace, command: str) -> ServerTrust:
    """The ServerTrust the options ask for; warns on stderr when it is plaintext. Checks that
    `--server` can be dialed under it (raises ValueError with the reason)."""
    trust = ServerTrust.from_files(args.root_certs, args.insecure, args.server_name)
    target_and_options(args.server, trust)
    if trust.insecure:
        print(insecure_warning(command), file=sys.stderr, flush=True)
    return trust


async def _run(args: argparse.Namespace, trust: ServerTrust) -> None:
    key = DeviceKey.load_or_create(args.cache_dir)
    secret = b""
    if args.enrollment_secret_file:
        secret = pathlib.Path(args.enrollment_secret_file).read_bytes().strip()
    print(f"device {key.device_id}", flush=True)
    client = CoordinatorClient(args.server, trust, key=key)
    runtime = DeviceRuntime(
        client=client,
        population=args.population,
        enrollment_secret=secret,
        examples=LocalExamples.load(args.examples),
        conditions=AlwaysEligible(),
        clock=RealClock(),
        rng=np.random.default_rng(args.seed),
        cache=ResourceCache(args.cache_dir),
        on_attempt=_print_attempt,
    )
    try:
        await runtime.run(max_reports=args.max_reports)
    finally:
        await client.close()


def run(args: argparse.Namespace) -> int:
    try:
        trust = trust_from(args, "device")
        asyncio.run(_run(args, trust))
    except (OSError, ValueError, IdentityError) as exc:
        print(f"device: {exc}", file=sys.stderr)
        return 2
    return 0
