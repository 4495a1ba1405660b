"""`overnight serve --config coordinator.toml`: every flag of `serve`, from a file.

The file's keys are the flags' long names with underscores, as argparse stores them
(`--data-dir` is `data_dir`), at the top level or under a `[serve]` table:

    data_dir = "/var/lib/overnight"
    tls_cert = "/etc/overnight/tls/server.pem"
    exempt_network = ["10.0.0.0/8"]
    drain_timeout = 60.0

It is read from the parser itself, so a flag added to `serve` later is a key of the file with no
code here. Validation is by name, as for task files (server/config.py): an unknown key, a value
of the wrong type or a value outside a flag's choices is refused naming the key and its flag.
A flag given on the command line overrides the file; a repeatable flag given there replaces
the file's list rather than adding to it. Relative paths are taken from the working
directory, as on the command line.
"""

from __future__ import annotations

import argparse
import pathlib
import tomllib
from collections.abc import Sequence
from typing import Any

CONFIG_DEST = "config"
_NOT_FROM_FILE = {"help", "version", CONFIG_DEST}


class CoordinatorConfigError(ValueError):
    """The file cannot configure `serve`; the message names the key at fault."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Adds `--config FILE` to `parser` and has its parse apply the file. Call after every
    other flag of `parser` is added (a flag added later is still read, from the parser, at
    parse time; this only needs to run once)."""
    parser.add_argument(
        "--config",
        dest=CONFIG_DEST,
        metavar="FILE",
        help=(
            "TOML file setting any of these flags by its long name with underscores "
            '(data_dir = "/var/lib/overnight", exempt_network = ["10.0.0.0/8"]); '
            "a flag given on the command line overrides the file"
        ),
    )
    parse = parser.parse_known_args

    # argparse hands a subcommand's own arguments to its parser's parse_known_args; wrapping
    # it is the one place that sees both the parsed values and which flags were given.
    def parse_known_args(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = parse(args, namespace)
        path = getattr(parsed, CONFIG_DEST, None)
        if path is not None:
            try:
                values = read_config(path, parser)
            except CoordinatorConfigError as exc:
                parser.error(str(exc))
            given = _given_dests(parser, parse, args)
            for dest, value in values.items():
                if dest not in given:
                    setattr(parsed, dest, value)
        return parsed, rest

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign, assignment]


def read_config(path: str | pathlib.Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's values by destination, checked against the flags of `parser`.
    Raises CoordinatorConfigError naming the file and the key."""
    try:
        document = tomllib.loads(pathlib.Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise CoordinatorConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise CoordinatorConfigError(f"cannot read config {path}: {exc.strerror}") from None
    table = document.get("serve", document)
    if not isinstance(table, dict):
        raise CoordinatorConfigError(f"{path}: [serve] must be a table")
    actions = configurable_actions(parser)
    unknown = sorted(set(table) - set(actions))
    if unknown:
        raise CoordinatorConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(actions)}")
    return {dest: _checked(path, actions[dest], value) for dest, value in table.items()}


def configurable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a file may set, by destination: every optional flag but --help and --config."""
    return {
        action.dest: action
        for action in parser._actions
        if action.option_strings
        and action.dest not in _NOT_FROM_FILE
        and action.dest != argparse.SUPPRESS
        and not isinstance(action, argparse._SubParsersAction)
    }


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _checked(path: str | pathlib.Path, action: argparse.Action, value: Any) -> Any:
    def refuse(expected: str) -> CoordinatorConfigError:
        return CoordinatorConfigError(
            f"{path}: key {action.dest!r} ({_flag(action)}): expected {expected}, got {value!r}"
        )

    if isinstance(action, argparse._StoreConstAction):  # store_true, store_false, store_const
        if not isinstance(value, bool):
            raise refuse("true or false")
        return action.const if value else action.default
    if isinstance(action, argparse._CountAction):
        if not _is_int(value) or value < 0:
            raise refuse("a count (an integer, 0 or more)")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        if not isinstance(value, list):
            raise refuse(f"a list of {_kind(action)}")
        return [_one(path, action, item, refuse) for item in value]
    if isinstance(action, argparse._StoreAction) and action.nargs is None:
        return _one(path, action, value, refuse)
    raise refuse("nothing: this flag cannot be set from a file")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(action: argparse.Action) -> str:
    if action.type is int:
        return "integers"
    if action.type is float:
        return "numbers"
    return "strings"


def _one(
    path: str | pathlib.Path,
    action: argparse.Action,
    value: Any,
    refuse: Any,
) -> Any:
    if action.type is int:
        if not _is_int(value):
            raise refuse("an integer")
    elif action.type is float:
        if not (_is_int(value) or isinstance(value, float)):
            raise refuse("a number")
        value = float(value)
    else:
        if not isinstance(value, str):
            raise refuse("a string")
        if action.type is not None:
            try:
                value = action.type(value)  # type: ignore[operator]
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise refuse(f"a valid value ({exc})") from None
    if action.choices is not None and value not in action.choices:
        raise refuse(f"one of {sorted(action.choices)}")  # type: ignore[type-var]
    return value


def _given_dests(
    parser: argparse.ArgumentParser,
    parse: Any,
    args: Sequence[str] | None,
) -> set[str]:
    """The destinations of the flags `args` gives: parsed again with every default
    suppressed, so only a given flag leaves a value."""
    actions = configurable_actions(parser)
    defaults = {dest: action.default for dest, action in actions.items()}
    try:
        for action in actions.values():
            action.default = argparse.SUPPRESS
        given, _ = parse(args, argparse.Namespace())
    finally:
        for dest, action in actions.items():
            action.default = defaults[dest]
    return set(vars(given)) & set(actions)
