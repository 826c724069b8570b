"""QueueManager: the dispatch family, workers, the failed store and a sync facade.

Every public sync method is a one-line bridge to its ``a``-prefixed async twin, run on
neonnb's background loop, except the single-job dispatch family, the calls a notebook makes
most, which store the job from the calling thread (``_enqueue_sync``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from . import frames, render, workflows
from ._loop import close_at_exit, closed, run_sync
from .config import Config, DurationInput, WorkerOptions, parse_duration, parse_rate, positive_int, redact
from .core import Core
from .drivers import create_driver
from .drivers.base import Driver
from .errors import ConfigError
from .handles import FailedStore, JobHandle
from .hooks import Events, Hook
from .job import FunctionJob
from .records import (
    JobPage,
    JobRecord,
    Priority,
    QueueCounts,
    SchedulerInfo,
    Status,
    WorkerInfo,
    check_job_id,
    check_page,
    check_queue_name,
    new_job_id,
    parse_priority,
    parse_status,
)
from .scheduler import Scheduler
from .worker import Worker
from .workflows import BatchHandle, ChainHandle

if TYPE_CHECKING:
    import pandas as pd

    from .notebook.dashboard import Dashboard


class _Keep:
    """limit_queue's "not given": the limit stays as it is (None lifts it)."""

    def __repr__(self) -> str:
        return "unchanged"


