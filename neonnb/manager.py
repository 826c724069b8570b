"""QueueManager: the dispatch family, workers, the failed store and a sync facade.

Every public sync method is a one-line bridge to its ``a``-prefixed async twin, run on
neonnb's background loop, except the single-job dispatch family, the calls a notebook makes
most, which store the job from the calling thread (``_enqueue_sync``).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from . import frames, render, workflows
from ._loop import on_loop_thread, run_sync
from .config import Config, WorkerOptions, parse_duration, redact
from .drivers import create_driver
from .drivers.base import Driver
from .errors import ConfigError
from .handles import FailedStore, JobHandle
from .job import FunctionJob, encode_job, unreadable
from .records import MAX_UNIQUE_KEY, JobRecord, Priority, QueueCounts, Status, check_queue_name, check_text
from .worker import Events, Worker, clock_skew_error, error_info

if TYPE_CHECKING:
    import pandas as pd

    from .notebook.dashboard import Dashboard
    from .scheduler import Scheduler
    from .workflows import BatchHandle, ChainHandle

logger = logging.getLogger("neonnb.manager")

LEASE_ERROR: dict[str, Any] = {
    "type": "LeaseExpired",
    "message": (
        "the worker running this job stopped heartbeating for longer than the lease (it was "
        "killed, crashed, hung, or lost the store) on the job's last allowed attempt; look for "
        "what stops the worker, then retry the job"
    ),
    "traceback": "",
}
"""The failure recorded when a job's worker kept dying under it."""


