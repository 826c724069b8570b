"""Where a sync dispatch to Redis spends its time (W1 one by one), side by side in one run:

    .venv/bin/python -m benchmarks.redis_dispatch_floor

PING and LPUSH are the floor a client pays per command (an LPUSH is all huey's enqueue
sends); EVALSHA of ``return 1`` adds what calling any script costs; EVALSHA of the enqueue
script (its arguments built beforehand) adds the script's own work; "record" is building the
job's record; ``qm.dispatch`` is all of it. Medians (and ranges) of 7 alternating rounds of
2,000 calls each, in microseconds per call, on a throwaway server.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import redis

from benchmarks.systems import Noop
from neonnb import Config, QueueManager
from neonnb.drivers.redis import RedisDriver, _enqueue_args
from neonnb.drivers.redis_calls import SHAS
from neonnb.records import new_job_id
from tests.services import RedisServer

CALLS, ROUNDS = 2_000, 7


def per_call(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        call()
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    server = RedisServer()
    try:
        qm = QueueManager(Config.for_url(server.url()))
        driver = qm.driver
        assert isinstance(driver, RedisDriver)
        qm.dispatch("b", Noop())  # registers the queue and loads the script
        client = driver._blocking_client()
        bare = redis.Redis(port=server.port, single_connection_client=True)
        return_1 = bare.script_load("return 1")
        record = qm.core.record("b", Noop())

        def enqueue_script() -> None:
            record.id = new_job_id()
            [(queue, args)] = _enqueue_args([record]).items()
            client.execute_command("EVALSHA", SHAS["enqueue"], 1, driver._base(queue), driver.channel, queue, "new",
                                   *args)

        cases: dict[str, Callable[[], object]] = {
            "PING": bare.ping,
            "LPUSH of 200 bytes": lambda: bare.lpush("floor", "a" * 200),
            "EVALSHA of `return 1`": lambda: bare.evalsha(return_1, 0),
            "EVALSHA of the enqueue script": enqueue_script,
            "record (no I/O)": lambda: qm.core.record("b", Noop()),
            "qm.dispatch": lambda: qm.dispatch("b", Noop()),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(ROUNDS):
            for name, call in cases.items():
                times[name].append(per_call(call))
        print("| per call | median µs | range |\n| --- | ---: | ---: |")
        for name, values in times.items():
            print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} to {max(values):.0f} |")
        qm.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