KEEP = _Keep()

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
        config = config or Config()
        self.core = Core(config, driver or create_driver(config), clock)
        self.core.hooks.add(workflows.FlowHook(self.core))
        self.failed = FailedStore(self.core)
        # What this process started, for the dashboard: its schedulers, its latest chains and batches.
        self.schedulers: list[Scheduler] = []
        self.recent_workflows: collections.deque[ChainHandle | BatchHandle] = collections.deque(maxlen=8)
        self._dashboard: Dashboard | None = None  # the one panel of this manager (dashboard())
        close_at_exit(self)

    @property
    def config(self) -> Config:
        return self.core.config

    @property
    def driver(self) -> Driver:
        return self.core.driver

    @property
    def clock(self) -> Callable[[], float]:
        return self.core.clock

    @property
    def events(self) -> Events:
        """Lifecycle events of the jobs every worker on the store runs, this process's and
        (where the store carries them, see neonnb.feed) other processes': ``qm.events.subscribe(fn)``."""
        return self.core.events

    def add_hook(self, hook: Hook) -> Callable[[], None]:
        """Call ``hook`` around every job this manager's workers run (see neonnb.hooks);
        returns a function that removes it."""
        return self.core.hooks.add(hook)

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
        self.core.dependencies.update(dependencies)

    # --- defining jobs and workers -----------------------------------------------------

    @overload
    def job(self, fn: Callable[..., Any], /) -> FunctionJob: ...
    @overload
    def job(
        self, fn: None = None, /, *, queue: str | None = ..., max_attempts: int | None = ...,
        timeout: DurationInput | None = ..., priority: Priority | str = ..., name: str | None = ..., unique: bool = ...,
        rate_limit: str | None = ..., limit_key: str | Callable[..., Any] | None = ...,
        concurrency: int | None = ...,
    ) -> Callable[[Callable[..., Any]], FunctionJob]: ...

    def job(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        queue: str | None = None,
        max_attempts: int | None = None,
        timeout: DurationInput | None = None,
        priority: Priority | str = Priority.NORMAL,
        name: str | None = None,
        unique: bool = False,
        rate_limit: str | None = None,
        limit_key: str | Callable[..., Any] | None = None,
        concurrency: int | None = None,
    ) -> FunctionJob | Callable[[Callable[..., Any]], FunctionJob]:
        """Register a function as a job: ``@qm.job`` or ``@qm.job(queue="etl", max_attempts=5)``.
        ``unique=True``: while a call with the same arguments is queued or running, dispatching
        it again returns that job's handle instead of enqueuing another. ``rate_limit="10/s"``
        (or "100/m", "5/30s"): at most so many start in any such window, across every worker
        and process; with ``limit_key`` (an argument's name, or a callable of the arguments),
        per value of it. ``concurrency=2``: at most 2 running at once, across every worker (per
        ``limit_key`` value, if given). A job over a limit waits in its queue, uncharged."""
        if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
            raise ConfigError(f"job max_attempts must be an integer of at least 1, got {max_attempts!r}")
        seconds = None if timeout is None else parse_duration(timeout, "job timeout")
        prio = parse_priority(priority)

        def register(f: Callable[..., Any]) -> FunctionJob:
            return FunctionJob(
                f, self, name=name, queue=queue, max_attempts=max_attempts, timeout=seconds, priority=prio,
                unique=unique, rate_limit=rate_limit, limit_key=limit_key, concurrency=concurrency,
            )

        return register if fn is None else register(fn)

    def worker(
        self,
        queue: str | Sequence[str] | Mapping[str, float] | None = None,
        concurrency: int | None = None,
        options: WorkerOptions | None = None,
    ) -> Worker:
        """A worker for one queue or several. A list is an order of preference: every job of
        the first queue (highest priority first) before any of the next. A mapping ``{"a": 3,
        "b": 1}`` shares the slots by weight (3 of every 4 for ``a`` while both have jobs; all
        of them for whichever has jobs when the other has none)."""
        queues: Sequence[str] | Mapping[str, float]
        if isinstance(queue, str):
            queues = [queue]
        elif isinstance(queue, Mapping):
            queues = dict(queue)
        else:
            queues = list(queue or [self.config.default_queue])
        concurrency = self.config.workers if concurrency is None else concurrency
        return Worker(self.core, queues, concurrency, options or WorkerOptions())

    # --- dispatching --------------------------------------------------------------------

    async def _enqueue(self, records: list[JobRecord]) -> list[JobHandle]:
        return [JobHandle(self.core, r.id, r.queue) for r in await self.core.enqueue(records)]

    def _enqueue_sync(self, record: JobRecord) -> JobHandle:
        stored = self.core.enqueue_sync(record)
        return JobHandle(self.core, stored.id, stored.queue)

    async def adispatch(self, queue: str, job: Any, *, expires: DurationInput | None = None,
                        expires_at: dt.datetime | float | None = None) -> JobHandle:
        """Enqueue ``job`` on ``queue`` now (or after the job's own ``delay()``). ``expires``
        ("10m", seconds, a timedelta) or ``expires_at`` (a datetime or epoch time): a job not
        started by then never runs, and ends EXPIRED (not in the failed store)."""
        return (await self._enqueue([self._record(queue, job, expires, expires_at)]))[0]

    async def adispatch_after(self, queue: str, job: Any, delay: DurationInput, *,
                              expires: DurationInput | None = None,
                              expires_at: dt.datetime | float | None = None) -> JobHandle:
        """Enqueue ``job`` to run ``delay`` from now (seconds, timedelta or "5m")."""
        return (await self._enqueue([self._record(queue, job, expires, expires_at, run_at=self._after(delay))]))[0]

    async def adispatch_at(self, queue: str, job: Any, when: dt.datetime | float, *,
                           expires: DurationInput | None = None,
                           expires_at: dt.datetime | float | None = None) -> JobHandle:
        """Enqueue ``job`` to run at ``when`` (an aware or local datetime, or an epoch time)."""
        return (await self._enqueue([self._record(queue, job, expires, expires_at, run_at=_epoch(when))]))[0]

    def _after(self, delay: DurationInput) -> float:
        return self.clock() + parse_duration(delay, "delay")

    def _record(self, queue: str, job: Any, expires: DurationInput | None, expires_at: dt.datetime | float | None,
                run_at: float | None = None) -> JobRecord:
        """The job's record, with its expiry (from dispatch's ``expires`` or ``expires_at``)."""
        record = self.core.record(queue, job, run_at=run_at)
        if expires is not None and expires_at is not None:
            raise ConfigError("give a job's expiry as expires= (how long from now) or expires_at= (when), not both")
        if expires is not None:
            until = self.clock() + parse_duration(expires, "expires")
        elif expires_at is not None:
            until = _epoch(expires_at)
        else:
            return record
        if until <= record.run_at:
            raise ConfigError(f"the job would expire before it is due (expires {until - record.run_at:+.1f}s from "
                              "its start time): it could never run")
        record.flow = {**(record.flow or {}), "expires_at": until}
        return record

    async def adispatch_with_priority(self, queue: str, job: Any, priority: Priority | str) -> JobHandle:
        return (await self._enqueue([self.core.record(queue, job, priority=priority)]))[0]

    async def adispatch_batch(self, queue: str, jobs: Iterable[Any], *, then: Any = None,
                              expires: DurationInput | None = None,
                              expires_at: dt.datetime | float | None = None) -> BatchHandle:
        """Enqueue many jobs in one driver round trip; if any can't be encoded, none is. The
        handle is the list of the jobs' handles, with the batch's counts and progress.
        ``then``: a job to run once every job of the batch has finished (however it ended).
        ``expires``/``expires_at``: each job's expiry, as for ``dispatch``."""
        records = [self._record(queue, job, expires, expires_at) for job in jobs]
        callback = None
        if then is not None:
            then_record = self.core.record(queue, then)
            batch_id = new_job_id()
            if records:
                workflows.join_batch(batch_id, records, then_record)
                callback = JobHandle(self.core, workflows.step_id(batch_id, "then"), queue, stored_later=True)
            else:
                [callback] = await self._enqueue([then_record])  # nothing to wait for
        batch = BatchHandle(self.core, await self._enqueue(records) if records else [], callback)
        if len(batch) > 1:
            self.recent_workflows.append(batch)
        return batch

    async def achain(self, queue: str, jobs: Sequence[Any]) -> ChainHandle:
        """Run ``jobs`` in order on ``queue``, each once the one before succeeded (see
        neonnb.workflows). Every step is encoded first: one that can't be stored stops the
        chain before anything is enqueued."""
        records = [self.core.record(queue, job) for job in jobs]
        if not records:
            raise ValueError("a chain needs at least one job")
        chain_id = new_job_id()
        first = workflows.first_step(chain_id, records)
        await self._enqueue([first])
        chain = ChainHandle(self.core, chain_id, queue, len(records))
        self.recent_workflows.append(chain)
        return chain

    def chain(self, queue: str, jobs: Sequence[Any]) -> ChainHandle:
        return run_sync(self.achain(queue, jobs))

    def dispatch(self, queue: str, job: Any, *, expires: DurationInput | None = None,
                 expires_at: dt.datetime | float | None = None) -> JobHandle:
        return self._enqueue_sync(self._record(queue, job, expires, expires_at))

    def dispatch_after(self, queue: str, job: Any, delay: DurationInput, *, expires: DurationInput | None = None,
                       expires_at: dt.datetime | float | None = None) -> JobHandle:
        return self._enqueue_sync(self._record(queue, job, expires, expires_at, run_at=self._after(delay)))

    def dispatch_at(self, queue: str, job: Any, when: dt.datetime | float, *, expires: DurationInput | None = None,
                    expires_at: dt.datetime | float | None = None) -> JobHandle:
        return self._enqueue_sync(self._record(queue, job, expires, expires_at, run_at=_epoch(when)))

    def dispatch_with_priority(self, queue: str, job: Any, priority: Priority | str) -> JobHandle:
        return self._enqueue_sync(self.core.record(queue, job, priority=priority))

    def dispatch_batch(self, queue: str, jobs: Iterable[Any], *, then: Any = None,
                       expires: DurationInput | None = None,
                       expires_at: dt.datetime | float | None = None) -> BatchHandle:
        return run_sync(self.adispatch_batch(queue, jobs, then=then, expires=expires, expires_at=expires_at))

    # --- looking at queues ----------------------------------------------------------------

    async def astats(self) -> dict[str, QueueCounts]:
        counts: dict[str, QueueCounts]
        counts, settings = await asyncio.gather(self.core.counting.counts(), self.driver.queue_settings())
        for queue, setting in settings.items():  # a paused or limited queue shows, with or without jobs
            counts.setdefault(queue, QueueCounts()).paused = bool(setting.get("paused"))
            counts[queue].rate = setting.get("rate")
            counts[queue].concurrency = setting.get("concurrency")
        return counts

    async def apause(self, queue: str) -> None:
        """Pause ``queue``: no worker, in any process, starts its jobs (within a second)
        until ``resume``; running ones finish, and dispatches are still stored. The state is
        kept in the store: it outlives every process."""
        await self.core.configure_queue(queue, {"paused": True})

    def pause(self, queue: str) -> None:
        run_sync(self.apause(queue))

    async def aresume(self, queue: str) -> None:
        """Let workers take ``queue``'s jobs again (within a second)."""
        await self.core.configure_queue(queue, {"paused": None})
        self.core.wake(queue)

    def resume(self, queue: str) -> None:
        run_sync(self.aresume(queue))

    async def alimit_queue(self, queue: str, rate: str | _Keep | None = KEEP,
                           concurrency: int | _Keep | None = KEEP) -> None:
        """Limits on ``queue`` as a whole, across every worker and process: at most ``rate``
        ("100/m", "10/s", "5/30s") of its jobs start in any such window, at most
        ``concurrency`` run at once. None lifts a limit; one not given stays as it is. Kept in
        the store; workers see it within a second."""
        settings: dict[str, Any] = {}
        if not isinstance(rate, _Keep):
            if rate is not None:
                parse_rate(rate, f"the rate of queue {queue!r}")
            settings["rate"] = rate
        if not isinstance(concurrency, _Keep):
            settings["concurrency"] = None if concurrency is None else positive_int(
                concurrency, f"the concurrency of queue {queue!r}")
        if not settings:
            raise ConfigError("limit_queue needs rate= or concurrency= (None lifts one)")
        await self.core.configure_queue(queue, settings)

    def limit_queue(self, queue: str, rate: str | _Keep | None = KEEP,
                    concurrency: int | _Keep | None = KEEP) -> None:
        run_sync(self.alimit_queue(queue, rate, concurrency))

    async def asize(self, queue: str | None = None) -> int:
        """Jobs of ``queue`` not yet started (waiting and delayed)."""
        counts = (await self.astats()).get(queue or self.config.default_queue)
        return counts.size if counts else 0

    def stats(self) -> dict[str, QueueCounts]:
        return run_sync(self.astats())

    def size(self, queue: str | None = None) -> int:
        return run_sync(self.asize(queue))

    async def ajobs(
        self, status: Status | str | None = None, queue: str | None = None, limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """Jobs newest first, of one status and queue if given: finished ones by when they
        finished, the others by when they were created. A list, whose ``cursor`` gives the
        next page (``qm.jobs(cursor=page.cursor)``; None after the last). Each page costs what
        it holds, however many jobs the store keeps."""
        wanted = None if status is None else parse_status(status)
        check_page(limit)
        if queue is not None:
            check_queue_name(queue)
        return await self.driver.list_jobs(status=wanted, queue=queue, limit=limit, cursor=cursor)

    def jobs(
        self, status: Status | str | None = None, queue: str | None = None, limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        return run_sync(self.ajobs(status, queue, limit, cursor))

    @property
    def workers(self) -> list[Worker]:
        """The workers this manager runs in this process."""
        return self.core.workers()

    async def aknown_workers(self) -> list[WorkerInfo]:
        """Every worker on this store, in any process on any machine (``neonnb worker``s
        too), with its host, pid, queues, running jobs and counts; ``info.state(now)`` says
        "running", "stopping" or "lost" (it stopped heartbeating)."""
        return [m for m in await self.driver.list_members() if isinstance(m, WorkerInfo)]

    def known_workers(self) -> list[WorkerInfo]:
        return run_sync(self.aknown_workers())

    async def aknown_schedulers(self) -> list[SchedulerInfo]:
        """Every running scheduler on this store, in any process on any machine, with its
        schedules (name, rule, tz, queue, job, last and next tick)."""
        return [m for m in await self.driver.list_members() if isinstance(m, SchedulerInfo)]

    def known_schedulers(self) -> list[SchedulerInfo]:
        return run_sync(self.aknown_schedulers())

    # --- pandas views (neonnb.frames; pip install 'neonnb[notebook]') -----------------------

    def queues_df(self) -> pd.DataFrame:
        """One row per queue: waiting jobs by priority, delayed, running, succeeded, failed."""
        return frames.queues_frame(self.stats())

    def jobs_df(self, status: Status | str | None = None, queue: str | None = None, limit: int = 100, *,
                results: bool = False) -> pd.DataFrame:
        """The jobs as a DataFrame; ``results=True`` adds a ``result`` column (small results
        decoded, big ones described by their shape)."""
        return frames.jobs_frame(self.jobs(status, queue, limit), results=results)

    def failed_df(self, queue: str | None = None, limit: int = 100) -> pd.DataFrame:
        return frames.failed_frame(self.jobs(Status.FAILED, queue, limit))

    def workers_df(self) -> pd.DataFrame:
        """One row per worker on this store, in any process (``known_workers()``)."""
        return frames.workers_frame(self.known_workers(), self.clock())

    def scheduler(self, poll_interval: float = 1.0) -> Scheduler:
        """A scheduler for cron and recurring jobs (see neonnb.scheduler); several, in any
        processes, may run the same schedules: each tick is dispatched once."""
        scheduler = Scheduler(self.core, poll_interval=poll_interval)
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
        (``ctx.cancelled`` turns true for sync handlers, async ones are cancelled) by its
        worker within a second. Returns the status the job had (None: no such job)."""
        return await self.core.cancel(check_job_id(job_id), queue)

    def cancel(self, job_id: str, queue: str | None = None) -> Status | None:
        return run_sync(self.acancel(job_id, queue))

    async def apurge(self, queue: str) -> int:
        """Delete every job of ``queue`` that has not started (waiting and delayed); returns
        how many. Running jobs finish; a batch or chain with a deleted job never ends."""
        return await self.driver.purge_queued(check_queue_name(queue))

    def purge(self, queue: str) -> int:
        return run_sync(self.apurge(queue))

    def handle(self, job_id: str) -> JobHandle:
        """A handle for a job id seen elsewhere (a log line, a DataFrame)."""
        return JobHandle(self.core, job_id)

    async def aclose(self) -> None:
        closed(self)
        for worker in self.core.workers():
            await worker.astop(grace=0)
        await self.core.feed.aclose()
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


def _epoch(when: dt.datetime | float) -> float:
    if isinstance(when, dt.datetime):
        return when.timestamp()
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when):
        raise ConfigError(f"dispatch_at takes a datetime or seconds since the epoch, got {when!r}")
    return float(when)


def _safe_url(connection: Any) -> str:
    return redact(connection) if isinstance(connection, str) else repr(connection)
