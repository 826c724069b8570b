"""Do the views cost what they show, not the store? ``stats()`` and 50-row pages of
``jobs()`` at 10, 100,000 and 1,000,000 queued jobs (99% in queue "bulk", 1% in "rare"), on
SQLite, PostgreSQL and Redis (throwaway servers):

    .venv/bin/python -m benchmarks.views_at_scale [--sizes 10,100000,1000000] [--stores sqlite,redis]

"first stats()" is the first count (every job counted); then each view is called 20 times,
and the table gives the median (and the slowest) in milliseconds.
The jobs are stored through the driver's own ``enqueue`` in batches, as a dispatch stores them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

from benchmarks.systems import Noop
from neonnb import Config, QueueManager
from neonnb.records import new_job_id
from tests.services import PostgresServer, RedisServer

CALLS = 20
FILL_BATCH = 5_000


async def fill(qm: QueueManager, jobs: int) -> None:
    template = qm.core.record("bulk", Noop())
    stored, now = 0, time.time()
    while stored < jobs:
        batch = []
        for i in range(stored, min(stored + FILL_BATCH, jobs)):
            queue = "rare" if i % 100 == 99 else "bulk"
            batch.append(dataclasses.replace(template, id=new_job_id(), queue=queue, created_at=now + i * 1e-6,
                                             run_at=now))
        await qm.driver.enqueue(batch)
        stored += len(batch)


async def timed(view: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        await view()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times)


async def views(qm: QueueManager) -> list[str]:
    start = time.perf_counter()
    await qm.astats()
    cells = [f"{(time.perf_counter() - start) * 1000:.1f}"]  # the first call counts every job
    pages: dict[str, Callable[[], Awaitable[object]]] = {
        "stats()": qm.astats,
        "jobs(limit=50)": lambda: qm.ajobs(limit=50),
        "jobs(queue='rare', limit=50)": lambda: qm.ajobs(queue="rare", limit=50),
        "jobs('queued', limit=50)": lambda: qm.ajobs("queued", limit=50),
        "failed.list(50)": lambda: qm.failed.alist(50),
    }
    for view in pages.values():
        median, slowest = await timed(view)
        cells.append(f"{median:.1f} ({slowest:.1f})")
    return cells


HEADER = ["store", "jobs", "first stats()", "stats()", "jobs(limit=50)", "jobs(queue='rare', limit=50)",
          "jobs('queued', limit=50)", "failed.list(50)"]


async def measure(store: str, url: str, sizes: list[int]) -> list[list[str]]:
    rows = []
    for size in sizes:
        qm = QueueManager(Config.for_url(url, table_name=f"views_{size}", key_prefix=f"views{size}:"))
        start = time.perf_counter()
        await fill(qm, size)
        if store == "PostgreSQL":  # what autovacuum does soon after a million rows arrive
            await asyncio.to_thread(_analyze, qm)
        filled = time.perf_counter() - start
        cells = [store, f"{size:,}", *await views(qm)]
        rows.append(cells)
        print("  ".join(cells), f"  [filled in {filled:.0f} s]", flush=True)
        await qm.aclose()
    return rows


def _analyze(qm: QueueManager) -> None:
    from sqlalchemy import text

    from neonnb.drivers.database import DatabaseDriver

    assert isinstance(qm.driver, DatabaseDriver)
    with qm.driver.engine.connect() as conn:
        conn.execute(text(f'ANALYZE "{qm.driver.table.name}"'))
        conn.commit()


async def main(sizes: list[int], stores: list[str]) -> None:
    tables: list[list[str]] = [HEADER]
    if "sqlite" in stores:
        with tempfile.TemporaryDirectory() as folder:
            tables += await measure("SQLite", f"sqlite:///{folder}/views.db", sizes)
    if "postgresql" in stores:
        postgres = PostgresServer(fsync=True)
        try:
            tables += await measure("PostgreSQL", postgres.url(), sizes)
        finally:
            postgres.stop()
    if "redis" in stores:
        redis = RedisServer()
        try:
            tables += await measure("Redis", redis.url(), sizes)
        finally:
            redis.stop()
    print()
    print("| " + " | ".join(tables[0]) + " |")
    print("|" + "---|" * len(tables[0]))
    for row in tables[1:]:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10,100000,1000000")
    parser.add_argument("--stores", default="sqlite,postgresql,redis")
    options = parser.parse_args()
    asyncio.run(main([int(s) for s in options.sizes.split(",")], options.stores.split(",")))
