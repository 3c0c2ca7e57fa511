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


class CuttableLink:
    """A TCP relay to the real PostgreSQL server that can be cut (every connection closed, new ones refused)
    and restored on the same port: to its clients, the database went down and came back."""

    def __init__(self, upstream: tuple[str, int]):
        import socket
        import threading

        self.upstream = upstream
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.lock = threading.Lock()
        self.sockets: list = []
        self.listener = None

    def up(self) -> None:
        import socket
        import threading

        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        import contextlib

        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(2)

    def cut(self) -> None:
        import contextlib
        import socket

        assert self.listener is not None
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone leaves it listening)
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.sockets.clear()


def test_the_api_answers_503_while_postgresql_is_down_and_recovers_when_it_is_back(tmp_path, monkeypatch):
    from urllib.parse import urlsplit

    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from batch_pipeline.domain.settings import Settings
    from batch_pipeline.entrypoints.api.app import create_app
    from tests.conftest import REPO, fresh_database

    with fresh_database() as url:
        parts = urlsplit(url)
        link = CuttableLink((parts.hostname or "127.0.0.1", parts.port or 5432))
        link.up()
        relayed = url.replace(f":{parts.port or 5432}/", f":{link.port}/")
        monkeypatch.setenv("VBATCH_POSTGRES_URL", relayed)  # dagster.postgres.yaml reads it
        settings = Settings(home=REPO, data_dir=tmp_path / "data", dagster_home=tmp_path / "dagster",
                            postgres_url=SecretStr(relayed), admin_api_keys=SecretStr("k-test"))
        headers = {"Authorization": "Bearer k-test"}
        with TestClient(create_app(settings), raise_server_exceptions=False) as http:
            assert http.get("/v1/batches", headers=headers).status_code == 200
            link.cut()
            down = http.get("/v1/batches", headers=headers)
            assert down.status_code == 503, down.text
            error = down.json()["error"]
            assert error["code"] == "database_unavailable" and "try again" in error["message"], error
            assert down.headers.get("retry-after") is not None
            assert url.rsplit("/", 1)[0] not in down.text  # no connection string (nor password) in the answer
            link.up()
            assert http.get("/v1/batches", headers=headers).status_code == 200
        link.cut()
