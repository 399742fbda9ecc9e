"""A throwaway PostgreSQL server on loopback for tests, and fixtures that hand out fresh databases.

    from pg_server import postgres_server, postgres_url   # noqa: F401  (fixtures)

`postgres_server` (session): the server named by DOCRL_TEST_POSTGRES_URL (a URL whose user may
create databases), else one started here with Debian's binaries (/usr/lib/postgresql/*/bin:
initdb + pg_ctl, trust auth, a random port on 127.0.0.1, its socket and data in a temp dir, run
as the `postgres` user when we are root), else the test is skipped, or fails when
DOCRL_REQUIRE_POSTGRES=1 (CI sets it: .ci/run installs the postgresql package).
`postgres_url` (function): a new empty database on that server, dropped afterwards
(`create_database` / `drop_database` do the same for fixtures of other scopes).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from common.ray_helpers import free_port


def find_pg_bin() -> Path | None:
    """The newest Debian PostgreSQL bin directory with initdb and pg_ctl (or DOCRL_PG_BIN)."""
    if os.environ.get("DOCRL_PG_BIN"):
        return Path(os.environ["DOCRL_PG_BIN"])
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").exists()]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0) if found else None


class LocalPostgres:
    """initdb + pg_ctl in a temp dir; `url` is a SQLAlchemy URL of its `postgres` database."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root and `runuser` is missing: cannot start PostgreSQL as a user")
            try:
                import pwd

                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no `postgres` user to run PostgreSQL as") from None
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="docrl-pg-"))
        if self.as_user:
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self.port = None

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        proc = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}")

    def start(self) -> str:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        for attempt in range(3):  # the port was free a moment ago; someone may take it meanwhile
            self.port = free_port()
            opts = (f"-k {self.dir} -h 127.0.0.1 -p {self.port} -F -c full_page_writes=off "
                    "-c synchronous_commit=off -c max_connections=50")
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                          "-t", "60", "start")
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _unavailable(reason: str):
    if os.environ.get("DOCRL_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required here (DOCRL_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"no PostgreSQL: {reason} (set DOCRL_TEST_POSTGRES_URL, or install Debian's postgresql package)")


@pytest.fixture(scope="session")
def postgres_server():
    """A SQLAlchemy URL of a PostgreSQL server's maintenance database (see the module docstring)."""
    url = os.environ.get("DOCRL_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    bin_dir = find_pg_bin()
    if bin_dir is None:
        _unavailable("no initdb/pg_ctl under /usr/lib/postgresql/*/bin")
    try:
        server = LocalPostgres(bin_dir)
        url = server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        _unavailable(f"starting a local server with {bin_dir} failed: {e}")
    try:
        yield url
    finally:
        server.stop()


def create_database(server_url: str) -> str:
    """A new empty database on the server at `server_url`; returns its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(server_url).set(drivername="postgresql")
    name = f"docrl_test_{uuid.uuid4().hex[:12]}"
    dsn = admin.render_as_string(hide_password=False)
    deadline = time.monotonic() + 10
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def admin_execute(server_url: str, *statements: str) -> None:
    """Run statements on the server's maintenance database (autocommit), e.g. ALTER DATABASE."""
    import psycopg
    from sqlalchemy.engine import make_url

    dsn = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def drop_database(server_url: str, url: str) -> None:
    from sqlalchemy.engine import make_url

    admin_execute(server_url, f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the test server; dropped after the test."""
    url = create_database(postgres_server)
    yield url
    drop_database(postgres_server, url)
