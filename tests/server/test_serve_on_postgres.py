"""`overnight serve --store postgresql://...` as an operator runs it."""

from __future__ import annotations

import pathlib
import time

from tests.test_cli import _overnight, _serving


def test_serve_keeps_its_state_in_the_database_and_its_tokens_in_the_data_dir(
    tmp_path: pathlib.Path, model_path: pathlib.Path, postgres_url: str
) -> None:
    config = tmp_path / "task.toml"
    config.write_text('[task]\ntask_id = "pg-task"\npopulation = "phones"\nbatch_size = 8\n')
    with _serving(tmp_path, "--store", postgres_url) as (admin, _):
        client = ("--server", admin, "--root-certs", str(tmp_path / "tls" / "ca.pem"))
        client += ("--admin-token-file", str(tmp_path / "state" / "operator.token"))
        created = _overnight("task", "create", str(config), "--model", str(model_path), *client)
    with _serving(tmp_path / "again", "--store", postgres_url) as (admin, _):
        client = ("--server", admin, "--root-certs", str(tmp_path / "again" / "tls" / "ca.pem"))
        client += ("--admin-token-file", str(tmp_path / "again" / "state" / "operator.token"))
        status = _overnight("status", "--task", "pg-task", *client)

    assert created.returncode == 0, created.stderr
    assert "task pg-task: running, 0/10 rounds committed" in status.stdout, status.stderr
    assert (tmp_path / "state" / "operator.token").exists()
    assert not (tmp_path / "state" / "coordinator.sqlite").exists()


def test_a_second_coordinator_on_the_same_database_is_refused(
    tmp_path: pathlib.Path, postgres_url: str
) -> None:
    with _serving(tmp_path / "first", "--store", postgres_url):
        second = _overnight(
            "serve", "--insecure", "--data-dir", str(tmp_path / "second"), "--store", postgres_url
        )

    assert second.returncode == 2
    assert "is in use by another coordinator (overnight coordinator pid" in second.stderr


def test_repair_is_refused_with_postgresql(tmp_path: pathlib.Path, postgres_url: str) -> None:
    result = _overnight(
        "serve", "--insecure", "--data-dir", str(tmp_path), "--store", postgres_url, "--repair"
    )

    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("serve: --repair rebuilds a damaged SQLite")


def test_a_store_that_is_not_postgresql_is_refused_with_what_is_accepted(
    tmp_path: pathlib.Path,
) -> None:
    result = _overnight(
        "serve", "--insecure", "--data-dir", str(tmp_path), "--store", "mysql://db/x"
    )

    assert result.returncode == 2
    assert "serve: --store takes a PostgreSQL URL, postgresql://" in result.stderr


def test_replica_needs_a_postgresql_store(tmp_path: pathlib.Path) -> None:
    result = _overnight("serve", "--insecure", "--data-dir", str(tmp_path), "--replica")

    assert result.returncode == 2
    assert "serve: --replica needs --store postgresql://" in result.stderr


def test_replicas_share_a_database_and_status_shows_them(
    tmp_path: pathlib.Path, model_path: pathlib.Path, postgres_url: str
) -> None:
    config = tmp_path / "task.toml"
    config.write_text('[task]\ntask_id = "pg-task"\npopulation = "phones"\nbatch_size = 8\n')
    replica = ("--store", postgres_url, "--replica", "--replica-name")
    with (
        _serving(tmp_path / "a", *replica, "replica-a") as (admin_a, _),
        _serving(tmp_path / "b", *replica, "replica-b") as (admin_b, _),
    ):
        sole = _overnight(
            "serve", "--insecure", "--data-dir", str(tmp_path / "c"), "--store", postgres_url
        )
        client_a = ("--server", admin_a, "--root-certs", str(tmp_path / "a" / "tls" / "ca.pem"))
        client_a += ("--admin-token-file", str(tmp_path / "a" / "state" / "operator.token"))
        created = _overnight("task", "create", str(config), "--model", str(model_path), *client_a)
        client_b = ("--server", admin_b, "--root-certs", str(tmp_path / "b" / "tls" / "ca.pem"))
        client_b += ("--admin-token-file", str(tmp_path / "b" / "state" / "operator.token"))
        for _ in range(600):  # until replica b has seen the task and a replica leads it
            status = _overnight("status", *client_b)
            if "task pg-task: led by" in status.stdout:
                break
            time.sleep(0.1)

    assert created.returncode == 0, created.stderr
    assert sole.returncode == 2
    assert "is in use by a coordinator" not in sole.stderr
    assert "only as replicas: serve --replica" in sole.stderr
    assert "task pg-task: running, 0/10 rounds committed" in status.stdout, status.stderr
    assert "replicas (2)" in status.stdout
    assert "replica-b (answering): pid" in status.stdout
    assert "replica-a: pid" in status.stdout
    assert "task pg-task: led by replica-" in status.stdout
