"""How fast can anything run W5's job, with no queue at all? W5 (see workloads.py) is 10,000
jobs that each make one blocking call, a sync redis-py INCR. A queue that runs a sync job in a
thread, as neonnb does so its loop keeps the leases alive, can't beat the same calls made from
8 threads with nothing else going on; one that runs the call on its event loop (pgqueuer, the
async peers) pays no thread hop but blocks the loop meanwhile.

    .venv/bin/python -m benchmarks.blocking_call_floor [ROUNDS]

Each round, alternating: the calls one after another on one thread; the calls from 8 threads
through ``loop.run_in_executor`` (the bare hop neonnb's worker makes); and neonnb's own W5 on
the memory store (the worker and its bookkeeping, no store round trips).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.workloads import CALL_CONCURRENCY, N_DRAIN, call
from tests.services import RedisServer

ROOT = Path(__file__).resolve().parents[1]


def serial() -> float:
    start = time.perf_counter()
    for _ in range(N_DRAIN):
        call()
    return N_DRAIN / (time.perf_counter() - start)


async def threads() -> float:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(CALL_CONCURRENCY)
    with ThreadPoolExecutor(CALL_CONCURRENCY) as pool:

        async def one() -> None:
            async with slots:
                await loop.run_in_executor(pool, call)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(N_DRAIN)))
        return N_DRAIN / (time.perf_counter() - start)


def neonnb_memory() -> float:
    out = subprocess.run([sys.executable, "-m", "benchmarks.workloads", "neonnb", "w5", "memory://"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["jobs_per_s"])


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    server = RedisServer()
    os.environ["BENCH_CALL_PORT"] = str(server.port)
    results: dict[str, list[float]] = {"one thread, one call after another": [],
                                       f"{CALL_CONCURRENCY} threads via run_in_executor": [],
                                       "neonnb W5 on the memory store": []}
    try:
        for _ in range(rounds):
            runs = [serial, lambda: asyncio.run(threads()), neonnb_memory]
            for label, run in zip(results, runs, strict=True):
                results[label].append(run())
    finally:
        server.stop()
    base = statistics.median(next(iter(results.values())))
    for label, rates in results.items():
        median = statistics.median(rates)
        print(f"{label:40} {median:8,.0f} jobs/s  [{min(rates):,.0f}-{max(rates):,.0f}]  {median / base:.2f}x")


if __name__ == "__main__":
    main()
