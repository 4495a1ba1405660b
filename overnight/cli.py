"""The `overnight` command. Each component registers its own subcommands.

The base install is the device runtime alone (`pip install overnight`); the coordinator, the
emulator and the exporter come with extras. So `overnight` imports a component only when one of
its commands runs: the listing below is all `overnight --help` needs, and a command whose extra
is missing says which extra to install instead of failing on an import.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from device_runtime import logs


@dataclasses.dataclass(frozen=True)
class Component:
    """A component's commands, the module whose `register(subparsers)` adds them, and what it
    needs beyond the base install."""

    module: str
    commands: dict[str, str]  # name -> one-line help for `overnight --help`
    extras: tuple[str, ...] = ()
    min_python: tuple[int, int] = (3, 10)
    max_python: tuple[int, int] = (3, 13)


# The modules each extra brings (pyproject.toml's optional dependencies), as imported.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "server": ("tensorboard", "dp_accounting"),
    "emulator": ("sklearn", "matplotlib", "h5py"),
    "export": ("tensorflow",),
}

COMPONENTS: tuple[Component, ...] = (
    Component(
        "overnight.demo",
        {"demo": "coordinator + 50 emulated phones: 10 rounds of federated training"},
        ("server", "emulator", "export"),
        min_python=(3, 11),
        max_python=(3, 11),
    ),
    Component(
        "tflite_export.cli",
        {"export": "export a Keras model as a TFLite training model (builtin ops only)"},
        ("export",),
        # TensorFlow 2.14.1 and TFF 0.87.0 exist for Python 3.11 only.
        min_python=(3, 11),
        max_python=(3, 11),
    ),
    Component(
        "server.cli",
        {
            "serve": "run the coordinator (gRPC; SQLite state in a data directory)",
            "status": "show populations, tasks, current rounds and recent history",
            "task": "manage tasks on a running coordinator (create, pause, resume, cancel)",
            "admin-token": "create, list or revoke admin tokens of a data directory",
            "backup": "copy a coordinator's store while it runs (SQLite online backup)",
        },
        ("server",),
        min_python=(3, 11),  # task and fleet files are read with tomllib
    ),
    Component(
        "device_runtime.cli",
        {"device": "run the device runtime: check in, train with LiteRT, upload updates"},
    ),
    Component(
        "emulator.cli",
        {"emulate": "run N virtual phones (real device runtime, real gRPC) against a coordinator"},
        ("emulator",),
        min_python=(3, 11),
    ),
)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _pythons(component: Component) -> str:
    low, high = (".".join(map(str, v)) for v in (component.min_python, component.max_python))
    return f"Python {low}" if low == high else f"Python {low} to {high}"


def missing_requirement(component: Component, version: tuple[int, int] | None = None) -> str | None:
    """What the running installation lacks for `component`, as a user can act on it."""
    version = version or (sys.version_info.major, sys.version_info.minor)
    if not component.min_python <= version <= component.max_python:
        return f"needs {_pythons(component)}; this is Python {version[0]}.{version[1]}"
    missing = [
        extra
        for extra in component.extras
        if not all(_importable(module) for module in EXTRA_MODULES[extra])
    ]
    if missing:
        return f"needs the {', '.join(missing)} extra: pip install 'overnight[{','.join(missing)}]'"
    return None


def _needs(component: Component) -> str:
    if not component.extras:
        return "base install"
    needs = "needs overnight[" + ",".join(component.extras) + "]"
    if (component.min_python, component.max_python) != ((3, 10), (3, 13)):
        needs += f", {_pythons(component)}"
    return needs


def _selected_command(argv: Sequence[str]) -> str | None:
    # The only global options (-v, --verbose, -h) take no value: the first word is the command.
    return next((arg for arg in argv if not arg.startswith("-")), None)


def load_component(component: Component) -> ModuleType | str:
    """The component's CLI module, or why this installation cannot run it."""
    reason = missing_requirement(component)
    if reason is not None:
        return reason
    try:
        return importlib.import_module(component.module)
    except ImportError as exc:  # an extra installed only in part
        return f"cannot import {exc.name or exc}: it {_needs(component)}"


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for `argv`: only the component of the command in `argv` is imported; the
    other commands are listed from `COMPONENTS`."""
    parser = argparse.ArgumentParser(
        prog="overnight",
        description=(
            "Federated learning on phones: export a Keras model, serve, run devices. "
            "`pip install overnight` is the device runtime; the other commands need the "
            "extra shown beside them."
        ),
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    selected = _selected_command(argv)
    for component in COMPONENTS:
        if selected in component.commands:
            module = load_component(component)
            if not isinstance(module, str):
                module.register(subparsers)
                continue
        for name, summary in component.commands.items():
            subparsers.add_parser(name, help=f"{summary} [{_needs(component)}]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _selected_command(argv)
    for component in COMPONENTS:
        if selected in component.commands:
            module = load_component(component)
            if isinstance(module, str):
                print(f"overnight {selected} {module}", file=sys.stderr)
                return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logs.configure(level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
