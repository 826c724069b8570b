"""Chaos: three worker processes on one store, with mixed fast, slow, failing, flaky and
timing-out jobs, while the test SIGKILLs workers mid-job, SIGSTOPs one past its lease and
crashes the store's server for a moment and for longer than the lease. No job is lost, no
attempt is charged without its handler starting, and a job runs twice only where a worker
running it was killed or stopped."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from neonnb import QueueManager, Status
from tests import jobs
from tests.conftest import wait_until
from tests.services import PostgresServer, RedisServer
from tests.test_crash import start_worker, write_config

KINDS = ["fast"] * 90 + ["slow"] * 20 + ["failing"] * 20 + ["flaky"] * 10 + ["timeout"] * 10


def _starts(log: Path) -> list[list[str]]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [parts for line in lines if len(parts := line.split()) == 5]  # the last line may be half written


@pytest.mark.parametrize("store", ["sqlite", "postgres", "redis"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # connections the server kill broke
def test_chaos_loses_no_job_and_charges_no_attempt_unstarted(tmp_path: Path, store: str) -> None:
    outage: Callable[[float], None] | None  # the store's server crashes, and is back after so many seconds
    if store == "sqlite":
        connection, outage, stop = f"sqlite:///{tmp_path / 'jobs.db'}", None, lambda: None
    elif store == "postgres":
        pg = PostgresServer()

        def pg_outage(seconds: float) -> None:
            pg.down()  # as if it crashed: what the WAL holds survives
            time.sleep(seconds)
            pg.start()

        connection, outage, stop = pg.new_database(), pg_outage, pg.stop
    else:
        redis_server = RedisServer("--appendonly", "yes", "--appendfsync", "always")

        def redis_outage(seconds: float) -> None:
            redis_server.kill()  # SIGKILL: only what the append-only file holds survives
            time.sleep(seconds)
            redis_server.start()

        connection, outage, stop = redis_server.url(), redis_outage, redis_server.stop
    config_file, log = tmp_path / "queue.yaml", tmp_path / "jobs.log"
    config = write_config(config_file, connection, lease_timeout="2s", poll_interval="100ms", retry_delay="200ms")
    qm = QueueManager(config)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        handles = qm.dispatch_batch("crash", [jobs.Chaotic(kind, str(log)) for kind in KINDS])
        workers = [start_worker(config_file, tmp_path, n) for n in range(3)]
        hit: set[str] = set()  # slow jobs already used as the moment to strike

        def busy_with_a_slow_job() -> subprocess.Popen[bytes] | None:
            # Each worker runs one job at a time: one that just started a slow job holds no
            # other, so a signal now strikes a job whose handler started.
            alive = {w.pid: w for w in workers if w.poll() is None}
            for _, kind, job_id, _, pid in reversed(_starts(log)):
                if kind == "slow" and job_id not in hit and int(pid) in alive:
                    hit.add(job_id)
                    return alive[int(pid)]
            return None

        def strike(what: str) -> subprocess.Popen[bytes]:
            found: list[subprocess.Popen[bytes]] = []

            def busy() -> bool:
                worker = busy_with_a_slow_job()
                if worker is not None:
                    found.append(worker)
                return bool(found)

            wait_until(busy, timeout=30, what=f"a worker mid slow job ({what})")
            return found[0]

        killed: set[int] = set()
        for kill in range(3):
            victim = strike(f"kill {kill + 1}")
            killed.add(victim.pid)
            victim.kill()
            victim.wait(10)
            workers[workers.index(victim)] = start_worker(config_file, tmp_path, 10 + kill)
        victims = set(killed)  # the workers killed or stopped: the only ones whose jobs may run twice
        stopped = strike("SIGSTOP")
        stopped.send_signal(signal.SIGSTOP)
        time.sleep(3)  # longer than the lease: its job is taken for dead and runs elsewhere
        stopped.send_signal(signal.SIGCONT)
        victims.add(stopped.pid)
        if outage is not None:
            for seconds in (0.5, 3.0):  # shorter than the lease (2 s), then longer
                strike(f"an outage of {seconds}s")
                outage(seconds)
        wait_until(lambda: all(h.fetch().status in (Status.SUCCEEDED, Status.FAILED) for h in handles), timeout=60,
                   what="every job to end")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(30)
        records = {h.id: h.fetch() for h in handles} if "handles" in locals() else {}
        qm.close()
        stop()
        gc.collect()

    by_kind: dict[str, Counter[Status]] = {}
    for handle, kind in zip(handles, KINDS, strict=True):
        by_kind.setdefault(kind, Counter())[records[handle.id].status] += 1
    assert by_kind == {"fast": Counter({Status.SUCCEEDED: 90}), "slow": Counter({Status.SUCCEEDED: 20}),
                       "failing": Counter({Status.FAILED: 20}), "flaky": Counter({Status.SUCCEEDED: 10}),
                       "timeout": Counter({Status.FAILED: 10})}
    starts = Counter(job_id for _, _, job_id, _, _ in _starts(log))
    charged = {job_id: (r.attempts, starts[job_id]) for job_id, r in records.items() if r.attempts > starts[job_id]}
    assert not charged, f"attempts charged without the handler starting (attempts, starts): {charged}"
    # A job that succeeds at once ran twice only if a worker killed or stopped was running it
    # (a store outage alone redoes nothing: its handlers' acknowledgements are taken when it is back).
    runs: dict[str, list[int]] = {}
    for _, kind, job_id, _, pid in _starts(log):
        if kind in ("fast", "slow"):
            runs.setdefault(job_id, []).append(int(pid))
    redone = {job_id: pids for job_id, pids in runs.items() if len(pids) > 1 and not set(pids[:-1]) <= victims}
    assert not redone, f"jobs run again though no worker running them was killed or stopped: {redone}"
    assert os.path.getsize(log) > 0
