"""SQL-store behaviour beyond the conformance suite: cross-process wake-ups (LISTEN/NOTIFY on
PostgreSQL, data_version on SQLite), sharing an Engine, a schema that is already there."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from neonnb import Config, QueueManager, SerializationError, Status, StoreError, WorkerOptions
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


# Another driver's write transaction, as a worker's, held until released.
HOLD_A_WRITE = """
import select, sys
from neonnb import Config, QueueManager
qm = QueueManager(Config(connection=sys.argv[1]))
def hold(conn):
    print("holding", flush=True)
    select.select([sys.stdin], [], [], 10)  # until released, at most 10 s
    open(sys.argv[2], "w").close()  # says it is letting go
qm.driver._call(hold, False, True)
qm.close()
"""


@contextlib.contextmanager
def holding_a_write(url: str, in_this_process: bool, tmp_path: Path) -> Iterator[Callable[[], bool]]:
    """Another driver on ``url`` holds a write transaction (in a thread of this process, or
    in another process) until the block ends, at most 10 s; yields whether it still holds it."""
    if in_this_process:
        other, holding, release = QueueManager(Config(connection=url)), threading.Event(), threading.Event()

        def hold(conn: object) -> None:
            holding.set()
            release.wait(10)

        writer = threading.Thread(target=other.driver._call, args=(hold, False, True))  # type: ignore[attr-defined]
        writer.start()
        try:
            assert holding.wait(10)
            yield writer.is_alive
        finally:
            release.set()
            writer.join(10)
            other.close()
    else:
        let_go = tmp_path / "let-go"
        process = subprocess.Popen([sys.executable, "-c", HOLD_A_WRITE, url, str(let_go)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "holding"
            yield lambda: not let_go.exists()
        finally:
            process.communicate("done\n", timeout=10)


@pytest.mark.parametrize("writer_in", ["this process", "another process"])
def test_sqlite_writers_take_turns_so_a_waiting_dispatch_can_be_interrupted(tmp_path: Path, writer_in: str) -> None:
    # Waiting in SQLite's busy handler, a dispatch from a cell could not be interrupted (and
    # slept in steps up to 100 ms); waiting for its turn (a lock between threads, an flock
    # between processes), it can.
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    qm = QueueManager(Config(connection=url))
    qm.size("q")
    # Python's own SIGINT handler, whatever an earlier test in this process installed.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with holding_a_write(url, writer_in == "this process", tmp_path) as still_holding:
            # A real SIGINT to the main thread, as the notebook's Interrupt button sends.
            threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
            with pytest.raises(KeyboardInterrupt):
                qm.dispatch("q", jobs.Note("never stored"))
            assert still_holding(), "the dispatch was interrupted only once the other write had ended"
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    assert qm.size("q") == 0
    qm.dispatch("q", jobs.Note("stored"))  # the turns were given back
    assert qm.size("q") == 1
    qm.close()


@pytest.mark.parametrize("store", ["sqlite", "postgres", "mariadb"])
def test_a_marks_table_made_by_an_older_neonnb_gets_its_new_column(
    request: pytest.FixtureRequest, tmp_path: Path, store: str
) -> None:
    url = connection_for(request, store, tmp_path)
    engine = create_engine(url)
    with engine.begin() as conn:  # the marks table as neonnb made it before batch results
        conn.exec_driver_sql("CREATE TABLE neonnb_jobs_marks (grp VARCHAR(100) NOT NULL, member VARCHAR(36) NOT NULL, "
                             "created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (grp, member))")
    engine.dispose()
    with QueueManager(Config(connection=url)) as qm:
        batch = qm.dispatch_batch("q", [jobs.Note("a"), jobs.Note("b")], then=jobs.Collect())
        worker = qm.worker("q", 2)
        while worker.run_once():
            pass
        assert batch.then is not None and batch.then.result(timeout=5) == ["a", "b"]


def test_a_statement_the_database_refuses_raises_neonnbs_store_error(postgres_server: PostgresServer) -> None:
    """A read-only database (a replica, a full disk's emergency mode): neonnb's error, not
    SQLAlchemy's, says what the database said; what only reads still works."""
    import psycopg

    url = postgres_server.new_database()
    qm = QueueManager(Config.for_url(url))
    qm.dispatch("q", jobs.Note("before"))  # the schema exists
    qm.close()
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    qm = QueueManager(Config.for_url(url))
    try:
        with pytest.raises(StoreError, match=r"refused a statement: cannot execute INSERT in a read-only transaction"):
            qm.dispatch("q", jobs.Note("refused"))
        assert qm.size("q") == 1  # reads still work, as on a replica
    finally:
        qm.close()


def test_a_postgres_claim_reads_the_rows_it_claims_not_the_whole_backlog(postgres_server: PostgresServer) -> None:
    import json

    from neonnb.drivers.database import DatabaseDriver
    from neonnb.drivers.sql_compiled import Compiled

    with QueueManager(Config.for_url(postgres_server.new_database())) as qm:
        qm.dispatch_batch("backlog", [jobs.Note(str(i)) for i in range(2000)])
        driver = qm.driver
        assert isinstance(driver, DatabaseDriver)
        compiled = Compiled(driver._sql.claim[True], driver.engine.dialect)  # one queue, as a worker on one claims
        sql, params = compiled.render({"b_queues": ["backlog"], "b_queue": "backlog", "b_limit": 4, "b_owner": "w",
                                       "b_now": time.time(), "b_lease": time.time() + 30})
        with driver.engine.connect() as conn:
            [[plan]] = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params).all()
            conn.rollback()

    def nodes(node: dict[str, object]) -> Iterator[dict[str, object]]:
        yield node
        for child in node.get("Plans", []):  # type: ignore[attr-defined]
            yield from nodes(child)

    found = list(nodes((json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]))
    scans = [n for n in found if n.get("Index Name") == "neonnb_jobs_claim"]
    assert scans and all(int(n["Actual Rows"]) <= 4 for n in scans), "the claim read more queued rows than it took"  # type: ignore[call-overload]
    assert not [n for n in found if n["Node Type"] == "Sort"], "the claim sorted the backlog"