class QueueManager:
    """The spec's ``queue.Manager``: ``QueueManager(Config(...))`` or ``neonnb.connect(url)``.

    ``clock`` returns seconds since the epoch; tests inject a fake one to control time.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        driver: Driver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or Config()
        self.driver = driver or create_driver(self.config)
        self.clock = clock
        self.events = Events()
        self.dependencies: dict[str, Any] = {}
        self.failed = FailedStore(self)
        self._workers: dict[Worker, None] = {}  # in the order they started (a set that keeps it)
        self._workers_lock = threading.Lock()  # the driver's notification thread reads them
        self._watching = False
        self._next_housekeeping = 0.0
        self.clocks_checked = False  # a worker compared this process's clock with the store's (Worker.start)
        # What this process started, for the dashboard: its schedulers, its latest chains and batches.
        self.schedulers: list[Scheduler] = []
        self.recent_workflows: collections.deque[ChainHandle | BatchHandle] = collections.deque(maxlen=8)
        self._dashboard: Dashboard | None = None  # the one panel of this manager (dashboard())

    def __repr__(self) -> str:
        return f"<neonnb.QueueManager driver={self.config.driver} connection={_safe_url(self.config.connection)}>"

    def _repr_html_(self) -> str:
        try:
            body = render.queues_table(self.stats())
        except Exception as exc:  # a repr must render even when the store is down
            body = f"<span style='color:{render.ERROR}'>{render.escape(str(exc))}</span>"
        workers = f"<div>{len(self.workers)} worker(s) in this kernel</div>"
        title = f"neonnb · {self.config.describe_store()}"
        return render.panel(title, body + workers, "neonnb-panel neonnb-manager")

    def __enter__(self) -> QueueManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> QueueManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def provide(self, **dependencies: Any) -> None:
        """Make objects available to handlers as ``ctx.deps[name]`` (connections, clients)."""
        self.dependencies.update(dependencies)

    # --- defining jobs and workers -----------------------------------------------------

    @overload
    def job(self, fn: Callable[..., Any], /) -> FunctionJob: ...
    @overload
    def job(
        self, fn: None = None, /, *, queue: str | None = ..., max_attempts: int | None = ..., timeout: Any = ...,
        priority: Priority | str = ..., name: str | None = ..., unique: bool = ...,
    ) -> Callable[[Callable[..., Any]], FunctionJob]: ...

    def job(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        timeout: Any = None,
        priority: Priority | str = Priority.NORMAL,
        name: str | None = None,
        unique: bool = False,
    ) -> FunctionJob | Callable[[Callable[..., Any]], FunctionJob]:
        """Register a function as a job: ``@qm.job`` or ``@qm.job(queue="etl", max_attempts=5)``.
        ``unique=True``: while a call with the same arguments is queued or running, dispatching
        it again returns that job's handle instead of enqueuing another."""
        if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
            raise ConfigError(f"job max_attempts must be an integer of at least 1, got {max_attempts!r}")
        seconds = None if timeout is None else parse_duration(timeout, "job timeout")
        prio = _priority(priority)

        def register(f: Callable[..., Any]) -> FunctionJob:
            return FunctionJob(
                f, self, name=name, queue=queue, max_attempts=max_attempts, timeout=seconds, priority=prio,
                unique=unique,
            )

        return register if fn is None else register(fn)

    def worker(
        self,
        queue: str | Sequence[str] | None = None,
        concurrency: int | None = None,
        options: WorkerOptions | None = None,
    ) -> Worker:
        """A worker for one queue or several (in order of preference after priority)."""
        queues = [queue] if isinstance(queue, str) else list(queue or [self.config.default_queue])
        concurrency = self.config.workers if concurrency is None else concurrency
        return Worker(self, queues, concurrency, options or WorkerOptions())

    # --- dispatching --------------------------------------------------------------------

    def _record(
        self, queue: str, job: Any, *, priority: Priority | str | None = None, run_at: float | None = None
    ) -> JobRecord:
        """Encode a job and resolve its options (the job's own methods, then config)."""
        check_queue_name(queue)
        name, payload = encode_job(job)
        now = self.clock()
        if run_at is None:
            delay = job.delay() if hasattr(job, "delay") else 0
            run_at = now + parse_duration(delay, f"{name}.delay()")
        if priority is None:
            priority = job.priority() if hasattr(job, "priority") else Priority.NORMAL
        max_attempts = job.max_attempts() if hasattr(job, "max_attempts") else None
        timeout = job.timeout() if hasattr(job, "timeout") else None
        return JobRecord(
            id=new_job_id(),
            queue=queue,
            name=name,
            payload=payload,
            priority=_priority(priority),
            max_attempts=max_attempts or self.config.max_attempts,
            timeout=None if timeout is None else parse_duration(timeout, f"{name}.timeout()"),
            run_at=run_at,
            created_at=now,
            unique_key=_unique_key(job),
        )

    def _add_worker(self, worker: Worker) -> None:
        with self._workers_lock:
            self._workers[worker] = None
            if not self._watching:
                self._watching = True
                self.driver.watch(self._wake_workers)

    def _remove_worker(self, worker: Worker) -> None:
        with self._workers_lock:
            self._workers.pop(worker, None)

    def _local_workers(self) -> list[Worker]:
        with self._workers_lock:
            return list(self._workers)

    def _wake_workers(self, queue: str = "*", due: float | None = None) -> None:
        """Jobs of ``queue`` ("*": any) are due at ``due`` (None: now). Called after our own
        dispatches, and by the driver when another process made jobs due."""
        for worker in self._local_workers():
            if queue == "*" or queue in worker.queue_names:
                worker.notify(due)

    async def _enqueue(self, records: list[JobRecord]) -> list[JobHandle]:
        plain = [r for r in records if r.unique_key is None]
        if plain:
            await self.driver.enqueue(plain)
        for r in records:
            if r.unique_key is not None:
                r.id = await self.driver.enqueue_unique(r)  # the id of whichever job holds the key
        return self._enqueued(records)

    def _enqueue_sync(self, record: JobRecord) -> JobHandle:
        """The sync dispatch family's way in: the driver stores the job on the calling
        thread, not on neonnb's loop thread, which would cost a thread wake-up each way (and
        on SQL one more each way to the driver's threads; benchmarks/DECISIONS.md)."""
        if record.unique_key is None and not on_loop_thread() and self.driver.enqueue_blocking([record]):
            return self._enqueued([record])[0]
        return run_sync(self._enqueue([record]))[0]

    def _enqueued(self, records: list[JobRecord]) -> list[JobHandle]:
        """Wake this process's workers for the stored records; their handles."""
        earliest: dict[str, float] = {}
        for r in records:
            earliest[r.queue] = min(r.run_at, earliest.get(r.queue, r.run_at))
        for queue, due in earliest.items():
            self._wake_workers(queue, due)
        return [JobHandle(self, r.id, r.queue) for r in records]

    async def adispatch(self, queue: str, job: Any) -> JobHandle:
        """Enqueue ``job`` on ``queue`` now (or after the job's own ``delay()``)."""
        return (await self._enqueue([self._record(queue, job)]))[0]

    async def adispatch_after(self, queue: str, job: Any, delay: Any) -> JobHandle:
        """Enqueue ``job`` to run ``delay`` from now (seconds, timedelta or "5m")."""
        return (await self._enqueue([self._record(queue, job, run_at=self._after(delay))]))[0]

    async def adispatch_at(self, queue: str, job: Any, when: dt.datetime | float) -> JobHandle:
        """Enqueue ``job`` to run at ``when`` (an aware or local datetime, or an epoch time)."""
        return (await self._enqueue([self._record(queue, job, run_at=_epoch(when))]))[0]

    def _after(self, delay: Any) -> float:
        return self.clock() + parse_duration(delay, "delay")

    async def adispatch_with_priority(self, queue: str, job: Any, priority: Priority | str) -> JobHandle:
        return (await self._enqueue([self._record(queue, job, priority=priority)]))[0]

    async def adispatch_batch(self, queue: str, jobs: Iterable[Any], *, then: Any = None) -> BatchHandle:
        """Enqueue many jobs in one driver round trip; if any can't be encoded, none is. The
        handle is the list of the jobs' handles, with the batch's counts and progress.
        ``then``: a job to run once every job of the batch has finished (however it ended)."""
        records = [self._record(queue, job) for job in jobs]
        callback = None
        if then is not None:
            then_record = self._record(queue, then)
            batch_id = new_job_id()
            if records:
                workflows.join_batch(batch_id, records, then_record)
                callback = JobHandle(self, workflows.step_id(batch_id, "then"), queue, stored_later=True)
            else:
                [callback] = await self._enqueue([then_record])  # nothing to wait for
        batch = workflows.BatchHandle(self, await self._enqueue(records) if records else [], callback)
        if len(batch) > 1:
            self.recent_workflows.append(batch)
        return batch

    async def achain(self, queue: str, jobs: Sequence[Any]) -> ChainHandle:
        """Run ``jobs`` in order on ``queue``, each once the one before succeeded (see
        neonnb.workflows). Every step is encoded first: one that can't be stored stops the
        chain before anything is enqueued."""
        records = [self._record(queue, job) for job in jobs]
        if not records:
            raise ValueError("a chain needs at least one job")
        chain_id = new_job_id()
        first = workflows.first_step(chain_id, records)
        await self._enqueue([first])
        chain = workflows.ChainHandle(self, chain_id, queue, len(records))
        self.recent_workflows.append(chain)
        return chain

    def chain(self, queue: str, jobs: Sequence[Any]) -> ChainHandle:
        return run_sync(self.achain(queue, jobs))

    def dispatch(self, queue: str, job: Any) -> JobHandle:
        return self._enqueue_sync(self._record(queue, job))

    def dispatch_after(self, queue: str, job: Any, delay: Any) -> JobHandle:
        return self._enqueue_sync(self._record(queue, job, run_at=self._after(delay)))

    def dispatch_at(self, queue: str, job: Any, when: dt.datetime | float) -> JobHandle:
        return self._enqueue_sync(self._record(queue, job, run_at=_epoch(when)))

    def dispatch_with_priority(self, queue: str, job: Any, priority: Priority | str) -> JobHandle:
        return self._enqueue_sync(self._record(queue, job, priority=priority))

    def dispatch_batch(self, queue: str, jobs: Iterable[Any], *, then: Any = None) -> BatchHandle:
        return run_sync(self.adispatch_batch(queue, jobs, then=then))

    # --- looking at queues ----------------------------------------------------------------

    async def astats(self) -> dict[str, QueueCounts]:
        return await self.driver.counts(self.clock())

    async def asize(self, queue: str | None = None) -> int:
        """Jobs of ``queue`` not yet started (waiting and delayed)."""
        counts = (await self.astats()).get(queue or self.config.default_queue)
        return counts.size if counts else 0

    def stats(self) -> dict[str, QueueCounts]:
        return run_sync(self.astats())

    def size(self, queue: str | None = None) -> int:
        return run_sync(self.asize(queue))

    async def housekeeping(self, now: float) -> None:
        """Requeue jobs whose worker died and drop results past their TTL. The workers of a
        manager share one schedule: a quarter of the lease, so a dead worker's jobs wait at
        most 1.25 leases, and no more often than the poll interval."""
        if now < self._next_housekeeping:
            return
        config = self.config
        self._next_housekeeping = now + max(config.poll_interval, config.lease_timeout / 4)
        # Once a worker has checked the clocks at its start, every round checks them again: a
        # clock that jumped since (a VM resumed, NTP stepped it) would make live jobs look dead.
        skewed = clock_skew_error(await self.aclock_skew(), config.lease_timeout) if self.clocks_checked else None
        if skewed is not None:
            logger.error("%s; leases are not recovered until the clocks agree", skewed)
            return
        recovered = await self.driver.recover_expired(now)
        if recovered.requeued:
            logger.warning("requeued %d job(s) whose worker stopped heartbeating", len(recovered.requeued))
        for record in recovered.exhausted:
            # Counted first (a batch member's end), then ended: if this process dies between
            # the two, the next housekeeping finds the job again and does both.
            await workflows.member_finished(self, record, None)
            error = error_info(unreadable(record)) if record.broken else LEASE_ERROR
            if await self.driver.fail(record, record.worker_id or "", now, error):
                logger.warning("job %s (%s) failed: its worker stopped heartbeating on its last allowed attempt",
                               record.id, record.name)
        await self.driver.purge_finished(now - config.result_ttl)

    async def aclock_skew(self) -> float:
        """Seconds this process's clock is ahead of the store's (behind: negative); 0 for a
        store on this machine. Leases are times by the workers' clocks, so they must agree."""
        before = self.clock()
        server = await self.driver.server_time()
        return 0.0 if server is None else (before + self.clock()) / 2 - server

    async def ajobs(
        self, status: Status | str | None = None, queue: str | None = None, limit: int = 100
    ) -> list[JobRecord]:
        """Jobs newest first, of one status and queue if given (failed ones by when they failed)."""
        wanted = None if status is None else _status(status)
        return await self.driver.list_jobs(status=wanted, queue=queue, limit=limit)

    def jobs(self, status: Status | str | None = None, queue: str | None = None, limit: int = 100) -> list[JobRecord]:
        return run_sync(self.ajobs(status, queue, limit))

    @property
    def workers(self) -> list[Worker]:
        """The workers this manager runs in this process."""
        return self._local_workers()

    # --- pandas views (neonnb.frames; pip install 'neonnb[notebook]') -----------------------

    def queues_df(self) -> pd.DataFrame:
        """One row per queue: waiting jobs by priority, delayed, running, succeeded, failed."""
        return frames.queues_frame(self.stats())

    def jobs_df(self, status: Status | str | None = None, queue: str | None = None, limit: int = 100) -> pd.DataFrame:
        return frames.jobs_frame(self.jobs(status, queue, limit))

    def failed_df(self, queue: str | None = None, limit: int = 100) -> pd.DataFrame:
        return frames.failed_frame(self.jobs(Status.FAILED, queue, limit))

    def workers_df(self) -> pd.DataFrame:
        return frames.workers_frame(self.workers)

    def scheduler(self, poll_interval: float = 1.0) -> Scheduler:
        """A scheduler for cron and recurring jobs (see neonnb.scheduler); several, in any
        processes, may run the same schedules: each tick is dispatched once."""
        from .scheduler import Scheduler

        scheduler = Scheduler(self, poll_interval=poll_interval)
        self.schedulers.append(scheduler)
        return scheduler

    def dashboard(self, interval: float | None = 0.5) -> Dashboard:
        """The live ipywidgets panel (what ``%neonnb status`` shows); refreshes every
        ``interval`` seconds until its ``close()``. One per manager: calling it again (a
        re-run cell) shows the same panel, with one refresher, instead of adding another."""
        dashboard = self._dashboard
        if dashboard is None or dashboard.closed:
            dashboard = self._dashboard = render.VIEWS["dashboard"](self, interval)
        dashboard.interval = interval
        return dashboard.start()

    async def acancel(self, job_id: str, queue: str | None = None) -> Status | None:
        """Cancel a job: a queued or delayed one never runs; a running one is asked to stop
        (``ctx.cancelled`` turns true for sync handlers, async ones are cancelled) at its
        worker's next heartbeat. Returns the status the job had (None: no such job)."""
        was = await self.driver.cancel(job_id, queue, self.clock())
        if was is Status.QUEUED:
            record = await self.driver.get(job_id, queue)
            if record is not None and record.flow is not None:
                await workflows.member_finished(self, record, None)  # a batch counts it as finished
        return was

    def cancel(self, job_id: str, queue: str | None = None) -> Status | None:
        return run_sync(self.acancel(job_id, queue))

    def handle(self, job_id: str) -> JobHandle:
        """A handle for a job id seen elsewhere (a log line, a DataFrame)."""
        return JobHandle(self, job_id)

    async def aclose(self) -> None:
        for worker in self._local_workers():
            await worker.astop(grace=0)
        await self.driver.close()

    def close(self) -> None:
        """Stop this manager's workers (unfinished jobs go back to the queue) and disconnect."""
        run_sync(self.aclose())


