"""`overnight emulate`: a fleet of virtual phones against a running coordinator."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from emulator.phone import RandomConditionsSettings


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "emulate",
        help="run N virtual phones (real device runtime, real gRPC) against a coordinator",
        description=(
            "Runs N virtual phones in one process. Each holds a non-IID share of the handwritten "
            "digits shipped with scikit-learn (Dirichlet label skew) and runs the real device "
            "runtime, training only while its random conditions say charging, idle and "
            "unmetered. Runs until interrupted or for --duration seconds."
        ),
    )
    parser.add_argument("--server", default="127.0.0.1:50051", help="coordinator host:port")
    parser.add_argument("--population", default="digits", help="population to check in with")
    parser.add_argument("--phones", type=int, default=50, help="number of phones (default 50)")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha (default 0.5)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for data split and phone behaviour"
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument(
        "--save-test-split",
        metavar="NPZ",
        help="write the held-out split (for `overnight serve --eval-data`) and continue",
    )
    parser.set_defaults(func=run)


async def _run(args: argparse.Namespace) -> None:
    from emulator.data import federated_digits
    from emulator.fleet import Fleet

    data = federated_digits(args.phones, alpha=args.alpha, seed=args.seed)
    if args.save_test_split:
        data.test.save(args.save_test_split)
    fleet = Fleet(
        args.server,
        args.population,
        data.clients,
        seed=args.seed,
        conditions=RandomConditionsSettings(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration:
        loop.call_later(args.duration, stop.set)
    print(
        f"{args.phones} phones checking in with {args.server} (population {args.population!r})",
        flush=True,
    )
    await fleet.run(stop)
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(fleet.stats.outcomes.items())))


def run(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0
