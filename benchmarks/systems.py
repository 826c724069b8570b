"""One adapter per system: `async def run(workload, url) -> dict`. Each uses the system's own
async API where it has one, and settings a user tuning for throughput would pick."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.workloads import (
    CALL_CONCURRENCY,
    DRAIN_CONCURRENCY,
    LATENCY_GAP,
    N_DRAIN,
    N_ENQUEUE,
    N_LATENCY,
    N_SLEEP,
    SLEEP,
    SLEEP_CONCURRENCY,
    call,
    latency,
    rate,
    wait_for,
)
from neonnb import Config, Context, Job, QueueManager, WorkerOptions

Runner = Callable[[str, str], Awaitable[dict[str, Any]]]


# --- the ceiling: a bare asyncio.Queue(maxsize=1) producer/consumer -----------------------

async def ceiling(workload: str, url: str) -> dict[str, Any]:
    queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)

    async def consume() -> None:
        for _ in range(N_DRAIN):
            await queue.get()

    consumer = asyncio.create_task(consume())
    start = time.perf_counter()
    for i in range(N_DRAIN):
        await queue.put(i)
    await consumer
    return rate(N_DRAIN, time.perf_counter() - start)


# --- neonnb ---------------------------------------------------------------------------------

class Noop(Job, job_name="bench.Noop"):
    async def handle(self, ctx: Context) -> None:
        return None


class Sleep(Job, job_name="bench.Sleep"):
    async def handle(self, ctx: Context) -> None:
        await asyncio.sleep(SLEEP)


class Call(Job, job_name="bench.Call"):
    def handle(self, ctx: Context) -> None:  # sync: it blocks, so it runs in a thread
        call()


class Stamp(Job, job_name="bench.Stamp"):
    sent: float

    async def handle(self, ctx: Context) -> float:
        return time.time() - self.sent


def neonnb_config(url: str) -> Config:
    return Config.for_url(url)


async def neonnb_system(workload: str, url: str) -> dict[str, Any]:
    qm = QueueManager(neonnb_config(url))
    try:
        return await _neonnb_workload(qm, workload, url)
    finally:
        await qm.aclose()


async def _neonnb_workload(qm: QueueManager, workload: str, url: str) -> dict[str, Any]:
    await qm.asize("b")  # the schema exists before anything is timed
    if workload == "w1_one":
        # The sync call first, as a notebook cell or a script makes it (and as huey's and
        # RQ's are measured), then the async one, from this loop. On Redis the sync call goes
        # straight from this thread; on the others through neonnb's loop thread.
        qm.dispatch("b", Noop())  # the queue's first dispatch registers it
        start = time.perf_counter()
        for _ in range(N_ENQUEUE):
            qm.dispatch("b", Noop())
        result = rate(N_ENQUEUE, time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(N_ENQUEUE):
            await qm.adispatch("b", Noop())
        return {**result, "async_jobs_per_s": N_ENQUEUE / (time.perf_counter() - start)}
    if workload == "w1_batch":
        start = time.perf_counter()
        await qm.adispatch_batch("b", [Noop() for _ in range(N_ENQUEUE)])
        return rate(N_ENQUEUE, time.perf_counter() - start)
    if workload in ("w2", "w4", "w5"):
        n, job, concurrency = {"w2": (N_DRAIN, Noop, DRAIN_CONCURRENCY), "w4": (N_SLEEP, Sleep, SLEEP_CONCURRENCY),
                               "w5": (N_DRAIN, Call, CALL_CONCURRENCY)}[workload]
        await qm.adispatch_batch("b", [job() for _ in range(n)])
        worker = qm.worker("b", concurrency, WorkerOptions(burst=True))
        start = time.perf_counter()
        # As `neonnb worker` runs it: on neonnb's background loop, beside the store's client.
        await asyncio.to_thread(worker.run)
        elapsed = time.perf_counter() - start
        assert (await qm.astats())["b"].succeeded == n
        return rate(n, elapsed)
    if workload == "w3":
        worker = qm.worker("b", 10).start()
        # Dispatch through a second manager, as another process would: the worker learns of
        # the job from the store (LISTEN/NOTIFY, polling), not from an in-process shortcut.
        sender = qm if url == "memory://" else QueueManager(neonnb_config(url))
        await asyncio.sleep(0.5)
        handles = []
        for _ in range(N_LATENCY):
            handles.append(await sender.adispatch("b", Stamp(time.time())))
            await asyncio.sleep(LATENCY_GAP)
        samples = [await h.aresult(timeout=60) for h in handles]
        await worker.astop()
        if sender is not qm:
            await sender.aclose()
        return latency(samples)
    raise ValueError(workload)


# --- huey on SQLite ----------------------------------------------------------------------------

async def huey_system(workload: str, url: str) -> dict[str, Any]:
    from huey import RedisHuey, SqliteHuey

    if url.startswith("redis://"):
        huey = RedisHuey(url=url, results=False)
    else:
        huey = SqliteHuey(filename=url.removeprefix("sqlite:///"), results=False)
    done: list[float] = []
    lock = threading.Lock()

    @huey.task()
    def noop() -> None:
        with lock:
            done.append(0.0)

    @huey.task()
    def sleep() -> None:
        time.sleep(SLEEP)
        with lock:
            done.append(0.0)

    @huey.task()
    def stamp(sent: float) -> None:
        with lock:
            done.append(time.time() - sent)

    @huey.task()
    def calls() -> None:
        call()
        with lock:
            done.append(0.0)

    def consumer(workers: int) -> Any:
        # Fast polling (huey's default backs off to 10 s), threads as its docs suggest for I/O.
        c = huey.create_consumer(workers=workers, worker_type="thread", periodic=False,
                                 initial_delay=0.001, backoff=1.0, max_delay=0.001)
        c.start()  # its worker threads; here, in the main thread, where it sets its signal handlers
        return c

    if workload == "w1_one":
        start = time.perf_counter()
        for _ in range(N_ENQUEUE):
            noop()
        return rate(N_ENQUEUE, time.perf_counter() - start)
    if workload == "w1_batch":
        return {"n/a": "huey has no batch enqueue"}
    if workload in ("w2", "w4", "w5"):
        n, task, workers = {"w2": (N_DRAIN, noop, 8), "w4": (N_SLEEP, sleep, SLEEP_CONCURRENCY),
                            "w5": (N_DRAIN, calls, CALL_CONCURRENCY)}[workload]
        for _ in range(n):
            task()
        start = time.perf_counter()
        c = consumer(workers)
        await wait_for(lambda: len(done) >= n)
        elapsed = time.perf_counter() - start
        c.stop(graceful=True)
        return rate(n, elapsed)
    if workload == "w3":
        c = consumer(4)
        await asyncio.sleep(0.5)
        for _ in range(N_LATENCY):
            stamp(time.time())
            await asyncio.sleep(LATENCY_GAP)
        await wait_for(lambda: len(done) >= N_LATENCY)
        c.stop(graceful=True)
        return latency(done)
    raise ValueError(workload)


# --- pgqueuer --------------------------------------------------------------------------------

async def pgqueuer_system(workload: str, url: str) -> dict[str, Any]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries
    from pgqueuer import QueueManager as PgQueueManager
    from pgqueuer.domain.types import QueueExecutionMode

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    driver = AsyncpgDriver(connection)
    queries = Queries(driver)
    await queries.install()
    samples: list[float] = []
    try:
        if workload == "w1_one":
            start = time.perf_counter()
            for _ in range(N_ENQUEUE):
                await queries.enqueue("noop", None)
            return rate(N_ENQUEUE, time.perf_counter() - start)
        if workload == "w1_batch":
            start = time.perf_counter()
            await queries.enqueue(["noop"] * N_ENQUEUE, [None] * N_ENQUEUE, [0] * N_ENQUEUE)
            return rate(N_ENQUEUE, time.perf_counter() - start)

        qm = PgQueueManager(queries)

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            return None

        @qm.entrypoint("sleep")
        async def sleep(job: Any) -> None:
            await asyncio.sleep(SLEEP)

        @qm.entrypoint("stamp")
        async def stamp(job: Any) -> None:
            samples.append(time.time() - float(job.payload.decode()))

        @qm.entrypoint("call")
        async def calls(job: Any) -> None:
            call()

        if workload in ("w2", "w4", "w5"):
            # W4's concurrency cap is max_concurrent_tasks (pgqueuer wants batches of at most
            # half of it); without a cap it keeps fetching and runs every job at once.
            n, name, batch, cap = {"w2": (N_DRAIN, "noop", 100, None),
                                   "w4": (N_SLEEP, "sleep", SLEEP_CONCURRENCY // 2, SLEEP_CONCURRENCY),
                                   "w5": (N_DRAIN, "call", 100, None)}[workload]
            await queries.enqueue([name] * n, [None] * n, [0] * n)
            start = time.perf_counter()
            await qm.run(batch_size=batch, max_concurrent_tasks=cap, mode=QueueExecutionMode.drain)
            return rate(n, time.perf_counter() - start)
        if workload == "w3":
            sender_conn = await asyncpg.connect(dsn)
            sender = Queries(AsyncpgDriver(sender_conn))
            running = asyncio.create_task(qm.run(batch_size=10))
            await asyncio.sleep(0.5)
            for _ in range(N_LATENCY):
                await sender.enqueue("stamp", str(time.time()).encode())
                await asyncio.sleep(LATENCY_GAP)
            await wait_for(lambda: len(samples) >= N_LATENCY)
            qm.shutdown.set()
            await running
            await sender_conn.close()
            return latency(samples)
        raise ValueError(workload)
    finally:
        await connection.close()


# --- procrastinate -------------------------------------------------------------------------

async def procrastinate_system(workload: str, url: str) -> dict[str, Any]:
    import procrastinate

    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))
    samples: list[float] = []

    @app.task(name="noop")
    async def noop() -> None:
        return None

    @app.task(name="sleep")
    async def sleep() -> None:
        await asyncio.sleep(SLEEP)

    @app.task(name="stamp")
    async def stamp(sent: float) -> None:
        samples.append(time.time() - sent)

    @app.task(name="call")
    async def calls() -> None:
        call()

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        if workload == "w1_one":
            start = time.perf_counter()
            for _ in range(N_ENQUEUE):
                await noop.defer_async()
            return rate(N_ENQUEUE, time.perf_counter() - start)
        if workload == "w1_batch":
            start = time.perf_counter()
            await noop.batch_defer_async(*[{} for _ in range(N_ENQUEUE)])
            return rate(N_ENQUEUE, time.perf_counter() - start)
        if workload in ("w2", "w4", "w5"):
            n, task, concurrency = {"w2": (N_DRAIN, noop, DRAIN_CONCURRENCY), "w4": (N_SLEEP, sleep, SLEEP_CONCURRENCY),
                                    "w5": (N_DRAIN, calls, CALL_CONCURRENCY)}[workload]
            await task.batch_defer_async(*[{} for _ in range(n)])
            start = time.perf_counter()
            await app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False)
            return rate(n, time.perf_counter() - start)
        if workload == "w3":
            running = asyncio.create_task(app.run_worker_async(concurrency=10, install_signal_handlers=False))
            await asyncio.sleep(0.5)
            for _ in range(N_LATENCY):
                await stamp.defer_async(sent=time.time())
                await asyncio.sleep(LATENCY_GAP)
            await wait_for(lambda: len(samples) >= N_LATENCY)
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            return latency(samples)
    raise ValueError(workload)


SYSTEMS: dict[str, Runner] = {
    "asyncio-ceiling": ceiling,
    "neonnb": neonnb_system,
    "huey": huey_system,
    "pgqueuer": pgqueuer_system,
    "procrastinate": procrastinate_system,
}


# --- RQ (SimpleWorker: one job at a time, in the worker's own process) -----------------------

RQ_DONE: list[float] = []


def rq_noop() -> None:
    RQ_DONE.append(0.0)


def rq_stamp(sent: float) -> None:
    RQ_DONE.append(time.time() - sent)


def rq_call() -> None:
    call()
    RQ_DONE.append(0.0)


async def rq_system(workload: str, url: str) -> dict[str, Any]:
    from redis import Redis
    from rq import Queue, SimpleWorker

    connection = Redis.from_url(url)
    queue = Queue("b", connection=connection)
    if workload == "w1_one":
        start = time.perf_counter()
        for _ in range(N_ENQUEUE):
            queue.enqueue(rq_noop)
        return rate(N_ENQUEUE, time.perf_counter() - start)
    if workload in ("w1_batch", "w2", "w5"):
        start = time.perf_counter()
        task = rq_call if workload == "w5" else rq_noop
        queue.enqueue_many([Queue.prepare_data(task) for _ in range(N_ENQUEUE)])
        if workload == "w1_batch":
            return rate(N_ENQUEUE, time.perf_counter() - start)
        worker = SimpleWorker([queue], connection=connection)
        start = time.perf_counter()
        worker.work(burst=True, logging_level="WARNING")  # RQ's worker wants the main thread
        return rate(len(RQ_DONE), time.perf_counter() - start)
    if workload == "w3":
        def send() -> None:
            time.sleep(0.5)
            for _ in range(N_LATENCY):
                queue.enqueue(rq_stamp, time.time())
                time.sleep(LATENCY_GAP)

        sender = threading.Thread(target=send)
        sender.start()
        SimpleWorker([queue], connection=connection).work(max_jobs=N_LATENCY, logging_level="WARNING")
        sender.join()
        return latency(RQ_DONE)
    if workload == "w4":
        return {"n/a": "one job at a time per worker process"}
    raise ValueError(workload)


# --- arq ---------------------------------------------------------------------------------

async def arq_system(workload: str, url: str) -> dict[str, Any]:
    from arq import Worker, create_pool
    from arq.connections import RedisSettings
    from arq.worker import func

    settings = RedisSettings.from_dsn(url)
    pool = await create_pool(settings)
    samples: list[float] = []

    async def noop(ctx: dict[str, Any]) -> None:
        return None

    async def sleep(ctx: dict[str, Any]) -> None:
        await asyncio.sleep(SLEEP)

    async def stamp(ctx: dict[str, Any], sent: float) -> None:
        samples.append(time.time() - sent)

    async def calls(ctx: dict[str, Any]) -> None:
        call()

    def worker(concurrency: int, burst: bool) -> Worker:
        functions = [func(noop, name="noop"), func(sleep, name="sleep"), func(stamp, name="stamp"),
                     func(calls, name="call")]
        return Worker(functions=functions, redis_pool=pool, burst=burst, max_jobs=concurrency,
                      poll_delay=0.001, keep_result=0, handle_signals=False)

    try:
        if workload == "w1_one":
            start = time.perf_counter()
            for _ in range(N_ENQUEUE):
                await pool.enqueue_job("noop")
            return rate(N_ENQUEUE, time.perf_counter() - start)
        if workload == "w1_batch":
            return {"n/a": "arq has no batch enqueue"}
        if workload in ("w2", "w4", "w5"):
            n, name, concurrency = {"w2": (N_DRAIN, "noop", DRAIN_CONCURRENCY),
                                    "w4": (N_SLEEP, "sleep", SLEEP_CONCURRENCY),
                                    "w5": (N_DRAIN, "call", CALL_CONCURRENCY)}[workload]
            for _ in range(n):
                await pool.enqueue_job(name)
            start = time.perf_counter()
            await worker(concurrency, burst=True).main()
            return rate(n, time.perf_counter() - start)
        if workload == "w3":
            w = worker(10, burst=False)
            running = asyncio.create_task(w.main())
            await asyncio.sleep(0.5)
            for _ in range(N_LATENCY):
                await pool.enqueue_job("stamp", time.time())
                await asyncio.sleep(LATENCY_GAP)
            await wait_for(lambda: len(samples) >= N_LATENCY)
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await w.close()
            return latency(samples)
        raise ValueError(workload)
    finally:
        await pool.aclose()


SYSTEMS["rq"] = rq_system
SYSTEMS["arq"] = arq_system


# --- SAQ -----------------------------------------------------------------------------------

async def saq_system(workload: str, url: str) -> dict[str, Any]:
    from saq import Queue, Worker

    queue = Queue.from_url(url, name="b")
    await queue.connect()
    samples: list[float] = []

    async def noop(ctx: Any) -> None:
        samples.append(0.0)

    async def sleep(ctx: Any) -> None:
        await asyncio.sleep(SLEEP)
        samples.append(0.0)

    async def stamp(ctx: Any, *, sent: float) -> None:
        samples.append(time.time() - sent)

    async def calls(ctx: Any) -> None:
        call()
        samples.append(0.0)

    def worker(concurrency: int) -> Any:
        return Worker(queue, functions=[("noop", noop), ("sleep", sleep), ("stamp", stamp), ("call", calls)],
                      concurrency=concurrency)

    try:
        if workload == "w1_one":
            start = time.perf_counter()
            for _ in range(N_ENQUEUE):
                await queue.enqueue("noop")
            return rate(N_ENQUEUE, time.perf_counter() - start)
        if workload == "w1_batch":
            return {"n/a": "SAQ has no batch enqueue"}
        if workload in ("w2", "w4", "w5"):
            n, name, concurrency = {"w2": (N_DRAIN, "noop", DRAIN_CONCURRENCY),
                                    "w4": (N_SLEEP, "sleep", SLEEP_CONCURRENCY),
                                    "w5": (N_DRAIN, "call", CALL_CONCURRENCY)}[workload]
            for _ in range(n):
                await queue.enqueue(name)
            w = worker(concurrency)
            start = time.perf_counter()
            running = asyncio.create_task(w.start())
            await wait_for(lambda: len(samples) >= n)
            elapsed = time.perf_counter() - start
            await _stop(running, w.stop())
            return rate(n, elapsed)
        if workload == "w3":
            w = worker(10)
            running = asyncio.create_task(w.start())
            await asyncio.sleep(0.5)
            for _ in range(N_LATENCY):
                await queue.enqueue("stamp", sent=time.time())
                await asyncio.sleep(LATENCY_GAP)
            await wait_for(lambda: len(samples) >= N_LATENCY)
            await _stop(running, w.stop())
            return latency(samples)
        raise ValueError(workload)
    finally:
        await queue.disconnect()


async def _stop(running: asyncio.Task[Any], stopping: Awaitable[Any]) -> None:
    await stopping
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running


# --- taskiq (ListQueueBroker: BRPOP on a Redis list) ------------------------------------------

async def taskiq_system(workload: str, url: str) -> dict[str, Any]:
    from taskiq.receiver import Receiver
    from taskiq_redis import ListQueueBroker

    broker = ListQueueBroker(url, queue_name="b")
    samples: list[float] = []

    @broker.task(task_name="noop")
    async def noop() -> None:
        samples.append(0.0)

    @broker.task(task_name="sleep")
    async def sleep() -> None:
        await asyncio.sleep(SLEEP)
        samples.append(0.0)

    @broker.task(task_name="stamp")
    async def stamp(sent: float) -> None:
        samples.append(time.time() - sent)

    @broker.task(task_name="call")
    async def calls() -> None:
        call()
        samples.append(0.0)

    async def consume(concurrency: int, until: Callable[[], bool]) -> float:
        finished = asyncio.Event()
        receiver = Receiver(broker, max_async_tasks=concurrency, run_startup=False)
        start = time.perf_counter()
        listening = asyncio.create_task(receiver.listen(finished))
        await wait_for(until)
        elapsed = time.perf_counter() - start
        finished.set()
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        return elapsed

    await broker.startup()
    try:
        if workload == "w1_one":
            start = time.perf_counter()
            for _ in range(N_ENQUEUE):
                await noop.kiq()
            return rate(N_ENQUEUE, time.perf_counter() - start)
        if workload == "w1_batch":
            return {"n/a": "taskiq has no batch enqueue"}
        if workload in ("w2", "w4", "w5"):
            n, task, concurrency = {"w2": (N_DRAIN, noop, DRAIN_CONCURRENCY), "w4": (N_SLEEP, sleep, SLEEP_CONCURRENCY),
                                    "w5": (N_DRAIN, calls, CALL_CONCURRENCY)}[workload]
            for _ in range(n):
                await task.kiq()
            return rate(n, await consume(concurrency, lambda: len(samples) >= n))
        if workload == "w3":
            async def send() -> None:
                await asyncio.sleep(0.5)
                for _ in range(N_LATENCY):
                    await stamp.kiq(time.time())
                    await asyncio.sleep(LATENCY_GAP)

            sender = asyncio.create_task(send())
            await consume(10, lambda: len(samples) >= N_LATENCY)
            await sender
            return latency(samples)
        raise ValueError(workload)
    finally:
        await broker.shutdown()


# --- Dramatiq and Celery: thread-based workers, sync API ---------------------------------------

def _counting_tasks(register: Callable[..., Any]) -> tuple[Any, Any, Any, Any, list[float]]:
    """noop, sleep, stamp and call tasks for a sync library; `register(fn, name)` declares one."""
    done: list[float] = []
    lock = threading.Lock()

    def noop() -> None:
        with lock:
            done.append(0.0)

    def sleep() -> None:
        time.sleep(SLEEP)
        with lock:
            done.append(0.0)

    def stamp(sent: float) -> None:
        with lock:
            done.append(time.time() - sent)

    def calls() -> None:
        call()
        with lock:
            done.append(0.0)

    return register(noop, "noop"), register(sleep, "sleep"), register(stamp, "stamp"), register(calls, "call"), done


async def _sync_peer(
    workload: str, send: Callable[[Any, tuple[Any, ...]], None], tasks: tuple[Any, Any, Any, Any, list[float]],
    start_worker: Callable[[int], Callable[[], None]],
) -> dict[str, Any]:
    """The workloads for a library with a sync `send(task, args)` and a thread-pool worker
    that `start_worker(threads)` starts and whose returned function stops it."""
    noop, sleep, stamp, calls, done = tasks
    if workload == "w1_one":
        start = time.perf_counter()
        for _ in range(N_ENQUEUE):
            send(noop, ())
        return rate(N_ENQUEUE, time.perf_counter() - start)
    if workload == "w1_batch":
        return {"n/a": "no batch enqueue"}
    if workload in ("w2", "w4", "w5"):
        n, task, threads = {"w2": (N_DRAIN, noop, 8), "w4": (N_SLEEP, sleep, SLEEP_CONCURRENCY),
                            "w5": (N_DRAIN, calls, CALL_CONCURRENCY)}[workload]
        for _ in range(n):
            send(task, ())
        start = time.perf_counter()
        stop = start_worker(threads)
        await wait_for(lambda: len(done) >= n)
        elapsed = time.perf_counter() - start
        stop()
        return rate(n, elapsed)
    if workload == "w3":
        stop = start_worker(4)
        await asyncio.sleep(0.5)
        for _ in range(N_LATENCY):
            send(stamp, (time.time(),))
            await asyncio.sleep(LATENCY_GAP)
        await wait_for(lambda: len(done) >= N_LATENCY)
        stop()
        return latency(done)
    raise ValueError(workload)


async def dramatiq_system(workload: str, url: str) -> dict[str, Any]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url)
    dramatiq.set_broker(broker)
    tasks = _counting_tasks(lambda fn, name: dramatiq.actor(fn, actor_name=name, queue_name="b", max_retries=0))

    def start_worker(threads: int) -> Callable[[], None]:
        worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=1)
        worker.start()
        return worker.stop

    return await _sync_peer(workload, lambda task, args: task.send(*args), tasks, start_worker)


async def celery_system(workload: str, url: str) -> dict[str, Any]:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker as celery_worker

    app = Celery("bench", broker=url, set_as_current=True)
    app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=64, broker_connection_retry_on_startup=True)
    tasks = _counting_tasks(lambda fn, name: app.task(name=name)(fn))

    def start_worker(threads: int) -> Callable[[], None]:
        running = celery_worker(app, pool="threads", concurrency=threads, perform_ping_check=False,
                                loglevel="WARNING", shutdown_timeout=5)
        running.__enter__()
        return lambda: running.__exit__(None, None, None)

    return await _sync_peer(workload, lambda task, args: task.apply_async(args), tasks, start_worker)


SYSTEMS["saq"] = saq_system
SYSTEMS["taskiq"] = taskiq_system
SYSTEMS["dramatiq"] = dramatiq_system
SYSTEMS["celery"] = celery_system


# --- the Redis ceiling: redis-benchmark (C, one connection) against the same server ----------

async def redis_ceiling(workload: str, url: str) -> dict[str, Any]:
    import csv
    import subprocess
    from urllib.parse import urlparse

    port = str(urlparse(url).port or 6379)

    def bench(*args: str) -> dict[str, str]:
        out = subprocess.run(["redis-benchmark", "-p", port, "-c", "1", "--csv", *args],
                             capture_output=True, text=True, check=True, timeout=120).stdout
        return list(csv.DictReader(out.splitlines()))[-1]

    if workload == "w1_one":  # LPUSH, one at a time: what any one-by-one enqueue is bound by
        return rate(1, 1 / float(bench("-n", "20000", "-t", "lpush")["rps"]))
    if workload == "w1_batch":  # LPUSH pipelined 1,000 deep
        return rate(1, 1 / float(bench("-n", "500000", "-P", "1000", "-t", "lpush")["rps"]))
    if workload == "w3":  # one round trip
        row = bench("-n", "20000", "-t", "ping")
        return {"p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"]), "n": 20000}
    return {"n/a": "-"}


SYSTEMS["redis-ceiling"] = redis_ceiling