def test_a_postgres_worker_runs_its_own_statements_on_its_loop(postgres_server: PostgresServer) -> None:
    """Claims, results, retries, failures, progress and lease renewals go over psycopg's async
    connection on the worker's own loop, as does a one-job async dispatch: none passes through
    SQLAlchemy's engines on the driver's threads (a hop to a thread and back per call, and the
    GIL shared with the jobs). A one-job sync dispatch skips them too, on a connection of the
    driver's own."""
    import asyncio

    from sqlalchemy import event

    from neonnb.drivers.database import DatabaseDriver

    with QueueManager(Config.for_url(postgres_server.new_database())) as qm:
        qm.dispatch_batch("q", [jobs.Note("a"), jobs.Progressing(steps=3), jobs.Flaky(succeed_on=0, attempts=2),
                                jobs.Permanent(), jobs.SlowAsync(seconds=0.7)])
        driver = qm.driver
        assert isinstance(driver, DatabaseDriver)
        through_engines: list[str] = []
        for engine in set(driver._engines.values()):
            event.listen(engine, "before_cursor_execute",
                         lambda _conn, _cursor, statement, *_rest: through_engines.append(statement))
        asyncio.run(qm.adispatch("q", jobs.AsyncNote("b")))  # a one-job async dispatch takes the same path
        qm.dispatch("elsewhere", jobs.Note("c"))  # a sync one, on the driver's own connection
        assert qm.size("elsewhere") == 1
        worker = qm.worker("q", 6, WorkerOptions(lease_timeout=0.6))
        worker.run_once()
        by_name = {job.name.rsplit(".", 1)[1]: job for job in qm.jobs(limit=10)}
        assert {name: job.status.value for name, job in by_name.items()} == {
            "Note": "succeeded", "Progressing": "succeeded", "Flaky": "queued", "Permanent": "failed",
            "SlowAsync": "succeeded", "AsyncNote": "succeeded"}
        assert json.loads(by_name["Note"].result or "null") == "a"
        assert by_name["Progressing"].progress is not None and by_name["Progressing"].progress["done"] == 3
        assert by_name["Flaky"].attempts == 1 and by_name["Flaky"].error is not None
    hot = [s for s in through_engines if s.lstrip().upper().startswith(("UPDATE", "WITH", "INSERT"))]
    assert not hot, f"the worker's statements went through the driver's threads: {hot}"


def test_a_postgres_worker_claims_a_big_batch_in_pieces_side_by_side(postgres_server: PostgresServer) -> None:
    """A worker with many free slots claims in pieces sent together over its loop's
    connections, so the first jobs start while PostgreSQL claims the rest; SKIP LOCKED keeps
    the pieces apart: every job runs once, charged one attempt."""
    from typing import Any

    from neonnb.drivers.database import CLAIM_PIECE, DatabaseDriver

    with QueueManager(Config.for_url(postgres_server.new_database())) as qm:
        qm.dispatch_batch("q", [jobs.Note(str(i)) for i in range(2 * CLAIM_PIECE + 50)])
        driver = qm.driver
        assert isinstance(driver, DatabaseDriver)
        limits: list[int] = []
        in_flight, most = [0], [0]
        reserve = driver.reserve

        async def counted(queues: Any, limit: int, *args: Any, **kwargs: Any) -> Any:
            limits.append(limit)
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            try:
                return await reserve(queues, limit, *args, **kwargs)
            finally:
                in_flight[0] -= 1

        driver.reserve = counted  # type: ignore[method-assign]
        assert qm.worker("q", 2 * CLAIM_PIECE + 50).run_once() == 2 * CLAIM_PIECE + 50
        ran = qm.jobs(limit=1000)
        assert len(ran) == 2 * CLAIM_PIECE + 50
        assert all(job.status.value == "succeeded" and job.attempts == 1 for job in ran)
    assert limits == [CLAIM_PIECE, CLAIM_PIECE, 50] and most[0] == 3


