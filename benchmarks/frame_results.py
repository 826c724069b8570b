"""A 1,000,000-row DataFrame returned by a job and read back by ``result()``, against the floor:
the same frame written to Parquet on local disk and read back with pyarrow in one process, no
queue at all. The frame is made before the clock starts (the handler returns it), so both
sides time only storing and loading it.

    .venv/bin/python -m benchmarks.frame_results [ROUNDS]

Each round, alternating: the floor; neonnb on SQLite; neonnb on PostgreSQL (a throwaway server,
as the tests start one; skipped without the binaries). neonnb's side is one dispatch, a worker
in this process running the job, and ``result()``: the result is encoded (Parquet, base64,
JSON) on the handler's thread, stored, read back and decoded. The worker's loop watch logs a
warning when its loop is blocked; the run counts them (0 expected).
"""

from __future__ import annotations

import io
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from neonnb import Config, Context, Job, QueueManager

ROWS = 1_000_000
_FRAME: list[pd.DataFrame] = []


def frame() -> pd.DataFrame:
    if not _FRAME:
        from tests.data_jobs import frame_of

        _FRAME.append(frame_of(ROWS))
    return _FRAME[0]


class ReturnFrame(Job):
    def handle(self, ctx: Context) -> pd.DataFrame:
        return frame()


class _Blocked(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "has been blocked" in record.getMessage():
            self.count += 1


BLOCKED = _Blocked()


def floor(folder: Path) -> float:
    start = time.perf_counter()
    path = folder / "frame.parquet"
    frame().to_parquet(path, engine="pyarrow")
    back = pd.read_parquet(path, engine="pyarrow")
    elapsed = time.perf_counter() - start
    assert len(back) == ROWS
    return elapsed


def through(qm: QueueManager) -> float:
    worker = qm.worker("frames", 1).start()
    try:
        start = time.perf_counter()
        back = qm.dispatch("frames", ReturnFrame()).result(timeout=300)
        elapsed = time.perf_counter() - start
    finally:
        worker.stop(grace=10)
    assert len(back) == ROWS
    return elapsed


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    logging.getLogger("neonnb").addHandler(BLOCKED)
    frame()
    encoded = io.BytesIO()
    frame().to_parquet(encoded, engine="pyarrow")
    print(f"{ROWS:,} rows, {len(encoded.getvalue()) / 2**20:.1f} MiB as Parquet")
    systems: dict[str, Callable[[Path], float]] = {"parquet on disk (floor)": floor}
    with tempfile.TemporaryDirectory() as folder:
        sqlite = QueueManager(Config.for_url(f"sqlite:///{folder}/jobs.db"))
        systems["neonnb SQLite"] = lambda _: through(sqlite)
        postgres = None
        try:
            from tests.services import PostgresServer

            server = PostgresServer()
            postgres = QueueManager(Config.for_url(server.new_database()))
            systems["neonnb PostgreSQL"] = lambda _: through(postgres)  # type: ignore[arg-type]
        except BaseException as exc:
            print(f"PostgreSQL skipped: {exc}")
        times: dict[str, list[float]] = {name: [] for name in systems}
        try:
            for _ in range(rounds):
                for name, run in systems.items():
                    times[name].append(run(Path(folder)))
        finally:  # the throwaway server goes even when a round fails
            sqlite.close()
            if postgres is not None:
                postgres.close()
                server.stop()
    base = statistics.median(times["parquet on disk (floor)"])
    print("\n| system | median s | min | max | vs floor |\n| --- | ---: | ---: | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {median / base:.2f}x |")
    print(f"\nloop-watch warnings during the run: {BLOCKED.count}")


if __name__ == "__main__":
    main()
