"""A real PostgreSQL server for tests and benchmarks: made in a temporary directory with
`initdb`, run as a child of this process, always stopped and removed.

- Binaries: $OVERNIGHT_PG_BINDIR if set, else `pg_config --bindir`, else the newest
  /usr/lib/postgresql/*/bin. Missing binaries are an error that says how to install them; the
  `postgres_server` fixture turns it into a test failure, never a skip.
- PostgreSQL refuses to run as root, and these machines and CI run as root: then initdb and
  the server run as the `postgres` system user (setpriv), in a directory it owns.
- The server listens on a unix socket in its own directory only (no TCP port), so parallel
  runs on one machine cannot collide.
- The server is this process's child with a parent-death signal (SIGINT, PostgreSQL's fast
  shutdown): the kernel stops it even if the test run is killed. `pg_ctl start` would detach
  it, and a killed run would leave it behind.

Why not pytest-postgresql: it runs `pg_ctl` as the current user and has no setting for another
system user (its issues #341 and #455 ask for one and were closed without), so under root it
cannot start a server; its server is detached by `pg_ctl`; and it brings mirakuru, port-for and
psutil for what is here a hundred lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pathlib
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

server_user = "postgres"  # the system user the server runs as when we are root
ready_timeout_s = 120.0
stop_timeout_s = 60.0
_port = 5432  # names the socket file only; nothing listens on TCP

INSTALL_HINT = (
    "install them with `apt-get install postgresql` (Debian, Ubuntu; the tests start their "
    "own server, no service needs to run) or `dnf install postgresql-server` (Fedora, RHEL), "
    "or set OVERNIGHT_PG_BINDIR to the folder that holds initdb and postgres"
)


class PostgresUnavailable(Exception):
    """No PostgreSQL server can be started here; the message says why and what to do."""


def find_bindir() -> pathlib.Path:
    """The folder of initdb and postgres. Raises PostgresUnavailable if there is none."""
    wanted = ("initdb", "postgres")
    configured = os.environ.get("OVERNIGHT_PG_BINDIR")
    if configured:
        candidates = [pathlib.Path(configured)]
    else:
        candidates = []
        pg_config = shutil.which("pg_config")
        if pg_config:
            found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
            if found.returncode == 0:
                candidates.append(pathlib.Path(found.stdout.strip()))
        versions = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
        )
        candidates.extend(pathlib.Path(p) for p in reversed(versions))
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in wanted):
            return bindir
    looked = ", ".join(str(c) for c in candidates) or "PATH (no pg_config)"
    raise PostgresUnavailable(
        f"PostgreSQL server binaries (initdb, postgres) not found (looked in {looked}): "
        + INSTALL_HINT
    )


@dataclasses.dataclass
class PostgresServer:
    bindir: pathlib.Path
    root: pathlib.Path  # owned by the server's user; holds data/, the socket and the log
    process: subprocess.Popen[bytes]

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.root}&port={_port}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.split("/")[3].split("?")[0]
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @property
    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def running_postgres(durable: bool = False) -> Iterator[PostgresServer]:
    """A fresh server for the duration of the block. `durable=False` (tests) turns off fsync
    and synchronous commit; benchmarks ask for PostgreSQL's durable defaults."""
    bindir = find_bindir()
    run_as = _run_as()
    root = pathlib.Path(tempfile.mkdtemp(prefix="overnight-pg-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        if os.geteuid() == 0:
            account = pwd.getpwnam(server_user)
            os.chown(root, account.pw_uid, account.pw_gid)
        data = root / "data"
        initdb = subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres"]
            + ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True,
            text=True,
        )
        if initdb.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {initdb.stderr.strip()}")
        settings = {"listen_addresses": "", "unix_socket_directories": str(root)}
        if not durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        options = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
        with open(root / "postgres.log", "wb") as log:
            process = subprocess.Popen(
                [*run_as, "--pdeathsig=INT", "--", str(bindir / "postgres")]
                + ["-D", str(data), "-p", str(_port), *options],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = PostgresServer(bindir, root, process)
        _wait_until_ready(server)
        yield server
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(root, ignore_errors=True)


def _run_as() -> list[str]:
    """setpriv, to drop from root to the server's user; its `--pdeathsig` is used either way."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise PostgresUnavailable("setpriv (util-linux) is needed to run PostgreSQL here")
    if os.geteuid() != 0:
        return [setpriv]
    try:
        pwd.getpwnam(server_user)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, PostgreSQL needs the system user {server_user!r}, which the "
            "postgresql package creates: " + INSTALL_HINT
        ) from None
    return [setpriv, f"--reuid={server_user}", f"--regid={server_user}", "--init-groups"]


def _wait_until_ready(server: PostgresServer) -> None:
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if server.process.poll() is not None:
            raise PostgresUnavailable(f"PostgreSQL exited at start:\n{server.log[-2000:]}")
        try:
            psycopg.connect(server.url(), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise PostgresUnavailable(
                    f"PostgreSQL not ready after {ready_timeout_s:g} s:\n{server.log[-2000:]}"
                ) from None
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT); if that hangs, immediate shutdown (SIGQUIT), then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(stop_timeout_s)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the test session, stopped at its end (also on failure or Ctrl-C)."""
    try:
        context = running_postgres()
        server = context.__enter__()
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL tests cannot run: {exc}", pytrace=False)
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database on the session's server, dropped after the test."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)
