"""SQL-store behaviour beyond the conformance suite: cross-process wake-ups (LISTEN/NOTIFY on
PostgreSQL, data_version on SQLite), sharing an Engine, a schema that is already there."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from neonnb import Config, QueueManager, WorkerOptions
from tests import jobs
from tests.conftest import connection_for
from tests.services import PostgresServer


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_idle_worker_wakes_on_a_dispatch_from_another_process(
    request: pytest.FixtureRequest, tmp_path: Path, store: str
) -> None:
    url = connection_for(request, store, tmp_path)
    # poll_interval of a minute: only a notification can explain a quick start.
    worker_side = QueueManager(Config(connection=url, poll_interval=60))
    dispatcher = QueueManager(Config(connection=url))
    try:
        worker = worker_side.worker("wake", 1, WorkerOptions()).start()
        worker_side.size("wake")  # the schema and trigger exist before we start timing
        time.sleep(0.3)  # let the worker reach its idle wait
        started = time.monotonic()
        handle = dispatcher.dispatch("wake", jobs.AsyncNote("ping"))
        assert handle.result(timeout=10) == "ping"
        assert time.monotonic() - started < 5, "the worker waited for its poll instead of waking"
        started = time.monotonic()
        worker.stop()
        assert time.monotonic() - started < 30, "stop() waited for the poll interval"
    finally:
        worker_side.close()
        dispatcher.close()


def test_engine_connection_table_name_and_existing_schema(postgres_server: PostgresServer) -> None:
    engine = create_engine(postgres_server.new_database())
    first = QueueManager(Config(connection=engine, table_name="jobs"))
    handle = first.dispatch("q", jobs.Note("one"))
    # A second process meeting the tables already there accepts them.
    second = QueueManager(Config(connection=engine, table_name="jobs"))
    assert second.size("q") == 1
    assert "jobs" in inspect(engine).get_table_names()
    second.worker("q", 1).run_once()
    assert handle.result(timeout=1) == "one"
    first.close()
    second.close()
    engine.dispose()


def test_sqlite_writers_of_one_process_take_turns_so_a_waiting_dispatch_can_be_interrupted(tmp_path: Path) -> None:
    # Waiting in SQLite's busy handler, a dispatch from a cell could not be interrupted (and
    # slept in steps up to 100 ms); waiting for its turn on a lock, it can.
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    qm, worker_side = QueueManager(Config(connection=url)), QueueManager(Config(connection=url))
    qm.size("q")
    holding, release = threading.Event(), threading.Event()

    def long_write(conn: object) -> None:  # a transaction of the other driver, as a worker's
        holding.set()
        release.wait(10)

    writer = threading.Thread(target=worker_side.driver._call, args=(long_write, False, True))  # type: ignore[attr-defined]
    writer.start()
    # Python's own SIGINT handler, whatever an earlier test in this process installed.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert holding.wait(10)
        # A real SIGINT to the main thread, as the notebook's Interrupt button sends.
        threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            qm.dispatch("q", jobs.Note("never stored"))
        assert writer.is_alive(), "the dispatch was interrupted only once the other write had ended"
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        release.set()
        writer.join(10)
    assert qm.size("q") == 0
    qm.close()
    worker_side.close()
