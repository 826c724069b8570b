from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from neonnb import Config, QueueManager
from tests.services import MariaDBServer, PostgresServer, RedisClusterServer, RedisServer

DRIVERS = ["memory", "sqlite", "postgres", "mariadb", "redis", "redis_cluster"]


class FakeClock:
    """A clock tests move by hand: `clock.advance(5)`."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """Thread-safe log of what handlers did, shared by the test jobs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.order: list[Any] = []
        self.counts: Counter[Any] = Counter()

    def add(self, item: Any) -> None:
        with self.lock:
            self.order.append(item)
            self.counts[item] += 1


RUNTIME_DEPENDENCIES = ["redis", "hiredis", "SQLAlchemy", "psycopg", "PyMySQL", "croniter", "PyYAML", "ipywidgets",
                        "pandas", "numpy", "pyarrow", "fsspec", "s3fs", "ipykernel", "starlette", "uvicorn",
                        "prometheus_client",
                        "jupyter-server-proxy"]


def pytest_report_header(config: pytest.Config) -> str:
    """Which releases of the runtime dependencies this run used (newest, or the lowest declared)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return "runtime: " + ", ".join(f"{name} {installed(name)}" for name in RUNTIME_DEPENDENCIES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Redis demo notebook talks to $NEONNB_REDIS_URL: a throwaway server, when any
    notebook is collected (the kernels nbval starts inherit this process's environment)."""
    if any(item.path.suffix == ".ipynb" for item in items) and "NEONNB_REDIS_URL" not in os.environ:
        try:
            server = RedisServer()
        except pytest.skip.Exception:
            return  # the notebook falls back to SQLite, as on a machine without Redis
        os.environ["NEONNB_REDIS_URL"] = server.url()
        config.add_cleanup(server.stop)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster_server() -> Iterator[RedisClusterServer]:
    server = RedisClusterServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    server = MariaDBServer()
    yield server
    server.stop()


def connection_for(request: pytest.FixtureRequest, driver: str, tmp_path: Path) -> str:
    """A fresh, empty store for `driver`: a new SQLite file or a new database on the server."""
    if driver == "memory":
        return "memory://"
    if driver == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server = request.getfixturevalue(f"{driver}_server")
    if driver.startswith("redis"):
        return f"{server.url()}?prefix={os.urandom(4).hex()}"  # a fresh key space per test
    return str(server.new_database())


def config_for(connection: str, **settings: Any) -> Config:
    """The Config for a connection from `connection_for` (a Redis one carries its key prefix)."""
    if connection == "memory://":
        return Config(driver="memory", **settings)
    if connection.startswith("redis://"):
        url, _, prefix = connection.partition("?prefix=")
        return Config(driver="redis", connection=url, key_prefix=f"t{prefix}:", **settings)
    return Config(driver="database", connection=connection, **settings)


@pytest.fixture(params=DRIVERS)
def make_manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., QueueManager]]:
    """Managers on the driver under test, all sharing one store; closed at the end of the test."""
    managers: list[QueueManager] = []
    connection = connection_for(request, request.param, tmp_path)

    def make(clock: Callable[[], float] | None = None, **settings: Any) -> QueueManager:
        config = config_for(connection, **settings)
        qm = QueueManager(config, clock=clock or time.time)
        managers.append(qm)
        return qm

    yield make
    for qm in managers:
        qm.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until `condition()` holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def write_config(qm: QueueManager, folder: Path) -> str:
    """A YAML config file naming ``qm``'s store, as a user outside the kernel has it."""
    config = qm.config
    path = folder / "queue.yaml"
    path.write_text(f"driver: {config.driver}\nconnection: '{config.connection}'\n"
                    f"key_prefix: '{config.key_prefix}'\ntable_name: {config.table_name}\n"
                    + (f"artifacts: '{config.artifacts}'\n" if config.artifacts else ""))
    return str(path)
