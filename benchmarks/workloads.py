"""The workloads, the same for every system (see __main__ for the table):

W1  enqueue 10,000 no-op jobs one by one, and with the batch call      jobs/s
W2  drain 10,000 queued no-op jobs with one worker process              jobs/s
W3  enqueue-to-start latency, 300 jobs sent 20 ms apart to an idle worker  p50/p99 ms
W4  2,000 jobs that each sleep 10 ms, at concurrency 50                 jobs/s (ideal 5,000)
W5  W2 where each job makes one blocking call (a Redis INCR on loopback, to a server of its
    own), at concurrency 8: jobs that do real work beside the queue's own traffic   jobs/s

`python -m benchmarks.workloads SYSTEM WORKLOAD URL` runs one in a fresh process and prints
its result as JSON; each system lives in benchmarks/systems.py.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Any

N_ENQUEUE = 10_000
N_DRAIN = 10_000
N_LATENCY = 300
LATENCY_GAP = 0.020
N_SLEEP = 2_000
SLEEP = 0.010
SLEEP_CONCURRENCY = 50
DRAIN_CONCURRENCY = 500  # no-op jobs: a worker tuned for throughput takes big bites
CALL_CONCURRENCY = 8  # W5: threads for a sync library, slots for an async one
_calls: Any = None


def call() -> None:
    """W5's job: one blocking round trip to the server on $BENCH_CALL_PORT (sync redis-py,
    as a job calling a sync client makes it)."""
    global _calls
    if _calls is None:
        import os

        import redis

        _calls = redis.Redis(port=int(os.environ["BENCH_CALL_PORT"]))
    _calls.incr("w5")


def rate(n: int, seconds: float) -> dict[str, Any]:
    return {"jobs_per_s": n / seconds}


def latency(samples: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1000 for s in samples)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))], "n": len(ms)}


async def wait_for(condition: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark workload did not finish")
        await asyncio.sleep(0.002)


def main() -> None:
    from benchmarks import systems

    system, workload, url = sys.argv[1], sys.argv[2], sys.argv[3]
    runner = systems.SYSTEMS[system]
    result = asyncio.run(runner(workload, url))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
