"""The `overnight` command. Each component registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys

from device_runtime import cli as device_cli
from emulator import cli as emulator_cli
from overnight import demo
from server import cli as server_cli
from tflite_export import cli as export_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overnight",
        description="Federated learning on phones: export a Keras model, serve, run devices.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.register(subparsers)
    export_cli.register(subparsers)
    server_cli.register(subparsers)
    device_cli.register(subparsers)
    emulator_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
