"""The `neonnb` command, run as users run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from neonnb import connect
from tests import jobs

ROOT = Path(__file__).resolve().parents[1]


def neonnb(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neonnb", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_demo_runs_the_pipeline_and_prints_a_summary() -> None:
    run = neonnb("demo")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "[####################] 24/24 finished" in out
    assert "loaded     23 of 24 partitions" in out
    assert "retried    3 time(s): source database timed out" in out
    assert "failed     1 job(s) in the failed store" in out
    assert "ValueError: partition 2026-10-13 is corrupt" in out
    assert "report     {'days': 23" in out


def test_burst_worker_drains_the_queue_and_exits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'burst.db'}"
    with connect(url) as qm:
        handles = qm.dispatch_batch("cli", [jobs.Note(f"n{i}") for i in range(20)])
        run = neonnb("worker", url, "-q", "cli", "-c", "4", "--import", "tests.jobs", "--burst")
        assert run.returncode == 0, run.stderr
        assert [h.result(timeout=1) for h in handles] == [f"n{i}" for i in range(20)]


def test_worker_with_max_jobs_stops_after_that_many(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'max.db'}"
    with connect(url) as qm:
        qm.dispatch_batch("cli", [jobs.Note(f"n{i}") for i in range(10)])
        run = neonnb("worker", url, "-q", "cli", "--import", "tests.jobs", "--max-jobs", "4")
        assert run.returncode == 0, run.stderr
        assert qm.stats()["cli"].succeeded == 4


def test_bad_target_is_a_clear_error() -> None:
    run = neonnb("worker", "jobs.db")
    assert run.returncode == 2
    assert "give a URL such as sqlite:///jobs.db" in run.stderr
    run = neonnb("worker", "tests.jobs:RECORD")
    assert run.returncode == 2
    assert "tests.jobs:RECORD: tests.jobs.RECORD is not a neonnb QueueManager" in run.stderr
    run = neonnb("worker", "memory://", "--import", "tests.no_such_jobs")
    assert run.returncode == 2
    assert "neonnb: can't import tests.no_such_jobs: No module named 'tests.no_such_jobs'" in run.stderr
    run = neonnb("worker", "memory://", "-c", "0")
    assert run.returncode == 2
    assert "argument -c/--concurrency: must be 1 or more, got 0" in run.stderr
