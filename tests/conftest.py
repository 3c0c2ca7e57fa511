"""Shared fixtures: the tiny model, one real vLLM engine per test session, Dagster instances."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# The harness lives in tests/support; these names stay importable from here for tests written before it.
from tests.support.files import REPO, read_jsonl, write_jsonl  # noqa: F401
from tests.support.postgres import fresh_database

# SeaweedFS (S3) and fake-gcs-server fixtures, for the result handlers and the object-store data root; a webhook
# receiver, for the webhook and result-handler tests.
pytest_plugins = ["tests.support.object_stores", "tests.support.webhook_receiver"]

# Settings for the CPU build of vLLM on small CI machines (see docs/ARCHITECTURE.md).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs two pytest-xdist workers. vLLM's CPU engine computes on one thread, which it binds to
# core 0 unless told otherwise: each worker's engines get a core of their own instead.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(int(worker.removeprefix("gw")) % (os.cpu_count() or 1)))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random Llama (built by `make model`, or here if missing)."""
    from batch_pipeline.domain.tiny_model import build_tiny_model

    return build_tiny_model(REPO / "models" / "tiny-llama").resolve()


@pytest.fixture
def settings(tmp_path: Path, tiny_model: Path):
    """Settings for one test: its own data folder, the tiny model, CPU engine options, and the session's one
    engine in this process (the warm host, a process of its own per data folder, is for service tests)."""
    from batch_pipeline.domain.settings import Settings

    return Settings(home=REPO, data_dir=tmp_path / "data", dagster_home=tmp_path / "dagster", dtype="float32",
                    max_model_len=1024, enforce_eager=True, chunk_size=16, keep_engine_loaded=True, engine_host=False)


@pytest.fixture(scope="session")
def _session_engine(tiny_model: Path) -> Iterator[object]:
    from resources.vllm_engine import VLLMEngine

    yield VLLMEngine(dtype="float32", max_model_len=1024, enforce_eager=True, keep_loaded=True)
    VLLMEngine.release()


@pytest.fixture
def loaded_engine(_session_engine, tiny_model: Path) -> object:
    """One real engine for the whole session; tests that run the job reuse it (same engine kwargs).

    Asked for again by each test: the same engine while it stays loaded, a new one only if a test in
    between swapped it (an embeddings batch loads a pooling engine) or released it.
    """
    return _session_engine.load(str(tiny_model))


