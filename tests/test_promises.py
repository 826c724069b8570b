"""Promises a user relies on at the edges: jobs that misbehave, the spec's own patterns.

Each test is named after the promise it keeps. Driver-level promises live in the
conformance suite, which runs them on every store.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import neonnb._loop as loop
from neonnb import Config, QueueManager, Status, WorkerOptions
from neonnb.worker.outcomes import backoff_delay
from tests import jobs
from tests.conftest import FakeClock, wait_until
from tests.services import PostgresServer, RedisServer


@pytest.fixture(autouse=True)
def fresh_recorder() -> Iterator[None]:
    jobs.RECORD.__init__()  # type: ignore[misc]
    jobs.RELEASE.clear()
    yield
    jobs.RELEASE.set()  # no test leaves a handler thread waiting


@pytest.fixture
def qm() -> Iterator[QueueManager]:
    manager = QueueManager(Config(driver="memory", poll_interval=0.05))
    yield manager
    jobs.RELEASE.set()
    manager.close()


@pytest.mark.parametrize("job", [jobs.Exits("exit"), jobs.Exits("interrupt"), jobs.ExitsAsync("exit"),
                                 jobs.ExitsAsync("interrupt")], ids=["sync-exit", "sync-interrupt",
                                                                     "async-exit", "async-interrupt"])
def test_a_job_that_exits_ends_failed_and_its_worker_goes_on(qm: QueueManager, job: object) -> None:
    exiting = qm.dispatch("q", job)
    worker = qm.worker("q", 2).start()
    wait_until(lambda: exiting.status is Status.FAILED, timeout=10, what="the exiting job to fail")
    after = qm.dispatch("q", jobs.Note("after"))
    assert after.result(timeout=10) == "after"
    failed = qm.failed.get(exiting.id)
    assert failed.error_type in ("SystemExit", "KeyboardInterrupt")
    assert failed.attempts == 1, "a job that asked to exit is not retried"
    assert worker.is_running
    worker.stop(grace=5)
    assert not worker.is_running


def test_a_timed_out_thread_holds_its_slot_and_later_jobs_get_their_whole_timeout(
    qm: QueueManager, caplog: pytest.LogCaptureFixture
) -> None:
    qm.config.timeout = 0.5  # the quick jobs' timeout: it must count from when each starts
    stuck = qm.dispatch("q", jobs.Stubborn(timeout_s=0.1))
    quick = [qm.dispatch("q", jobs.Note(f"quick-{i}")) for i in range(10)]
    with caplog.at_level(logging.WARNING, "neonnb.worker"):
        worker = qm.worker("q", 1).start()
        wait_until(lambda: stuck.status is Status.FAILED, timeout=10, what="the stuck job to time out")
        wait_until(lambda: "claiming nothing" in caplog.text, timeout=10, what="the worker to say it waits")
    assert "timeout of 0.1s" in qm.failed.get(stuck.id).error
    assert {h.status for h in quick} == {Status.QUEUED}, "jobs were claimed while every slot was held"
    jobs.RELEASE.set()
    assert [h.result(timeout=10) for h in quick] == [f"quick-{i}" for i in range(10)]
    worker.stop()


def test_graceful_stop_never_releases_a_job_whose_thread_still_runs(
    qm: QueueManager, caplog: pytest.LogCaptureFixture
) -> None:
    handle = qm.dispatch("q", jobs.Stubborn())
    worker = qm.worker("q", 1).start()
    wait_until(lambda: jobs.RECORD.counts["stubborn-start"] == 1, timeout=10, what="the job to start")
    with caplog.at_level(logging.WARNING, "neonnb.worker"):
        stopper = threading.Thread(target=worker.stop, kwargs={"grace": 0.1})
        stopper.start()
        wait_until(lambda: "still running past the grace period" in caplog.text, timeout=10,
                   what="the worker to say it waits for the thread")
    assert handle.status is Status.RUNNING, "the job went back to the queue while its thread runs"
    other = qm.worker("q", 1)
    assert other.run_once() == 0, "another worker could claim the job while it runs"
    jobs.RELEASE.set()
    returned = time.monotonic()
    stopper.join(10)
    assert time.monotonic() - returned < 2, "the worker stops as soon as the thread returns"
    # Its thread returned normally: the work is done, so it is recorded, not run a second time.
    assert handle.result(timeout=5) == "finally"
    assert (handle.fetch().attempts, jobs.RECORD.counts["stubborn-start"]) == (1, 1)


def test_graceful_stop_releases_a_sync_job_whose_thread_raises_past_the_grace(qm: QueueManager) -> None:
    """Stopped part-way (it raised on ctx.cancelled, say): its work isn't done, so it goes back
    to the queue, its attempt not counted."""
    handle = qm.dispatch("q", jobs.StubbornThenRaises())
    worker = qm.worker("q", 1).start()
    wait_until(lambda: jobs.RECORD.counts["stubborn-start"] == 1, timeout=10, what="the job to start")
    stopper = threading.Thread(target=worker.stop, kwargs={"grace": 0.1})
    stopper.start()
    time.sleep(0.3)
    jobs.RELEASE.set()
    stopper.join(10)
    record = handle.fetch()
    assert (record.status, record.attempts) == (Status.QUEUED, 0)


def test_a_worker_stopped_by_max_jobs_starts_again(qm: QueueManager) -> None:
    for i in range(5):
        qm.dispatch("q", jobs.Note(f"n{i}"))
    worker = qm.worker("q", 1, WorkerOptions(max_jobs=2))
    worker.run()
    assert len(jobs.RECORD.order) == 2 and not worker.is_running
    worker.run()  # the spec: `if !worker.IsRunning() { worker.Start() }`
    assert len(jobs.RECORD.order) == 4
    worker.start()
    wait_until(lambda: len(jobs.RECORD.order) == 5, timeout=10, what="the last job")


def test_the_specs_argument_less_retry_delay_is_honoured() -> None:
    clock = FakeClock()
    qm = QueueManager(Config(driver="memory"), clock=clock)
    handle = qm.dispatch("q", jobs.SeedRetryDelay())
    qm.worker("q", 1).run_once()
    record = handle.fetch()
    assert (record.status, record.run_at - clock()) == (Status.QUEUED, 3.0)
    assert record.error is not None and record.error["message"] == "try later"


def test_a_job_method_neonnb_cannot_call_is_refused_when_the_class_is_defined() -> None:
    from neonnb import Job

    with pytest.raises(TypeError, match=r"Bad\.retry_delay takes 1 argument\(s\) after self.*retry_delay\(self\)"):
        class Bad(Job):
            def handle(self, ctx: object) -> None: ...

            def retry_delay(self, attempt: int) -> float:
                return 1.0

    with pytest.raises(TypeError, match=r"should_retry takes 0 argument"):
        class AlsoBad(Job):
            def handle(self, ctx: object) -> None: ...

            def should_retry(self) -> bool:
                return True


def test_a_raising_should_retry_keeps_the_jobs_own_error(qm: QueueManager) -> None:
    handle = qm.dispatch("q", jobs.RaisingShouldRetry())
    qm.worker("q", 1).run_once()
    failed = qm.failed.get(handle.id)
    assert failed.error_type == "ConnectionError"
    assert failed.error.startswith("the real problem")
    assert "should_retry is broken" in failed.error and "should_retry is broken" in failed.traceback


def test_backoff_never_overflows_however_many_attempts() -> None:
    assert backoff_delay(1025, 5.0, 3600.0) == 3600.0
    assert backoff_delay(10**6, 5.0, 3600.0, jitter=True) <= 3600.0


def test_the_specs_host_port_redis_connection_works(redis_server: RedisServer) -> None:
    config = Config(driver="redis", connection=f"127.0.0.1:{redis_server.port}", key_prefix=f"t{os.urandom(4).hex()}:")
    with QueueManager(config) as qm:
        handle = qm.dispatch("q", jobs.Note("host-port"))
        qm.worker("q", 1).run_once()
        assert handle.result(timeout=10) == "host-port"


def test_the_longest_table_name_allowed_works_on_postgres(postgres_server: PostgresServer) -> None:
    config = Config(connection=postgres_server.new_database(), table_name="t" * 54)
    with QueueManager(config) as qm:
        handle = qm.dispatch("q", jobs.Note("long-name"))
        qm.worker("q", 1).run_once()
        assert handle.result(timeout=10) == "long-name"


@pytest.mark.parametrize("url", ["postgresql://app:s3cret@127.0.0.1:{port}/db", "mysql://app:s3cret@127.0.0.1:{port}/db",
                                 "sqlite:////nonexistent-dir/jobs.db"], ids=["postgres", "mariadb", "sqlite"])
def test_an_unreachable_sql_store_raises_store_unavailable(url: str) -> None:
    from neonnb import StoreUnavailable
    from tests.services import free_port

    with QueueManager(Config(connection=url.format(port=free_port()))) as qm:
        for call in (lambda: qm.dispatch("q", jobs.Note("x")), qm.stats,
                     lambda: qm.dispatch_batch("q", [jobs.Note("y")] * 2)):
            with pytest.raises(StoreUnavailable, match="can't be reached") as raised:
                call()
            assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("store", ["postgres", "mariadb", "redis"])
def test_a_worker_whose_clock_disagrees_with_the_store_refuses_to_start(
    request: pytest.FixtureRequest, tmp_path: Path, store: str
) -> None:
    import time

    from neonnb import ClockSkew
    from tests.conftest import config_for, connection_for

    connection = connection_for(request, store, tmp_path)
    ahead = QueueManager(config_for(connection, lease_timeout=30), clock=lambda: time.time() + 60)
    try:
        with pytest.raises(ClockSkew, match=r"clock is (59|60)\.\ds ahead of the store's: with a lease of 30s"):
            ahead.worker("q", 1).start()
        with pytest.raises(ClockSkew, match="behind"):
            QueueManager(ahead.config, driver=ahead.driver, clock=lambda: time.time() - 60).worker("q", 1).run()
        offset = [3.0]
        slightly = QueueManager(ahead.config, driver=ahead.driver, clock=lambda: time.time() + offset[0])
        worker = slightly.worker("q", 1).start()  # within a quarter of the lease: it runs, and says so
        assert worker.is_running
        # The clock jumps 60 s ahead while the worker runs: the job another worker holds (its
        # lease 30 s by the store's clock) must not be taken for dead.
        on_time = QueueManager(ahead.config, driver=ahead.driver)  # another machine, its clock right
        held = on_time.dispatch("elsewhere", jobs.Note("held elsewhere"))
        [_] = loop.run_sync(slightly.driver.reserve(["elsewhere"], 1, "other-worker", time.time(), time.time() + 30))
        offset[0] = 60.0
        loop.run_sync(slightly.core.housekeeping(time.time() + 60))
        assert held.status is Status.RUNNING, "a live job was recovered by a worker whose clock jumped ahead"
        worker.stop()
    finally:
        ahead.close()


def test_an_async_handler_that_blocks_the_loop_is_named_before_its_lease_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    qm = QueueManager(Config(driver="memory", lease_timeout=6))
    try:
        with caplog.at_level(logging.WARNING, "neonnb.worker"):
            worker = qm.worker("q", 2).start()
            blocker = qm.dispatch("q", jobs.BlocksTheLoop(5.0))
            wait_until(lambda: "its event loop has been blocked" in caplog.text, timeout=4.5,
                       what="a warning while the loop is still blocked")
            assert blocker.result(timeout=10) == "unblocked"
            worker.stop()
        blocked = next(r for r in caplog.records if "has been blocked" in r.getMessage()).getMessage()
        assert f"job {blocker.id} (tests.jobs.BlocksTheLoop)" in blocked
        assert "an async handler must not block" in blocked
        assert "time.sleep(self.seconds)" in blocked  # where it is stuck
        assert "answers again" in caplog.text
    finally:
        qm.close()


def test_a_loop_blocked_by_neonnbs_own_work_does_not_blame_the_handler(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading and decoding a big payload on the loop (forced here: from 256 KiB it happens on
    a thread) is neonnb's work, not the handler's: the warning says so."""
    import neonnb.worker.execute
    from tests import data_jobs

    monkeypatch.setattr(neonnb.worker.execute, "OFF_LOOP_BYTES", 10**12)
    monkeypatch.setattr(neonnb.worker.execute, "is_reference", lambda text: False)  # kept apart: read on the loop
    qm = QueueManager(Config(driver="memory", lease_timeout=1.2))
    try:
        with caplog.at_level(logging.WARNING, "neonnb.worker"):
            worker = qm.worker("q", 1).start()
            handle = qm.dispatch("q", data_jobs.Echo([{"n": [i]} for i in range(600_000)]))
            handle.wait(timeout=60)
            worker.stop()
        blocked = [r.getMessage() for r in caplog.records if "has been blocked" in r.getMessage()]
        assert blocked, "the loop was blocked long enough to be noticed"
        assert all("not the handler's own code" in m and "an async handler must not" not in m for m in blocked)
    finally:
        qm.close()


