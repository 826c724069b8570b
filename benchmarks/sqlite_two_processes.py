"""How long does a dispatch take on SQLite while a worker in another process drains the
queue (a notebook beside `neonnb worker`, both on the default store)? 2,000 sync dispatches,
1 ms apart, of jobs the worker runs as they come; prints the dispatch time's p50, p99, max.

    .venv/bin/python -m benchmarks.sqlite_two_processes
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.systems import Noop
from neonnb import Config, QueueManager

N = 2_000
HERE = Path(__file__).resolve().parent


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="neonnb-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'jobs.db'}"
        qm = QueueManager(Config(connection=url))
        qm.dispatch("b", Noop())  # the schema exists before the worker starts
        worker = subprocess.Popen(
            [sys.executable, "-m", "neonnb", "worker", url, "-i", "benchmarks.systems", "-q", "b", "-c", "4"],
            cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(2)  # the worker is up and idle
            took = []
            for _ in range(N):
                start = time.perf_counter()
                qm.dispatch("b", Noop())
                took.append((time.perf_counter() - start) * 1000)
                time.sleep(0.001)
            deadline = time.monotonic() + 30
            while qm.stats()["b"].succeeded < N + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            succeeded = qm.stats()["b"].succeeded
        finally:
            worker.terminate()
            worker.wait(30)
            qm.close()
    took.sort()
    print(f"dispatch beside another process's worker: p50 {statistics.median(took):.2f} ms, "
          f"p99 {took[int(N * 0.99)]:.2f} ms, max {took[-1]:.2f} ms, over 5 ms: {sum(t > 5 for t in took)} "
          f"of {N} ({succeeded} jobs run)")


if __name__ == "__main__":
    main()