@pytest.fixture
def sqlite_instance(tmp_path: Path):
    """A real Dagster instance on SQLite storage in a temporary DAGSTER_HOME."""
    from dagster import DagsterInstance

    (tmp_path / "dagster").mkdir(exist_ok=True)
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        yield instance


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server for the session's short PostgreSQL tests.

    A test that starts a whole service takes a database of its own (`fresh_database`): runs, pool
    slots and sensor state left by one service must not reach the next."""
    with fresh_database() as url:
        yield url


@pytest.fixture
def postgres_instance(tmp_path: Path, postgres_url: str):
    """A real Dagster instance on PostgreSQL storage (dagster-postgres)."""
    from dagster import instance_for_test

    overrides = {"storage": {"postgres": {"postgres_url": postgres_url}}}
    (tmp_path / "dagster-pg").mkdir(exist_ok=True)
    with instance_for_test(overrides=overrides, temp_dir=str(tmp_path / "dagster-pg")) as instance:
        yield instance


def xdist_group_of(nodeid: str) -> str:
    """The tests that must run in one pytest-xdist worker: a test file (its module fixtures start once), or
    all the files of tests/api, or of one integration, which share session servers (the API stack, Label
    Studio, Prometheus)."""
    parts = nodeid.split("::", 1)[0].split("/")
    if parts == ["tests", "test_multi_gpu.py"]:
        # Its data-parallel engines compute on both cores, and an engine beside them on the same core loaded in
        # 190-520 s instead of about 40 (OpenMP threads bound to one core): the operations tests, whose waits
        # are the tightest, never run at the same time as it.
        return "tests/test_operations.py"
    if parts[:2] == ["tests", "api"]:
        return "tests/api"
    if parts[:2] == ["tests", "integrations"]:
        return "/".join(parts[:3])
    return "/".join(parts)


# The groups that take minutes each (CI durations, longest first) come first in the collection order, so that
# the two workers may end together. (The scope scheduler does not keep to it strictly: a fresh-clone CI run
# still started test_operations.py 18 minutes in and ran the soak last, alone.)
LONG_GROUPS = ["tests/test_operations.py", "tests/api", "tests/test_cli_run.py", "tests/test_multi_gpu.py",
               "tests/test_operations_engine_host.py", "tests/test_engine_host.py", "tests/test_engine_processes.py",
               "tests/test_soak.py",
               "tests/integrations/monitoring", "tests/test_instance_race.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long groups first (stable: a file's tests stay together, in their order)."""
    rank = {group: index for index, group in enumerate(LONG_GROUPS)}
    items.sort(key=lambda item: rank.get(xdist_group_of(item.nodeid), len(LONG_GROUPS)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Whole groups (`xdist_group_of`) go to a worker. (xdist's own `--dist loadgroup` marks do not take effect
    with pytest 9, whose node ids it can no longer rewrite.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    return GroupScheduling(config, log)


class EngineCount:
    """Counts the vLLM engines the suite starts: every engine core process seen, by pid and start time.

    vLLM titles its engine core process `VLLM::EngineCore`; one appears per engine loaded, in a test's own
    process, a run worker or an engine host alike. Polled in the process that runs the session (the xdist
    controller with workers), so every worker's engines are seen, and printed at the end of the run, with
    the test files that started them: each test process writes the test it is running into `folder`
    (`note_test`), and an engine counts for the test its ancestor test process was running when it appeared.
    """

    def __init__(self) -> None:
        import collections
        import tempfile
        import threading

        self.seen: set[tuple[int, float]] = set()
        self.by_file: collections.Counter[str] = collections.Counter()
        self.folder = Path(tempfile.mkdtemp(prefix="engine-count-"))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="engine-count", daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self.stop.wait(1.0):  # an engine core lives for seconds at the least
            for process in psutil.process_iter(["pid", "create_time", "cmdline"]):
                cmdline = process.info["cmdline"] or []
                key = (process.info["pid"], process.info["create_time"])
                if cmdline and cmdline[0].startswith("VLLM::EngineCore") and key not in self.seen:
                    self.seen.add(key)
                    if self._ours(process):  # not another test run's on the same machine
                        self.by_file[self._test_file_of(process)] += 1

    def _ours(self, process: object) -> bool:
        import psutil

        try:
            for parent in process.parents():  # type: ignore[attr-defined]
                if parent.pid == os.getpid() or parent.environ().get("VBATCH_TEST_ENGINE_COUNT_DIR") == str(self.folder):
                    return True
        except (psutil.Error, OSError):
            pass
        return False

    def _test_file_of(self, process: object) -> str:
        import psutil

        try:
            for parent in process.parents():  # type: ignore[attr-defined]
                note = self.folder / str(parent.pid)
                if not note.exists():  # a detached engine host: the worker it was started under, if any
                    note = self.folder / parent.environ().get("PYTEST_XDIST_WORKER", "none")
                if note.exists():
                    return note.read_text().split("::", 1)[0] or "?"
        except (psutil.Error, OSError):
            pass
        own = self.folder / str(os.getpid())  # one process for the whole run: the test it is running
        return own.read_text().split("::", 1)[0] if own.exists() else "?"


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    """Each test process notes the test it runs (for EngineCount; the controller's own calls are skipped)."""
    folder = os.environ.get("VBATCH_TEST_ENGINE_COUNT_DIR")
    if folder and (os.environ.get("PYTEST_XDIST_WORKER") or not os.environ.get("VBATCH_TEST_XDIST_CONTROLLER")):
        with contextlib.suppress(OSError):
            for name in {str(os.getpid()), os.environ.get("PYTEST_XDIST_WORKER") or str(os.getpid())}:
                (Path(folder) / name).write_text(nodeid)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or the only process): it outlives every test
        count = config.stash[ENGINE_COUNT] = EngineCount()
        os.environ["VBATCH_TEST_ENGINE_COUNT_DIR"] = str(count.folder)  # the workers inherit it
        if config.getoption("numprocesses", None):
            os.environ["VBATCH_TEST_XDIST_CONTROLLER"] = "1"
        count.thread.start()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    count = config.stash.get(ENGINE_COUNT, None)
    if count is not None:
        count.stop.set()
        terminalreporter.write_line(f"vLLM engines started during the tests: {sum(count.by_file.values())}")
        for test_file, engines in count.by_file.most_common():
            terminalreporter.write_line(f"  {engines:3d}  {test_file}")
        shutil.rmtree(count.folder, ignore_errors=True)


ENGINE_COUNT = pytest.StashKey[EngineCount]()


@pytest.fixture
def at_first_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`with at_first_chunk(paths, action) as written:` around an in-process run: once its batch_chunks has written
    a chunk, the step waits (the test-only hold after each chunk) while `action` runs (fill the disk, stop the store),
    then goes on; `written` holds the chunks finished before `action`."""
    import threading
    import time

    @contextlib.contextmanager
    def during(paths, action) -> Iterator[set[int]]:
        hold = tmp_path / "hold-after-chunk"
        hold.touch()
        monkeypatch.setenv("VBATCH_TEST_HOLD_FILE", str(hold))
        ended, written = threading.Event(), set()

        def act() -> None:
            try:
                while not ended.is_set() and not paths.finished_chunks():
                    time.sleep(0.05)
                written.update(paths.finished_chunks())
                action()
            finally:
                hold.unlink(missing_ok=True)

        thread = threading.Thread(target=act, name="at-first-chunk")
        thread.start()
        try:
            yield written
        finally:
            ended.set()
            thread.join()
            monkeypatch.delenv("VBATCH_TEST_HOLD_FILE")

    return during
