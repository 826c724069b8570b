"""Workers known across processes: every worker registers in the store and heartbeats; one
that stops heartbeating shows as lost, and is dropped later. On every store, and with a
`neonnb worker` in another process killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from neonnb import Config, JobEvent, QueueManager, Status, WorkerInfo, connect
from neonnb import _loop as loop
from neonnb.core import LOST_WORKERS_KEPT
from neonnb.web import create_app
from tests import jobs
from tests.conftest import FakeClock, wait_until, write_config
from tests.services import RedisServer

MakeManager = Callable[..., QueueManager]
ROOT = Path(__file__).resolve().parents[1]


def mine(qm: QueueManager, worker_id: str) -> WorkerInfo | None:
    return next((info for info in qm.known_workers() if info.id == worker_id), None)


def test_a_worker_registers_refreshes_what_it_runs_and_unregisters(make_manager: MakeManager) -> None:
    jobs.RELEASE.clear()
    qm = make_manager(lease_timeout=0.6)  # a beat every 0.2 s
    other = qm if qm.config.driver == "memory" else make_manager()  # another process's view of the store
    worker = qm.worker("q", 2).start()
    try:
        handle = qm.dispatch("q", jobs.BlockingSync())
        wait_until(lambda: (info := mine(other, worker.id)) is not None and info.running == [handle.id],
                   what="the worker to show its running job")
        info = mine(other, worker.id)
        assert info is not None
        assert (info.host, info.pid, info.queues, info.concurrency) == (socket.gethostname(), os.getpid(), ["q"], 2)
        assert info.state(other.clock()) == "running"
        jobs.RELEASE.set()
        assert handle.result(timeout=10) == "released"
        wait_until(lambda: (info := mine(other, worker.id)) is not None and info.jobs_done == 1 and not info.running,
                   what="the worker's counts to reach the store")
        frame = other.workers_df()
        assert list(frame["id"]) == [worker.id] and list(frame["state"]) == ["running"]
        assert str(frame.dtypes["last_seen"]) == "datetime64[ns, UTC]"
    finally:
        jobs.RELEASE.set()
        worker.stop()
    assert mine(other, worker.id) is None, "a stopped worker is no longer listed"


def test_a_worker_that_stops_heartbeating_is_lost_then_dropped(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock, lease_timeout=30)
    dead = WorkerInfo(id="other-host:4242:abc", host="other-host", pid=4242, queues=["q"], concurrency=4,
                      started_at=clock() - 100, last_seen=clock(), beat=10.0, running=["j1"])
    loop.run_sync(qm.driver.save_member(dead))
    [info] = qm.known_workers()
    assert info == dead and info.state(clock()) == "running"
    clock.advance(31)  # three beats missed
    assert qm.known_workers()[0].state(clock()) == "lost"
    assert list(qm.workers_df()["state"]) == ["lost"]
    clock.advance(LOST_WORKERS_KEPT)
    loop.run_sync(qm.core.housekeeping(clock()))
    assert qm.known_workers() == []


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _url(request, request.param, tmp_path)


@pytest.fixture(params=["sqlite", "postgres", "mariadb", "redis"])
def any_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _url(request, request.param, tmp_path)


def _url(request: pytest.FixtureRequest, store: str, tmp_path: Path) -> str:
    if store == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    if store in ("postgres", "mariadb"):
        return str(request.getfixturevalue(f"{store}_server").new_database())
    server: RedisServer = request.getfixturevalue("redis_server")
    return f"{server.url()}"


def neonnb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neonnb", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _worker_elsewhere(store_url: str, tmp_path: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    """A config file for the store, and a `neonnb worker` on its queue "far" in another process."""
    prefix = f"k{os.getpid()}{tmp_path.name[-6:]}:"
    config = tmp_path / "queue.yaml"
    driver = "redis" if store_url.startswith("redis") else "database"
    config.write_text(f"driver: {driver}\nconnection: '{store_url}'\nkey_prefix: '{prefix}'\nlease_timeout: 1.5\n")
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "neonnb", "worker", str(config), "-q", "far", "--import",
                                "tests.jobs"], cwd=ROOT, stdout=log, stderr=log)
    log.close()
    return config, process


def test_a_worker_in_another_process_is_listed_with_its_job_and_lost_after_sigkill(
    store_url: str, tmp_path: Path
) -> None:
    config, process = _worker_elsewhere(store_url, tmp_path)
    qm = connect(config)
    try:
        handle = qm.dispatch("far", jobs.SlowAsync(60))
        wait_until(lambda: any(info.pid == process.pid and info.running == [handle.id]
                               for info in qm.known_workers()), what="the other process's worker and its job")
        listed = neonnb("workers", str(config), "--json")
        assert listed.returncode == 0, listed.stderr
        [entry] = [w for w in json.loads(listed.stdout) if w["pid"] == process.pid]
        assert (entry["state"], entry["running"], entry["queues"]) == ("running", [handle.id], ["far"])
        table = neonnb("workers", str(config))
        assert "running" in table.stdout and str(process.pid) in table.stdout and "1/5" in table.stdout
        panel = qm.dashboard(interval=None)
        loop.run_sync(panel.refresh())
        assert f":{process.pid}" in panel.elsewhere.value and "1 of 5 busy" in panel.elsewhere.value
        assert panel.sections["elsewhere"].layout.display is None, "the section shows"
        assert any(record.id == handle.id for record, *_ in panel._seen.running)  # its job, in the running list
        assert "workers in other processes" in panel.snapshot()
        panel.close()
        with TestClient(create_app(qm, token="t"), client=("127.0.0.1", 5000),
                            base_url="http://127.0.0.1:8765") as client:
            [listed_by_api] = [w for w in client.get("/api/workers").json()["workers"] if w["pid"] == process.pid]
            assert listed_by_api["running"] == [handle.id] and listed_by_api["state"] == "running"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        wait_until(lambda: [info.state(qm.clock()) for info in qm.known_workers() if info.pid == process.pid]
                   == ["lost"], timeout=15, what="the killed worker to show as lost")
        assert "lost" in neonnb("workers", str(config)).stdout
        panel = qm.dashboard(interval=None)
        loop.run_sync(panel.refresh())
        assert "lost" in panel.elsewhere.value
        panel.close()
        assert handle.status is Status.RUNNING  # its lease runs out; housekeeping recovers it, as always
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        qm.close()


def test_events_of_a_worker_in_another_process_reach_this_ones_subscribers(any_store_url: str,
                                                                         tmp_path: Path) -> None:
    config, process = _worker_elsewhere(any_store_url, tmp_path)
    qm = connect(config)
    received: list[JobEvent] = []
    unsubscribe = qm.events.subscribe(received.append)
    try:
        # The other process's worker publishes once it sees this listener (within a second).
        probes: dict[str, float] = {}

        def heard() -> bool:
            if not probes or time.monotonic() - max(probes.values()) > 0.5:  # a probe job every half second
                probes[qm.dispatch("far", jobs.Note("probe")).id] = time.monotonic()
            return any(e.kind == "succeeded" and e.job_id in probes for e in received)

        wait_until(heard, timeout=30, what="the first event from the other process")
        steps = qm.dispatch("far", jobs.Progressing(3))
        bad = qm.dispatch("far", jobs.Permanent())
        wanted = {(steps.id, "started"), (steps.id, "progress"), (steps.id, "succeeded"), (bad.id, "started"),
                  (bad.id, "failed")}
        wait_until(lambda: wanted <= {(e.job_id, e.kind) for e in received}, timeout=15,
                   what="the other process's events")
        [done] = [e for e in received if e.job_id == steps.id and e.kind == "succeeded"]
        [failed] = [e for e in received if e.job_id == bad.id and e.kind == "failed"]
        assert f":{process.pid}:" in done.worker and done.duration is not None and done.duration >= 0
        assert failed.error is not None and failed.error["type"] == "ValueError" and failed.queue == "far"
        assert [e.progress for e in received if e.job_id == steps.id and e.kind == "progress"][-1] == {
            "done": 3, "total": 3, "message": "step 3"}
    finally:
        unsubscribe()
        process.terminate()
        process.wait(timeout=20)
        qm.close()


def test_a_running_scheduler_lists_its_schedules_on_the_store(
    make_manager: MakeManager, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from neonnb.cli import build_parser

    qm = make_manager()
    other = qm if qm.config.driver == "memory" else make_manager()  # another process's view of the store
    scheduler = qm.scheduler()
    scheduler.cron("nightly", "0 2 * * *", jobs.Note("report"), tz="Europe/Berlin", queue="reports")
    scheduler.every("often", "90s", jobs.Note("ping"))
    assert other.known_schedulers() == [], "a scheduler that doesn't run is not on the store"
    scheduler.start()
    try:
        wait_until(lambda: len(other.known_schedulers()) == 1, what="the scheduler to register")
        [info] = other.known_schedulers()
        assert (info.id, info.pid, info.state(other.clock())) == (scheduler.id, os.getpid(), "running")
        by_name = {s["name"]: s for s in info.schedules}
        assert by_name["nightly"]["rule"] == "0 2 * * *" and by_name["nightly"]["tz"] == "Europe/Berlin"
        assert by_name["nightly"]["queue"] == "reports" and by_name["nightly"]["job"] == "tests.jobs.Note"
        assert 0 < by_name["nightly"]["next_tick"] - other.clock() <= 86400
        assert by_name["often"]["rule"] == "every 90s" and by_name["often"]["next_tick"] <= other.clock() + 90
        if qm.config.driver != "memory":
            config = write_config(qm, tmp_path)
            args = build_parser().parse_args(["schedules", config, "--json"])
            assert args.run(args) == 0
            listed = json.loads(capsys.readouterr().out)
            assert [(s["name"], s["scheduler"], s["state"]) for s in listed] == [
                ("nightly", scheduler.id, "running"), ("often", scheduler.id, "running")]
            args = build_parser().parse_args(["schedules", config])
            assert args.run(args) == 0
            table = capsys.readouterr().out.splitlines()
            assert table[0].split()[:3] == ["NAME", "RULE", "TZ"] and table[1].startswith("nightly  0 2 * * *")

            with TestClient(create_app(other, token="t"), client=("127.0.0.1", 5000),
                            base_url="http://127.0.0.1:8765") as client:
                assert [s["name"] for s in client.get("/api/schedules").json()["schedules"]] == ["nightly", "often"]
    finally:
        scheduler.stop()
    assert other.known_schedulers() == [], "a stopped scheduler leaves the store"


def test_the_stores_worker_entry_follows_a_jobs_start_and_end_within_a_second(tmp_path: Path) -> None:
    """It used to be refreshed every lease/3 (10 s): a listing showed a busy worker as idle."""
    with QueueManager(Config.for_url(f"sqlite:///{tmp_path / 'jobs.db'}")) as qm:
        jobs.RELEASE.clear()
        worker = qm.worker("q", 2).start()
        try:
            wait_until(lambda: len(qm.known_workers()) == 1, what="the worker's first entry")
            handle = qm.dispatch("q", jobs.Halfway())
            started = time.monotonic()
            wait_until(lambda: qm.known_workers()[0].running == [handle.id], timeout=1.5, what="the job listed")
            assert time.monotonic() - started < 1.5
        finally:
            jobs.RELEASE.set()
        handle.wait(timeout=10)
        wait_until(lambda: qm.known_workers()[0].running == [], timeout=1.5, what="the job gone from the entry")
        worker.stop()
