"""`overnight serve --config coordinator.toml`: the file sets any flag, the command line
overrides it, and a bad key or value is refused by name."""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import pytest

from overnight import cli

REPO = pathlib.Path(__file__).resolve().parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser(["serve"]).parse_args(["serve", *argv])


def _config(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return str(path)


def test_the_file_sets_flags_of_every_kind(tmp_path: pathlib.Path) -> None:
    config = _config(
        tmp_path,
        'data_dir = "/var/lib/overnight"\nmax_concurrent_uploads = 8\ndrain_timeout = 45\n'
        'insecure = true\nexempt_network = ["10.0.0.0/8", "127.0.0.0/8"]\n',
    )

    args = _parse("--config", config)

    assert args.data_dir == "/var/lib/overnight"
    assert args.max_concurrent_uploads == 8
    assert args.drain_timeout == 45.0 and isinstance(args.drain_timeout, float)
    assert args.insecure is True
    assert args.exempt_network == ["10.0.0.0/8", "127.0.0.0/8"]


def test_a_serve_table_is_read_like_top_level_keys(tmp_path: pathlib.Path) -> None:
    config = _config(tmp_path, '[serve]\nadmin_address = "127.0.0.1:6000"\n')

    args = _parse("--config", config)

    assert args.admin_address == "127.0.0.1:6000"


def test_flags_on_the_command_line_override_the_file(tmp_path: pathlib.Path) -> None:
    config = _config(
        tmp_path,
        'data_dir = "from-file"\nmax_concurrent_uploads = 8\nexempt_network = ["10.0.0.0/8"]\n',
    )

    # --max-concurrent-uploads is given its default value: given still wins over the file.
    args = _parse(
        "--data-dir",
        "from-flag",
        "--config",
        config,
        "--max-concurrent-uploads",
        "2",
        "--exempt-network",
        "192.168.0.0/16",
    )

    assert args.data_dir == "from-flag"
    assert args.max_concurrent_uploads == 2
    assert args.exempt_network == ["192.168.0.0/16"]  # replaced, not appended to


def test_flags_the_file_leaves_out_keep_their_defaults(tmp_path: pathlib.Path) -> None:
    config = _config(tmp_path, 'data_dir = "d"\n')

    args = _parse("--config", config)

    assert args.address == _parse().address
    assert args.exempt_network == []


def test_an_unknown_key_is_refused_by_name(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, 'data_dir = "d"\nmax_uploads = 3\n')

    with pytest.raises(SystemExit) as exit_:
        _parse("--config", config)

    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "unknown key(s) ['max_uploads']" in error
    assert "max_concurrent_uploads" in error  # the known keys are listed


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('max_concurrent_uploads = "8"', "'max_concurrent_uploads' (--max-concurrent-uploads)"),
        ("drain_timeout = true", "'drain_timeout' (--drain-timeout)"),
        ('insecure = "yes"', "'insecure' (--insecure)"),
        ('exempt_network = "10.0.0.0/8"', "'exempt_network' (--exempt-network)"),
        ("data_dir = 7", "'data_dir' (--data-dir)"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_by_name(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], line: str, named: str
) -> None:
    config = _config(tmp_path, line + "\n")

    with pytest.raises(SystemExit) as exit_:
        _parse("--config", config)

    assert exit_.value.code == 2
    assert f"key {named}: expected" in capsys.readouterr().err


def test_a_file_that_is_not_toml_is_refused_naming_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "data_dir = \n")

    with pytest.raises(SystemExit):
        _parse("--config", config)

    assert f"{config}: not valid TOML" in capsys.readouterr().err


def test_a_flag_added_to_serve_is_a_key_of_the_file(tmp_path: pathlib.Path) -> None:
    parser = cli.build_parser(["serve"])
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands._name_parser_map["serve"]
    serve.add_argument("--retention-days", type=int, default=30)
    config = _config(tmp_path, "retention_days = 90\n")

    args = parser.parse_args(["serve", "--config", config])

    assert args.retention_days == 90


def test_serve_help_mentions_the_config_file() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "overnight", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert shown.returncode == 0
    assert "--config FILE" in shown.stdout
    assert "TOML" in shown.stdout
