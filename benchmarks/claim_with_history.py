"""Does a claim stay fast when the table holds a million finished jobs? Claims 10 jobs 100
times on an empty table and again after a million succeeded rows are added, on PostgreSQL
(a throwaway server) and SQLite.

    .venv/bin/python -m benchmarks.claim_with_history
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Callable

import psycopg

from benchmarks.systems import Noop
from neonnb import Config, QueueManager
from tests.services import PostgresServer

COLUMNS = "id, queue, name, payload, priority, status, attempts, max_attempts, run_at, created_at, finished_at"
FINISHED_ROW = "'f' || i, 'b', 'bench.Noop', '{}', 1, 'succeeded', 1, 4, 0, 0, 1"
POSTGRES_FILL = f"INSERT INTO neonnb_jobs ({COLUMNS}) SELECT {FINISHED_ROW} FROM generate_series(1, 1000000) AS i"
SQLITE_FILL = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) "
    f"INSERT INTO neonnb_jobs ({COLUMNS}) SELECT {FINISHED_ROW} FROM n"
)


async def claim_time(qm: QueueManager, label: str) -> None:
    await qm.adispatch_batch("b", [Noop() for _ in range(1000)])
    start = time.perf_counter()
    for _ in range(100):
        await qm.driver.reserve(["b"], 10, "w", time.time(), time.time() + 30)
    print(f"{label:28} claim of 10: {(time.perf_counter() - start) * 10:.2f} ms")


async def measure(url: str, name: str, fill: Callable[[], None]) -> None:
    qm = QueueManager(Config(connection=url))
    await qm.asize("b")  # creates the table
    await claim_time(qm, f"{name}, empty table")
    fill()
    await claim_time(qm, f"{name}, + 1M finished")
    await qm.aclose()


async def main() -> None:
    server = PostgresServer(fsync=True)
    try:
        url = server.new_database()

        def fill_postgres() -> None:
            with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(POSTGRES_FILL)

        await measure(url, "PostgreSQL", fill_postgres)
    finally:
        server.stop()
    path = f"{tempfile.mkdtemp()}/history.db"

    def fill_sqlite() -> None:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(SQLITE_FILL)
        conn.close()

    await measure(f"sqlite:///{path}", "SQLite", fill_sqlite)


if __name__ == "__main__":
    asyncio.run(main())
