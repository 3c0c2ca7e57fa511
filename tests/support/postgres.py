"""Throwaway PostgreSQL: a database on the machine's server, or a cluster of one's own to stop and restart."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.support.ports import free_port

POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def fresh_database(prefix: str = "vllm_batch_test", admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """A new, empty database on the server of `admin_url`, dropped (with its connections) afterwards."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"

    def admin_execute(sql: str) -> None:
        # A new connection each time: a test may restart the server in between.
        admin = psycopg2.connect(admin_url)
        admin.autocommit = True
        try:
            admin.cursor().execute(sql)
        finally:
            admin.close()

    admin_execute(f"CREATE DATABASE {name}")
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        admin_execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (initdb in a temporary folder, trust auth, loopback, a free port): a test
    may stop and restart it while the tests beside it keep the machine's server."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found and not shutil.which("pg_ctl"):
            raise RuntimeError("no PostgreSQL server binaries (pg_ctl, initdb) found")
        self.bin = Path(found[-1]).parent if found else Path(shutil.which("pg_ctl") or "").parent
        # Its own folder in /tmp: the server runs as `postgres` when this runs as root, and must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="vbatch-test-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.restarts = 0
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/soak"  # once started

    def _run(self, *argv: str) -> None:
        # initdb and postgres refuse to run as root: run them as the `postgres` user then.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *argv], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        """initdb, start the server and create the database of `url`; returns `url`."""
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._pg_ctl("start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "soak")
        return self.url

    def _pg_ctl(self, action: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"),
                  "-w", "-m", "fast", action)

    def restart(self) -> None:
        """Restart the server (its clients lose their connections)."""
        self._pg_ctl("restart")
        self.restarts += 1

    def pause(self) -> None:
        """Stop the server, keeping its data (`resume` starts it again)."""
        self._pg_ctl("stop")

    def resume(self) -> None:
        """Start the server again after `pause`."""
        self._pg_ctl("start")

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._pg_ctl("stop")
        shutil.rmtree(self.root, ignore_errors=True)
