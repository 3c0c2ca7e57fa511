"""What counts as the instance's database restarting (a progress report then fails without failing the step)."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError

from batch_pipeline.domain.instance import database_blip


def test_sqlalchemy_and_dagster_postgres_errors_are_blips_and_others_are_not():
    from dagster_postgres.utils import DagsterPostgresException  # loaded, as on a PostgreSQL instance

    assert database_blip(OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert database_blip(DagsterPostgresException("too many retries for DB connection"))
    assert not database_blip(ValueError("a bug in the progress report"))
    assert not database_blip(RuntimeError("too many retries for DB connection"))  # the message alone is not enough


def test_the_code_location_does_not_import_dagster_postgres_for_it(tmp_path):
    import subprocess
    import sys

    code = ("import sys, batch_pipeline.orchestration.definitions; "
            "print('dagster_postgres' in sys.modules)")
    from tests.support.files import REPO

    env = {"PATH": "/usr/bin:/bin", "VBATCH_HOME": str(REPO), "VBATCH_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=tmp_path)
    assert result.stdout.strip() == "False"  # 2.7 s of every run's start on a SQLite instance