def connect(target: str | Path, **settings: Any) -> QueueManager:
    """A manager for a URL (``sqlite:///jobs.db``, ``postgresql://...``, ``memory://``) or a
    YAML config file; ``settings`` override config fields (``connect(url, max_retries=5)``)."""
    text = str(target)
    if text.endswith((".yaml", ".yml")):
        config = Config.from_yaml(text)
        if settings:
            config = dataclasses.replace(config, **settings)  # re-validated by __post_init__
        return QueueManager(config)
    return QueueManager(Config.for_url(text, **settings))


def new_job_id() -> str:
    """32 hex digits: nanoseconds since the epoch, then 64 random bits. Ids sort by creation
    time, so the databases' id indexes grow at one end instead of splitting pages everywhere,
    and Redis orders jobs due at the same moment by them (FIFO). Within a process they strictly
    increase even if the clock stalls or steps back."""
    global _last_id_time
    with _id_lock:
        _last_id_time = max(time.time_ns(), _last_id_time + 1)
        stamp = _last_id_time
    return f"{stamp:016x}{os.urandom(8).hex()}"


_id_lock = threading.Lock()
_last_id_time = 0


def _unique_key(job: Any) -> str | None:
    key = job.unique_key() if hasattr(job, "unique_key") else None
    if key is not None and not isinstance(key, str):
        raise ConfigError(f"{type(job).__qualname__}.unique_key() must return a string or None, got {key!r}")
    return None if key is None else check_text(key, MAX_UNIQUE_KEY, "unique key")


def _epoch(when: dt.datetime | float) -> float:
    if isinstance(when, dt.datetime):
        return when.timestamp()
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        raise ConfigError(f"dispatch_at takes a datetime or seconds since the epoch, got {when!r}")
    return float(when)


def _status(value: Status | str) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise ConfigError(f"unknown status {value!r}: use one of {', '.join(s.value for s in Status)}") from None


def _priority(value: Priority | str) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise ConfigError(f"priority must be 'high', 'normal' or 'low', got {value!r}") from None


def _safe_url(connection: Any) -> str:
    return redact(connection) if isinstance(connection, str) else repr(connection)
