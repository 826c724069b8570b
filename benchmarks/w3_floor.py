"""Where W3's time goes on Redis: how fast could neonnb's enqueue-to-start latency be?

W3 sends a job every 20 ms to an idle worker in the same process. This measures, the same
way and on one throwaway redis-server:

  bare hand-off   the enqueue script's call with its arguments built beforehand, to a
                  "worker" that only registers as idle and waits in BLPOP on its inbox; the
                  time from just before the send to the reply reaching Python on the
                  worker's loop. No neonnb code runs on either side: what is left is Redis,
                  the script and the machine's wake-ups after 20 ms idle.
  neonnb, huey    W3 itself (benchmarks.workloads), three runs each, alternating.

    .bench/bin/python -m benchmarks.w3_floor
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from redis import Redis

from benchmarks.__main__ import cell, run_one
from benchmarks.systems import Stamp
from benchmarks.workloads import LATENCY_GAP, N_LATENCY, latency
from neonnb import Config, QueueManager
from neonnb.drivers import resp
from neonnb.drivers.redis import _SCRIPTS, RedisDriver, _enqueue_args, _num
from neonnb.records import new_job_id
from tests.services import RedisServer

QUEUE, WORKER = "b", "floor-worker"


class Stamped(resp.Connection):
    """A connection that notes when each reply reaches Python, before anything parses it."""

    arrivals: list[float] = []

    def data_received(self, data: bytes) -> None:
        self.arrivals.append(time.time())
        super().data_received(data)


async def wait_in_inbox(driver: RedisDriver, ready: threading.Event) -> list[float]:
    """Register as idle, take what the enqueue script hands over, note the delay, repeat."""
    inbox = f"{driver._base(QUEUE)}inbox:{WORKER}"
    connection = await Stamped.open((driver.settings.host, driver.settings.port), driver.settings)
    samples = []
    for _ in range(N_LATENCY):
        await driver._script("idle", [QUEUE], [f"30 {WORKER}", _num(time.time() + 60), WORKER])
        ready.set()
        _, job = await connection.send([("BLPOP", inbox, 10)])[0]
        samples.append(Stamped.arrivals[-1] - json.loads(json.loads(job)["payload"])["sent"])
    connection.close()
    return samples


async def send_bare(qm: QueueManager, ready: threading.Event) -> None:
    driver = qm.driver
    assert isinstance(driver, RedisDriver)
    client = await driver._client()
    connection = await client._connection(client.seed)
    head = _SCRIPTS["enqueue"].command([driver._base(QUEUE)], [driver.channel, QUEUE, "new"])
    args = _enqueue_args([qm._record(QUEUE, Stamp(0.0))])[QUEUE]
    for _ in range(N_LATENCY):
        await asyncio.to_thread(ready.wait)
        ready.clear()
        await asyncio.sleep(LATENCY_GAP)
        args[0] = new_job_id()
        sent = time.time()
        args[2], args[8], args[9] = json.dumps({"sent": sent}), _num(sent), _num(sent)
        await connection.send([(*head, *args)])[0]


async def bare_handoff(url: str) -> dict[str, Any]:
    qm = QueueManager(Config.for_url(url))
    try:
        await qm.adispatch("setup", Stamp(0.0))  # loads the script (not on QUEUE: a queued job there stops hand-offs)
        ready = threading.Event()
        result: list[float] = []
        worker = threading.Thread(target=lambda: result.extend(asyncio.run(wait_in_inbox(qm.driver, ready))))
        worker.start()
        await send_bare(qm, ready)
        await asyncio.to_thread(worker.join)
        return latency(result)
    finally:
        await qm.aclose()


def main() -> None:
    server = RedisServer()
    url = server.url()
    try:
        for _ in range(3):
            for label, run in (
                ("bare hand-off", lambda: asyncio.run(bare_handoff(url))),
                ("neonnb W3", lambda: run_one("neonnb", "w3", url)),
                ("huey W3", lambda: run_one("huey", "w3", url)),
            ):
                Redis(port=server.port).flushall()
                print(f"{label:14} p50 / p99 ms {cell(run())}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
