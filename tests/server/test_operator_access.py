"""Admin tokens and roles, without the network (the network side: test_listener_security.py)."""

from __future__ import annotations

import pathlib

import pytest

from server.certificates import DevelopmentCa
from server.operator_access import (
    ADMIN_SERVICE,
    AdminTokens,
    Role,
    permits,
    read_admin_token,
    required_role,
    role_from_certificate,
)


def test_a_created_token_has_its_role_and_others_have_none(tmp_path: pathlib.Path) -> None:
    tokens = AdminTokens(tmp_path)
    _, operator = tokens.create(Role.OPERATOR)
    _, viewer = tokens.create(Role.VIEWER)

    assert tokens.role_of(operator) is Role.OPERATOR
    assert tokens.role_of(viewer) is Role.VIEWER
    assert tokens.role_of(operator + "x") is None
    assert tokens.role_of("") is None


def test_tokens_made_by_another_process_are_seen_without_a_restart(
    tmp_path: pathlib.Path,
) -> None:
    serving = AdminTokens(tmp_path)
    assert serving.entries() == []

    entry, token = AdminTokens(tmp_path).create(Role.VIEWER)  # `overnight admin-token create`

    assert serving.role_of(token) is Role.VIEWER
    assert AdminTokens(tmp_path).revoke(entry.token_id)
    assert serving.role_of(token) is None


def test_revoking_an_unknown_id_changes_nothing(tmp_path: pathlib.Path) -> None:
    tokens = AdminTokens(tmp_path)
    _, token = tokens.create(Role.OPERATOR)

    assert not tokens.revoke("nope")
    assert tokens.role_of(token) is Role.OPERATOR


@pytest.mark.parametrize(
    ("method", "role"),
    [
        ("ListTasks", Role.VIEWER),
        ("GetTaskStatus", Role.VIEWER),
        ("ListRounds", Role.VIEWER),
        ("RegisterTask", Role.OPERATOR),
        ("PauseTask", Role.OPERATOR),
        ("ResumeTask", Role.OPERATOR),
        ("CancelTask", Role.OPERATOR),
        ("SomethingAddedLater", Role.OPERATOR),
    ],
)
def test_only_listed_reads_are_open_to_viewers(method: str, role: Role) -> None:
    assert required_role(f"/{ADMIN_SERVICE}/{method}") is role


def test_an_operator_may_do_what_a_viewer_may_and_not_the_reverse() -> None:
    assert permits(Role.OPERATOR, Role.VIEWER) and permits(Role.OPERATOR, Role.OPERATOR)
    assert permits(Role.VIEWER, Role.VIEWER) and not permits(Role.VIEWER, Role.OPERATOR)


@pytest.mark.parametrize(("unit", "role"), [("operator", Role.OPERATOR), ("sales", None)])
def test_a_client_certificate_names_its_role_in_its_ou(unit: str, role: Role | None) -> None:
    issued = DevelopmentCa().issue_client("alice", unit)

    assert role_from_certificate(issued.certificate_chain) is role


def test_the_token_file_wins_over_the_environment(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("OVERNIGHT_ADMIN_TOKEN", "from-env")

    assert read_admin_token(str(tmp_path / "token")) == "from-file"
    assert read_admin_token(None) == "from-env"
    monkeypatch.delenv("OVERNIGHT_ADMIN_TOKEN")
    assert read_admin_token(None) is None