def test_a_postgres_worker_call_to_a_lost_database_says_so_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    """The worker's calls on its own loop fail as the driver's others do: StoreUnavailable
    naming the database, never its password (trust auth here takes any password)."""
    import asyncio

    import psycopg

    from neonnb import StoreUnavailable

    url = postgres_server.new_database().replace("postgres@", "postgres:s3cr3t-pw@")
    name = url.rsplit("/", 1)[1]
    with QueueManager(Config.for_url(url)) as qm:
        qm.dispatch("q", jobs.Note("x"))

        async def claim_drop_claim() -> None:
            [claimed] = await qm.driver.reserve(["q"], 1, "w", time.time(), time.time() + 30)
            assert claimed.status.value == "running"
            with psycopg.connect(f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres",
                                 autocommit=True) as admin:
                admin.execute(f"DROP DATABASE {name} WITH (FORCE)")  # ends its sessions too
            with pytest.raises(StoreUnavailable, match=f"the database .*{name} can't be reached") as lost:
                await qm.driver.complete([(claimed, None)], "w", time.time())
            assert "s3cr3t" not in str(lost.value)

        asyncio.run(claim_drop_claim())


def test_a_sqlite_worker_calls_on_its_own_thread_and_never_waits_there_for_the_lock(tmp_path: Path) -> None:
    """A worker's SQLite calls run on its own thread while the write lock is free (no hop to
    the driver's thread, no pass through SQLAlchemy's engines). When a writer outside neonnb
    holds the lock, the call waits for it on the driver's thread: the worker's loop keeps
    running meanwhile."""
    import asyncio
    import sqlite3

    from sqlalchemy import Engine, event

    from neonnb.drivers.database import DatabaseDriver

    path = tmp_path / "jobs.db"
    seen: list[tuple[str, str]] = []

    def note(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        seen.append((threading.current_thread().name, statement.lstrip().split()[0]))

    with QueueManager(Config.for_url(f"sqlite:///{path}")) as qm:
        qm.dispatch("q", jobs.Note("a"))
        driver = qm.driver
        assert isinstance(driver, DatabaseDriver) and driver._here is not None
        # The calls made here skip SQLAlchemy: their own connection shows what it runs.
        driver._here._connection().set_trace_callback(lambda statement: note(None, None, statement))

        async def claim_then_complete_behind_a_lock() -> None:
            now = time.time()
            [claimed] = await qm.driver.reserve(["q"], 1, "w", now, now + 30)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the write lock, held by someone else
            asyncio.get_running_loop().call_later(0.5, other.rollback)  # only runs if the loop does
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.create_task(tick())
            assert await qm.driver.complete([(claimed, None)], "w", time.time()) == [claimed.id]
            ticker.cancel()
            other.close()
            assert ticks >= 20, "the loop stood still while the lock was held"

        event.listen(Engine, "before_cursor_execute", note)
        try:
            asyncio.run(claim_then_complete_behind_a_lock())
        finally:
            event.remove(Engine, "before_cursor_execute", note)
    claim, complete = [(thread, verb) for thread, verb in seen if verb in ("WITH", "UPDATE")]
    assert claim == ("MainThread", "WITH")  # asyncio.run's loop: this thread, on the driver's own connection
    assert complete[0].startswith("neonnb-db")  # the lock was taken: the driver's thread waited for it


def test_postgresql_keeps_payloads_and_results_uncompressed(postgres_server: PostgresServer) -> None:
    """They are mostly Parquet already; pglz would spend most of a big result's write on them."""
    url = postgres_server.new_database()
    for _ in range(2):  # a second start finds it done
        with QueueManager(Config.for_url(url)) as qm:
            qm.dispatch("q", jobs.Note("a"))
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            storage = dict(conn.execute(text(
                "SELECT attname, attstorage FROM pg_attribute WHERE attrelid = 'neonnb_jobs'::regclass "
                "AND attname IN ('payload', 'result', 'error')")).all())
    finally:
        engine.dispose()
    assert storage == {"payload": "e", "result": "e", "error": "x"}


def test_values_over_what_mariadb_takes_are_refused_by_size_not_reported_as_an_outage(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """MariaDB refuses a statement over max_allowed_packet (16 MiB here) by dropping the
    connection ("server has gone away"). neonnb reads that limit: a bigger argument is refused
    at dispatch, a bigger result fails its job at once (not retried until its lease runs out),
    both saying what to do; a small job acknowledged beside it is not dragged down."""
    with QueueManager(Config(connection=connection_for(request, "mariadb", tmp_path))) as qm:
        with pytest.raises(SerializationError, match=r"max_allowed_packet.*artifacts="):
            qm.dispatch("q", jobs.Note("x" * 50_000_000))
        big, small = qm.dispatch("q", jobs.Sized(20_000_000)), qm.dispatch("q", jobs.Sized(10))
        worker = qm.worker("q", 2)
        while worker.run_once():
            pass
        assert small.result(timeout=5) == "x" * 10
        failed = qm.failed.get(big.id)
        assert (failed.error_type, failed.attempts) == ("neonnb.errors.ResultError", 1)
        assert "max_allowed_packet" in failed.error
        assert qm.dispatch("q", jobs.Note("after")).status is Status.QUEUED, "the store is not taken for down"
