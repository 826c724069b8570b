"""``neonnb demo``: a small data pipeline on the embedded SQLite default.

It loads a month of daily partitions with a pool of workers: a few partitions hit a flaky
source and are retried with backoff, one is corrupt and ends in the failed store. A progress
line follows the queue, and a summary closes the run.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from .config import Config
from .errors import Retry
from .hooks import JobEvent
from .job import Context, Job
from .manager import QueueManager
from .records import Priority

QUEUE = "pipeline"


class LoadPartition(Job, job_name="neonnb.demo.LoadPartition"):
    """Read one day of sales in chunks and return its totals."""

    day: date
    rows: int

    def handle(self, ctx: Context) -> dict[str, Any]:
        chunks = 5
        total = Decimal(0)
        for chunk in range(chunks):
            time.sleep(0.02)
            total += Decimal(self.rows * (chunk + 1)) / 100
            ctx.progress(chunk + 1, chunks, f"chunk {chunk + 1}/{chunks}")
        if self.day.day % 9 == 4 and ctx.attempt == 1:
            raise ConnectionError(f"source database timed out reading {self.day}")
        if self.day.day == 13:
            raise ValueError(f"partition {self.day} is corrupt: column 'amount' holds text")
        return {"day": self.day.isoformat(), "rows": self.rows, "total": str(total)}

    def should_retry(self, err: Exception) -> bool:
        return not isinstance(err, ValueError)  # corrupt data won't fix itself


class BuildReport(Job, job_name="neonnb.demo.BuildReport"):
    """Sum the loaded partitions; runs at high priority once the loads are done."""

    days: list[date]

    def handle(self, ctx: Context) -> dict[str, Any]:
        if not self.days:
            raise Retry("nothing loaded yet", delay=0.1)
        return {"days": len(self.days), "first": self.days[0].isoformat(), "last": self.days[-1].isoformat()}


def run_demo(url: str | None = None, jobs: int = 24, out: Any = None) -> int:
    out = out or sys.stdout
    logging.getLogger("neonnb").setLevel(logging.ERROR)  # the progress line tells the story
    with tempfile.TemporaryDirectory(prefix="neonnb-demo-") as tmp:
        url = url or f"sqlite:///{Path(tmp) / 'neonnb.db'}"
        config = Config(connection=url, max_retries=2, retry_delay=0.2, poll_interval=0.2)
        with QueueManager(config) as qm:
            return _pipeline(qm, jobs, url, out)


def _pipeline(qm: QueueManager, jobs: int, url: str, out: Any) -> int:
    print(f"neonnb demo: loading {jobs} daily partitions through {url}", file=out)
    retries: list[JobEvent] = []
    lock = threading.Lock()

    def on_event(event: JobEvent) -> None:
        if event.kind == "retrying":
            with lock:
                retries.append(event)

    qm.events.subscribe(on_event)
    start = time.monotonic()
    first = date(2026, 10, 1)
    days = [first + timedelta(days=i) for i in range(jobs)]
    handles = qm.dispatch_batch(QUEUE, [LoadPartition(day, 1000 + 37 * i) for i, day in enumerate(days)])
    worker = qm.worker(QUEUE, 4).start()
    _follow(qm, len(handles), out)

    loaded = handles.results(timeout=30, errors="skip")
    ok_days = sorted(date.fromisoformat(r["day"]) for r in loaded)
    report = qm.dispatch_with_priority(QUEUE, BuildReport(ok_days), Priority.HIGH).result(timeout=30)
    worker.stop(grace=5)
    elapsed = time.monotonic() - start

    failed = qm.failed.list()
    print("\nsummary", file=out)
    print(f"  loaded     {len(ok_days)} of {len(handles)} partitions in {elapsed:.1f}s "
          f"({len(handles) / elapsed:.0f} jobs/s with 4 workers)", file=out)
    reasons = sorted({e.error["message"] for e in retries if e.error})
    print(f"  retried    {len(retries)} time(s): " + ", ".join(reasons), file=out)
    print(f"  failed     {len(failed)} job(s) in the failed store:", file=out)
    for f in failed:  # the whole id: ids made within seconds of each other share their first half
        print(f"             {f.id} {f.name} {f.arguments}", file=out)
        print(f"               -> {f.error_type}: {f.error} (after {f.attempts} attempt(s))", file=out)
    print(f"  report     {report}", file=out)
    print("  next       fix the data, then qm.failed.retry(id) puts the job back with its arguments", file=out)
    return 0


def _follow(qm: QueueManager, total: int, out: Any) -> None:
    """A progress line until every job has succeeded or failed."""
    tty = hasattr(out, "isatty") and out.isatty()
    last = ""
    while True:
        c = qm.stats()[QUEUE]
        finished = c.succeeded + c.failed
        bar = "#" * (20 * finished // total) + "." * (20 - 20 * finished // total)
        line = (f"[{bar}] {finished}/{total} finished · {c.running} running · {sum(c.waiting.values())} waiting"
                f" · {c.delayed} waiting to retry · {c.failed} failed")
        if line != last:
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=out, flush=True)
            last = line
        if finished >= total:
            break
        time.sleep(0.1)
    if tty:
        print(file=out)
