"""Real worker processes, SIGKILLed mid-job: no dispatched job is ever lost."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from neonnb import Config, JobHandle, QueueManager, Status, StoreUnavailable
from tests import jobs
from tests.conftest import config_for, connection_for, wait_until
from tests.services import PostgresServer, RedisServer

ROOT = Path(__file__).resolve().parents[1]


def start_worker(config: Path, tmp_path: Path, n: int) -> subprocess.Popen[bytes]:
    with (tmp_path / f"worker-{n}.log").open("wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "neonnb", "--log-level", "WARNING", "worker", str(config),
             "-q", "crash", "-c", "1", "--import", "tests.jobs"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )


def write_config(path: Path, connection: str, **settings: str) -> Config:
    """The YAML file worker processes start from, for a connection from `connection_for`."""
    config = config_for(connection)
    fields = {"driver": config.driver, "connection": config.connection or "", "key_prefix": config.key_prefix,
              **settings}
    path.write_text("queue:\n" + "".join(f"  {k}: '{v}'\n" for k, v in fields.items()))
    return Config.from_yaml(path)


@pytest.mark.parametrize(
    ("store", "total", "processes", "kills"),
    [("sqlite", 500, 2, 3), ("postgres", 1000, 3, 3), ("redis", 1000, 3, 5)],
)
def test_sigkilled_workers_lose_no_job(
    request: pytest.FixtureRequest, tmp_path: Path, store: str, total: int, processes: int, kills: int
) -> None:
    config_file = tmp_path / "queue.yaml"
    # A short lease so kills recover fast, not so short that a busy CI box loses live leases.
    config = write_config(
        config_file, connection_for(request, store, tmp_path), lease_timeout="5s", poll_interval="200ms"
    )
    log = tmp_path / "jobs.log"
    hanging = {total * (k + 1) // (kills + 1) for k in range(kills)}  # first attempts hang until we kill them
    qm = QueueManager(config)
    handles = qm.dispatch_batch(
        "crash", [jobs.Crashable(n, str(log), hang=n in hanging) for n in range(total)]
    )
    hanging_ids = {handles[n].id for n in hanging}
    workers = [start_worker(config_file, tmp_path, i) for i in range(processes)]
    killed: set[int] = set()
    try:
        for kill in range(kills):
            def victim() -> int | None:
                lines = log.read_text().splitlines() if log.exists() else []
                for line in lines:
                    if len(line.split()) != 4:
                        continue  # the last line may be half written
                    _, job_id, attempt, pid = line.split()
                    if line.startswith("start") and job_id in hanging_ids and attempt == "1" and int(pid) not in killed:
                        return int(pid)
                return None

            wait_until(lambda: victim() is not None, timeout=60, what=f"a worker hanging mid-job (kill {kill + 1})")
            pid = victim()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            dead = next(w for w in workers if w.pid == pid)
            dead.wait(10)
            workers.remove(dead)
            workers.append(start_worker(config_file, tmp_path, len(killed) + 1))
        wait_until(lambda: qm.stats()["crash"].succeeded == total, timeout=120, what=f"all {total} jobs to succeed")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        exit_codes = [worker.wait(30) for worker in workers]
    assert exit_codes == [0] * processes, "workers must exit cleanly on SIGTERM"

    records = [h.fetch() for h in handles]
    assert [r.status for r in records] == [Status.SUCCEEDED] * total
    assert [json.loads(r.result or "null") for r in records] == list(range(total))
    # A job runs again only if its first attempt was on a killed worker: the job it hung in,
    # or one it had finished whose acknowledgement had not reached the store yet.
    starts_log = [line.split() for line in log.read_text().splitlines() if line.startswith("start")]
    first_run_by = {job_id: int(pid) for _, job_id, attempt, pid in starts_log if attempt == "1"}
    again = {r.id: r.attempts for r in records if r.attempts > 1}
    assert hanging_ids <= set(again)
    assert all(n == 2 and first_run_by[job_id] in killed for job_id, n in again.items()), (
        f"jobs run again whose first worker was not killed: {again}")
    starts = Counter(job_id for _, job_id, _, _ in starts_log)
    assert all(starts[r.id] == r.attempts for r in records), "every attempt is one start of the handler"
    qm.close()


def dispatch_through_outage(config: Config, config_file: Path, tmp_path: Path, outage: Callable[[], None]) -> None:
    """Two worker processes; 300 dispatches with `outage()` after the first 100, once the
    workers are busy. Every dispatch that returned must be processed, by workers that were
    never restarted."""
    log = tmp_path / "jobs.log"
    qm = QueueManager(config)
    qm.size("crash")  # create the schema before the workers race to
    workers = [start_worker(config_file, tmp_path, i) for i in range(2)]
    returned: list[JobHandle] = []
    try:
        for n in range(300):
            if n == 100:
                wait_until(lambda: qm.stats()["crash"].succeeded >= 20, what="the workers to be busy")
                outage()
            returned.append(qm.dispatch("crash", jobs.Crashable(n, str(log), seconds=0.02)))
        wait_until(
            lambda: all(h.fetch().status is Status.SUCCEEDED for h in returned), timeout=120,
            what="every returned dispatch to be processed",
        )
        assert all(w.poll() is None for w in workers), "a worker died with the store instead of reconnecting"
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        exit_codes = [worker.wait(30) for worker in workers]
        qm.close()
    assert exit_codes == [0, 0]


def test_workers_ride_out_a_postgres_restart(postgres_server: PostgresServer, tmp_path: Path) -> None:
    config_file = tmp_path / "queue.yaml"
    config = write_config(config_file, postgres_server.new_database(), lease_timeout="5s", poll_interval="200ms")
    dispatch_through_outage(config, config_file, tmp_path, postgres_server.restart)  # pg_ctl restart -m fast


# Connections that broke when the server died are collected here, where they come from,
# rather than in whichever test runs next.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_workers_ride_out_a_redis_kill_and_restart(tmp_path: Path) -> None:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    config_file = tmp_path / "queue.yaml"
    config = write_config(config_file, server.url(), lease_timeout="5s", poll_interval="200ms")

    def kill_and_restart() -> None:
        server.kill()  # SIGKILL: only what the append-only file holds survives
        with QueueManager(config) as qm, pytest.raises(StoreUnavailable, match="can't be reached"):
            qm.dispatch("crash", jobs.Crashable(-1, str(tmp_path / "jobs.log")))
        server.start()

    try:
        dispatch_through_outage(config, config_file, tmp_path, kill_and_restart)
    finally:
        server.stop()
        gc.collect()


def test_every_outcome_a_worker_recorded_survives_a_postgres_crash() -> None:
    # The WAL writer flushes at most every 10 s here, so only a commit that waits for its own
    # flush survives the crash: the dispatches do, and every outcome a user sees must.
    server = PostgresServer(fsync=True, wal_writer_delay="10s")
    try:
        config = Config(connection=server.new_database(), retry_delay=3600)
        qm = QueueManager(config)
        succeeded = qm.dispatch_batch("q", [jobs.Last(f"ok-{i}") for i in range(40)])
        failed = qm.dispatch_batch("q", [jobs.Permanent() for _ in range(20)])
        retried = qm.dispatch_batch("q", [jobs.Flaky(attempts=5) for _ in range(20)])
        worker = qm.worker("q", 8).start()
        wait_until(lambda: qm.stats()["q"].succeeded == 40 and qm.stats()["q"].failed == 20
                   and qm.stats()["q"].delayed == 20, timeout=60, what="every job's first outcome")
        worker.stop()
        server.crash_and_restart()
        counts = qm.stats()["q"]
        assert (counts.succeeded, counts.failed, counts.delayed, counts.running) == (40, 20, 20, 0)
        assert {qm.failed.get(h.id).error for h in failed} == {"bad input, don't retry"}
        assert {h.fetch().error["type"] for h in retried} == {"ConnectionError"}  # type: ignore[index]
        assert {h.result(timeout=1) for h in succeeded} == {f"ok-{i}" for i in range(40)}
        qm.close()
    finally:
        server.stop()


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
@pytest.mark.parametrize("store", ["postgres", "mariadb", "redis"])
def test_a_dispatch_whose_reply_was_lost_is_stored_once(
    request: pytest.FixtureRequest, tmp_path: Path, store: str, batch: bool
) -> None:
    from tests.faults import ReplyCutter

    server = request.getfixturevalue(f"{store}_server")
    cutter = ReplyCutter(server.port)
    connection = connection_for(request, store, tmp_path).replace(f":{server.port}/", f":{cutter.port}/")
    qm = QueueManager(config_for(connection))
    try:
        qm.size("q")  # the schema exists and a connection is open
        qm.dispatch("warm-up", jobs.Note("warm"))  # and the sync dispatch's own connection
        cutter.cut_next_reply()
        if batch:
            handles = list(qm.dispatch_batch("q", [jobs.Note(f"b{i}") for i in range(5)]))
        else:
            handles = [qm.dispatch("q", jobs.Note("once"))]
        assert cutter.cut.is_set(), "no reply was lost: the test tested nothing"
        assert qm.size("q") == len(handles)
        assert {h.status for h in handles} == {Status.QUEUED}
    finally:
        qm.close()
        cutter.close()


@pytest.mark.parametrize("store", ["postgres", "redis"])
def test_jobs_a_claim_took_whose_reply_was_lost_run_without_an_attempt_charged(
    request: pytest.FixtureRequest, tmp_path: Path, store: str
) -> None:
    from tests.faults import ReplyCutter

    jobs.RECORD.__init__()  # type: ignore[misc]
    server = request.getfixturevalue(f"{store}_server")
    cutter = ReplyCutter(server.port)
    connection = connection_for(request, store, tmp_path)
    dispatcher = QueueManager(config_for(connection))
    # Through the proxy, with a lease short enough that jobs left claimed would expire (and,
    # at one attempt each, fail) within the test.
    through = connection.replace(f":{server.port}/", f":{cutter.port}/")
    qm = QueueManager(config_for(through, lease_timeout=2, poll_interval=0.1))
    try:
        handles = [dispatcher.dispatch("q", jobs.Last(f"lost-claim-{i}")) for i in range(10)]
        cutter.cut_next_reply(containing=b"lost-claim")
        worker = qm.worker("q", 4).start()
        wait_until(lambda: all(h.status in (Status.SUCCEEDED, Status.FAILED) for h in handles), timeout=30,
                   what="every job to end")
        worker.stop()
        assert cutter.cut.is_set(), "no claim's reply was lost: the test tested nothing"
        assert {h.status for h in handles} == {Status.SUCCEEDED}
        assert {h.fetch().attempts for h in handles} == {1}
        assert set(jobs.RECORD.counts.values()) == {1} and len(jobs.RECORD.counts) == 10
    finally:
        qm.close()
        dispatcher.close()
        cutter.close()