def test_a_job_reporting_progress_constantly_costs_the_store_a_few_writes() -> None:
    from neonnb.drivers.memory import MemoryDriver

    class Counting(MemoryDriver):
        writes = 0

        async def set_progress(self, job: object, worker_id: str, progress: dict[str, object]) -> None:
            Counting.writes += 1
            await super().set_progress(job, worker_id, progress)  # type: ignore[arg-type]

    qm = QueueManager(Config(driver="memory"), driver=Counting())
    try:
        handle = qm.dispatch("q", jobs.Progressing(20_000))
        qm.worker("q", 1).run_once()
        assert handle.result(timeout=10) == 20_000
        assert handle.progress == {"done": 20_000, "total": 20_000, "message": "step 20000"}  # the last value
        assert Counting.writes <= 10, f"{Counting.writes} progress writes for 20,000 reports"
    finally:
        qm.close()


@pytest.mark.timeout(120)
def test_jobs_that_finish_while_the_store_is_down_are_not_run_again() -> None:
    """PostgreSQL down for longer than the leases while handlers finish: when it is back,
    their acknowledgements are taken (nobody else claimed the jobs), none runs a second time."""
    pg = PostgresServer()
    try:
        config = Config.for_url(pg.new_database(), lease_timeout=3, poll_interval=0.1)
        managers = [QueueManager(config), QueueManager(config)]  # two "processes"
        try:
            handles = managers[0].dispatch_batch("q", [jobs.Counted(n, 1.5) for n in range(8)])
            workers = [qm.worker("q", 4).start() for qm in managers]
            wait_until(lambda: sum(jobs.RECORD.counts[f"ran-{n}"] for n in range(8)) == 8, timeout=30,
                       what="every job to start")
            pg.down()
            time.sleep(5)  # the handlers finish; the leases (3 s) run out
            pg.start()
            assert [h.result(timeout=60) for h in handles] == list(range(8))
            ran = {n: jobs.RECORD.counts[f"ran-{n}"] for n in range(8)}
            assert ran == dict.fromkeys(range(8), 1), f"jobs run again after the outage: {ran}"
            for worker in workers:
                worker.stop()
        finally:
            for qm in managers:
                qm.close()
    finally:
        pg.stop()


def test_a_result_the_store_refuses_fails_its_job_alone_and_its_batch_mates_are_acknowledged() -> None:
    """The store refuses one acknowledgement (a value it won't take): that job fails, not
    retried, saying what the store said; the jobs acknowledged in the same write succeed."""
    from neonnb import StoreError
    from neonnb.drivers.memory import MemoryDriver

    class Refusing(MemoryDriver):
        async def complete(self, results: Any, worker_id: str, now: float) -> list[str]:
            if any(result == '"refuse me"' for _, result in results):
                raise StoreError("value too large for column result")
            return await super().complete(results, worker_id, now)

    qm = QueueManager(Config(driver="memory"), driver=Refusing())
    try:
        handles = [qm.dispatch("q", jobs.Note(tag)) for tag in ("a", "refuse me", "b", "c")]
        worker = qm.worker("q", 4)
        while worker.run_once():
            pass
        assert [handles[i].result(timeout=5) for i in (0, 2, 3)] == ["a", "b", "c"]
        failed = qm.failed.get(handles[1].id)
        assert failed.attempts == 1 and "the store refused the job's result: value too large" in failed.error
    finally:
        qm.close()
