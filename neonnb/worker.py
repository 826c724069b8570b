"""The async worker pool: reserve -> run -> complete / retry / fail, with leases and timeouts.

One task per worker reserves as many jobs as it has free slots, runs each in its own task
(async handlers on the loop, sync handlers in a thread pool), keeps their leases alive with a
heartbeat, and records every outcome. Nothing a job does can kill the worker: every failure
becomes a retry or an entry in the failed store.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from . import _loop, capture, render, workflows
from .codec import dumps, encode
from .config import WorkerOptions, parse_duration
from .errors import (
    ClockSkew,
    JobCancelled,
    JobTimeout,
    PayloadError,
    Retry,
    SerializationError,
    UnknownJobError,
    user_traceback,
)
from .job import Context, decode_job, is_async_job, takes_no_arguments
from .records import MAX_WORKER_ID, JobRecord, Status, check_queue_name, check_text, split_selector

if TYPE_CHECKING:
    from .manager import QueueManager

logger = logging.getLogger("neonnb.worker")
ACK_DELAY = 0.001  # seconds a finished job's ack waits for others to travel with
PROGRESS_EVERY = 0.25  # seconds from a job's progress report to the store
T = TypeVar("T")


def clock_skew_error(skew: float, lease: float) -> ClockSkew | None:
    """The error for a clock ``skew`` seconds ahead of the store's (behind: negative) that
    leases of ``lease`` seconds can't bear: more than a quarter of the lease."""
    if abs(skew) <= lease / 4:
        return None
    return ClockSkew(
        f"this machine's clock is {abs(skew):.1f}s {'ahead of' if skew > 0 else 'behind'} the store's: with a "
        f"lease of {lease:g}s, jobs would be taken for dead and run twice; sync the clock (NTP), or set "
        f"lease_timeout above {4 * abs(skew):.0f}s"
    )


def claim_groups(selectors: Sequence[str]) -> list[tuple[list[str], list[int] | None]]:
    """What a worker on ``selectors`` claims, in order: groups of queues with the priority
    ranks to take from them (None: every priority). ``["emails:high", "emails:normal",
    "reports"]`` claims ranks 0 and 1 of emails, then all of reports."""
    wanted: dict[str, set[int] | None] = {}
    for selector in selectors:
        queue, band = split_selector(selector) if isinstance(selector, str) else (selector, None)
        check_queue_name(queue)
        if band is None or wanted.get(queue, set()) is None:
            wanted[queue] = None
        else:
            ranks = wanted.setdefault(queue, set())
            assert ranks is not None
            ranks.add(band.rank)
    groups: list[tuple[list[str], list[int] | None]] = []
    for queue, ranks in wanted.items():
        key = None if ranks is None else sorted(ranks)
        for names, group_ranks in groups:
            if group_ranks == key:
                names.append(queue)
                break
        else:
            groups.append(([queue], key))
    return groups


def backoff_delay(attempt: int, base: float, cap: float, jitter: bool = False) -> float:
    """Exponential backoff: ``base``, ``2*base``, ``4*base`` ... for attempts 1, 2, 3 ...,
    capped at ``cap``; with ``jitter`` a random point in the upper half of that delay."""
    # Past 2**64 the doubling no longer matters (any cap is smaller), and 2.0 ** 1024 overflows.
    delay = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))
    return random.uniform(delay / 2, delay) if jitter else delay


def retry_delay_for(
    job: Any, record: JobRecord, exc: BaseException, base: float, cap: float, jitter: bool
) -> float | None:
    """Seconds until the next attempt, or None when the job must go to the failed store.

    ``Retry(delay=...)`` asks for a retry; otherwise the job's ``should_retry(err)`` decides.
    The job's ``retry_delay(attempt, err)`` (or the spec's argument-less ``retry_delay()``)
    overrides the exponential backoff.
    """
    if record.attempts >= record.max_attempts:
        return None
    if isinstance(exc, Retry):
        if exc.delay is not None:
            return exc.delay
    elif job is not None and hasattr(job, "should_retry") and not job.should_retry(exc):
        return None
    if job is not None and hasattr(job, "retry_delay"):
        delay = job.retry_delay() if takes_no_arguments(job.retry_delay) else job.retry_delay(record.attempts, exc)
        return parse_duration(delay, f"{record.name}.retry_delay()")
    return backoff_delay(record.attempts, base, cap, jitter)


def error_info(exc: BaseException) -> dict[str, Any]:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, user_traceback(exc.__traceback__))),
    }


def encode_result(value: Any, record: JobRecord) -> str | None:
    """The stored result: JSON if the value can be, else nothing (and a log line saying so)."""
    if value is None:
        return None
    try:
        return dumps(encode(value, "result"))
    except (SerializationError, ValueError) as exc:
        logger.warning("job %s (%s) returned a value that can't be stored: %s", record.id, record.name, exc)
        return None


@dataclass
class JobEvent:
    """A lifecycle event: ``started``, ``progress``, ``succeeded``, ``retrying``, ``failed`` or
    ``cancelled``."""

    kind: str
    job_id: str
    queue: str
    name: str
    attempt: int
    progress: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    retry_in: float | None = None


class Events:
    """Subscribers receive every JobEvent, on the worker's loop; they must be quick."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[JobEvent], None]] = []

    def subscribe(self, callback: Callable[[JobEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for each event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def emit(self, kind: str, record: JobRecord, **details: Any) -> None:
        if not self._subscribers:
            return
        event = JobEvent(kind, record.id, record.queue, record.name, record.attempts, **details)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                logger.exception("event subscriber %r failed on %s", callback, kind)


class _LoopWatch:
    """Asks the worker's loop for a moment, from a thread of its own; a loop that doesn't
    answer within ``after`` seconds is blocked (an async handler doing blocking work), and
    can't heartbeat: the warning names the job and where it is stuck, long before the lease
    of every job on that loop runs out."""

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop, after: float) -> None:
        self.worker, self.loop, self.after = worker, loop, after
        self.loop_thread = threading.get_ident()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name=f"neonnb-watch-{worker.id}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.after / 2):
            answered = threading.Event()
            try:
                self.loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop closed
                return
            started = time.monotonic()
            if answered.wait(self.after) or self._stop.is_set():
                continue
            logger.warning("worker %s: its event loop has been blocked for %.1fs by %s; an async handler must not "
                           "block (await instead, or make the handler sync: it then runs in a thread). Leases can't "
                           "be extended meanwhile: after %gs other workers may run its jobs again.%s",
                           self.worker.id, time.monotonic() - started, self._culprit(),
                           self.worker.options.lease_timeout, self._where())
            while not answered.wait(1.0) and not self._stop.is_set():
                pass
            logger.warning("worker %s: its event loop answers again after %.1fs", self.worker.id,
                           time.monotonic() - started)

    def _culprit(self) -> str:
        try:
            task = asyncio.current_task(self.loop)
        except RuntimeError:
            task = None
        for running in list(self.worker._active.values()):
            if running.task is task:
                return f"job {running.record.id} ({running.record.name})"
        return "code on the loop that is not one of this worker's jobs"

    def _where(self) -> str:
        frame = sys._current_frames().get(self.loop_thread)
        return "" if frame is None else "\nWhere the loop is:\n" + "".join(traceback.format_stack(frame)[-4:])


class _Running(NamedTuple):
    """A job this worker has claimed and is running."""

    record: JobRecord
    task: asyncio.Task[None]
    ctx: Context


class Worker:
    """Runs jobs from ``queues`` with up to ``concurrency`` at a time (the spec's ``qm.Worker``).

    ``start()`` runs it on neonnb's background loop and returns at once; ``run()`` blocks;
    ``await arun()`` runs it on the current loop. ``stop(grace)`` claims nothing new, lets
    running jobs finish for ``grace`` seconds, then releases the rest back to the queue.
    """

    def __init__(self, manager: QueueManager, queues: Sequence[str], concurrency: int, options: WorkerOptions) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"worker concurrency must be an integer of at least 1, got {concurrency!r}")
        if not queues:
            raise ValueError("a worker needs at least one queue name")
        self.manager = manager
        self.driver = manager.driver
        self.queues = list(queues)  # as given: "emails", or "emails:high" for one priority band
        self._claims = claim_groups(self.queues)
        self.queue_names = [name for names, _ in self._claims for name in names]
        self.concurrency = concurrency
        self.options = options.resolve(manager.config)
        self.id = check_text(self.options.worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
                             MAX_WORKER_ID, "WorkerOptions.worker_id")
        self.jobs_started = 0
        self._started_before_run = 0  # max_jobs counts the jobs of this run: a stopped worker starts again
        self._active: dict[str, _Running] = {}
        self._cancelling: set[str] = set()  # jobs being stopped because someone cancelled them
        # Jobs whose sync handler is running in a thread, and of those the ones whose task has
        # ended (a timeout the handler ignored): their threads go on and still hold their slots.
        self._in_thread: set[str] = set()
        self._stuck: set[str] = set()
        self._releasing: set[str] = set()  # interrupted by stop(): whatever they end with, they go back
        self._dirty_progress: dict[str, tuple[JobRecord, dict[str, Any]]] = {}
        self._progress_writer: asyncio.Task[None] | None = None
        # Finished jobs waiting to be acknowledged together. Their slots are free already;
        # their leases are kept until the ack is stored.
        self._acks: list[tuple[JobRecord, str | None]] = []
        self._ack_flusher: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        # A call to the store failed since the last claim: the store may have claimed (or, on
        # Redis, handed) jobs for us whose reply was lost, and "nothing to run" is not known.
        self._store_failed = False
        self._warned_stuck = False
        self._grace = 0.0
        self._next_due = float("inf")  # earliest known run_at of a delayed job on our queues

    def __repr__(self) -> str:
        return f"<neonnb.Worker {','.join(self.queues)} x{self.concurrency} {self.state}>"

    def _repr_html_(self) -> str:
        state = render.status_badge(self.state)
        rows: list[list[Any]] = [["id", self.id], ["queues", ", ".join(self.queues)], ["state", state],
                ["running now", f"{len(self._active)} of {self.concurrency}"], ["jobs started", self.jobs_started]]
        fields = render.table(["", ""], rows, "neonnb-worker-fields")
        return render.panel("neonnb worker", fields, "neonnb-panel neonnb-worker")

    @property
    def is_running(self) -> bool:
        return self._loop is not None

    @property
    def state(self) -> str:
        """In words: "running", "stopping" (finishing what it started) or "stopped"."""
        if self._loop is None:
            return "stopped"
        return "stopping" if self._stopping else "running"

    @property
    def running_job_ids(self) -> frozenset[str]:
        """The jobs whose handlers run now (not those finished and waiting for their ack)."""
        return frozenset(self._active)

    @property
    def running_jobs(self) -> list[str]:
        return list(self._active)

    # --- starting and stopping --------------------------------------------------------

    def start(self) -> Worker:
        """Run on neonnb's background loop; returns at once."""
        if not self.is_running:
            _loop.run_sync(self._start_task())
        return self

    async def _start_task(self) -> None:
        await self._prepare()
        task = contextvars.Context().run(asyncio.get_running_loop().create_task, self._main())
        task.add_done_callback(_log_crash)

    async def _prepare(self) -> None:
        """Bind to the running loop, and refuse to run on a clock that disagrees with the
        store's by more than a quarter of the lease: leases are times by the workers' clocks,
        and a worker ahead would take live jobs of others for dead ones, and run them twice."""
        self._bind_loop()
        try:
            skew = await self.manager.aclock_skew()
        except Exception as exc:  # an unreachable store: the worker waits for it as usual
            logger.warning("worker %s: could not read the store's clock (%r)", self.id, exc)
            return
        refused = clock_skew_error(skew, self.options.lease_timeout)
        if refused is not None:
            self._unbind_loop()
            raise refused
        self.manager.clocks_checked = True
        if abs(skew) > 1.0:
            logger.warning("worker %s: this machine's clock is %.1fs %s the store's", self.id, abs(skew),
                           "ahead of" if skew > 0 else "behind")

    def run(self) -> None:
        """Run until stopped (``stop()``, ``max_jobs`` or ``burst``), blocking this thread."""
        _loop.run_sync(self.arun())

    def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, give running jobs ``grace`` seconds, release the rest; blocks until done."""
        _loop.run_sync(self.astop(grace))

    def request_stop(self, grace: float = 10.0) -> None:
        """Begin a graceful stop without waiting (safe from signal handlers and any thread)."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._begin_stop, grace)

    def run_once(self) -> int:
        """Claim up to ``concurrency`` due jobs, run them to the end, return how many ran."""
        return _loop.run_sync(self.arun_once())

    def _bind_loop(self) -> None:
        if self._loop is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        self._started_before_run = self.jobs_started
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"neonnb-job-{self.queues[0]}")

    def _unbind_loop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._loop = None

    def _begin_stop(self, grace: float) -> None:
        self._stopping = True
        self._grace = grace
        self.notify()

    async def astop(self, grace: float = 10.0) -> None:
        loop = self._loop
        if loop is None:
            return
        if loop is not asyncio.get_running_loop():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.astop(grace), loop))
            return
        self._begin_stop(grace)
        while self._loop is not None:
            await asyncio.sleep(0.01)

    def notify(self, due: float | None = None) -> None:
        """Wake the worker: a job was dispatched (due at ``due``) or it should stop.
        Safe from any thread."""
        loop = self._loop
        if loop is None:
            return
        if _running_loop() is loop:
            self._wake_for(due)
        else:
            loop.call_soon_threadsafe(self._wake_for, due)

    def _wake_for(self, due: float | None) -> None:
        if due is not None:
            self._next_due = min(self._next_due, due)
        if self._wake is not None:
            self._wake.set()

    # --- the main loop ----------------------------------------------------------------

    async def arun(self) -> None:
        """Run on the current event loop until stopped."""
        await self._prepare()
        await self._main()

    async def _main(self) -> None:
        assert self._wake is not None
        self.manager._add_worker(self)
        heartbeat = asyncio.create_task(self._heartbeat())
        watch = _LoopWatch(self, asyncio.get_running_loop(), min(1.0, self.options.lease_timeout / 6))
        # A store's hand-off gives an idle worker any job of its queues: not for priority bands.
        bands = any(ranks is not None for _, ranks in self._claims)
        waiter = None if bands else await self._guard(self.driver.waiter(self.id, self.queue_names),
                                                      "preparing to wait")
        logger.info("worker %s started on %s (concurrency %d)", self.id, ",".join(self.queues), self.concurrency)
        try:
            while not self._stopping:
                limit = self._free_slots()
                if limit == 0 and not self._active and not self._stuck:
                    break  # max_jobs reached and the last job finished
                # Clear before claiming: a wake-up that lands while the claim is in flight
                # must end the wait below, not be lost.
                self._wake.clear()
                claimed = await self._claim(limit) if limit else 0
                if claimed:
                    continue
                if self.options.burst and not self._active and not self._store_failed:
                    break  # the store said there is nothing to run (not: it could not be asked)
                until_due = self._next_due - self.manager.clock()
                if until_due <= 0:
                    self._next_due = float("inf")
                    continue
                timeout = min(self.options.poll_interval, until_due)
                if waiter is not None and limit:
                    # The store may hand us a job as it is dispatched, claimed for us already.
                    now = self.manager.clock()
                    await self._guard(waiter.wait(now, self.options.lease_timeout, timeout, self._wake, self._start),
                                      "waiting for jobs")
                else:
                    # A timer that sets the event, not wait_for, which wraps the wait in a new
                    # task each time: a busy worker passes here after every job it finishes.
                    timer = asyncio.get_running_loop().call_later(timeout, self._wake.set)
                    try:
                        await self._wake.wait()
                    finally:
                        timer.cancel()
            await self._drain()
        finally:
            if waiter is not None:
                await waiter.close()
            watch.stop()
            heartbeat.cancel()
            if self._progress_writer is not None:
                self._progress_writer.cancel()
            self.manager._remove_worker(self)
            self._unbind_loop()
            logger.info("worker %s stopped after %d jobs", self.id, self.jobs_started)

    async def arun_once(self) -> int:
        """The async twin of ``run_once``."""
        if self._loop is None:
            self._bind_loop()
            try:
                return await self.arun_once()
            finally:
                self._unbind_loop()
        claimed = await self._claim(self._free_slots())
        await asyncio.gather(*(running.task for running in list(self._active.values())))
        await self._acks_stored()
        return claimed

    def _free_slots(self) -> int:
        stuck = len(self._stuck)
        free = self.concurrency - len(self._active) - stuck
        if stuck and free <= 0 and not self._warned_stuck:
            self._warned_stuck = True
            logger.warning("worker %s: all %d slot(s) are held, %d by timed-out sync job(s) whose threads still run "
                           "(they ignore ctx.cancelled); claiming nothing until they return", self.id,
                           self.concurrency, stuck)
        elif not stuck:
            self._warned_stuck = False
        if self.options.max_jobs:
            free = min(free, self.options.max_jobs - (self.jobs_started - self._started_before_run))
        return max(free, 0)

    async def _claim(self, limit: int) -> int:
        """Claim up to ``limit`` jobs and start them; returns how many. A store that answers
        small claims sooner (Redis) gets several, sent together: the first jobs start while
        the store still claims the rest."""
        now = self.manager.clock()
        await self._guard(self.manager.housekeeping(now), "housekeeping")
        if self._store_failed and not await self._give_back_unheld(now):
            return 0
        self._store_failed = False
        piece = self.driver.claim_piece or limit
        if limit <= piece:
            return await self._claim_piece(limit, now)
        pieces = [min(piece, limit - taken) for taken in range(0, limit, piece)]
        return sum(await asyncio.gather(*(self._claim_piece(n, now) for n in pieces)))

    async def _give_back_unheld(self, now: float) -> bool:
        """After a failed call: the store may have claimed jobs for us whose reply was lost.
        They go back uncharged, before they could sit out their lease and be charged an
        attempt that never ran. False while the store is still unreachable."""
        held = [*self._active, *(record.id for record, _ in self._acks)]
        released = await self._guard(self.driver.release_unheld(self.queue_names, self.id, held, now),
                                     "giving back what a lost claim took")
        if released:
            logger.warning("worker %s: gave back %d job(s) a claim took for it whose reply was lost", self.id,
                           released)
        return released is not None

    async def _claim_piece(self, limit: int, now: float) -> int:
        claimed = 0
        for queues, ranks in self._claims:
            if claimed >= limit:
                break
            lease = now + self.options.lease_timeout
            records = await self._guard(self.driver.reserve(queues, limit - claimed, self.id, now, lease, ranks),
                                        "claiming jobs")
            if records is None:
                break
            self._start(records)
            claimed += len(records)
        return claimed

    def _start(self, records: Sequence[JobRecord]) -> None:
        """Run jobs claimed for this worker, each in its own task."""
        for record in records:
            self.jobs_started += 1
            ctx = Context(record, self.manager.dependencies, self._report_progress)
            # A fresh contextvars.Context: the job must not inherit (and print into) the cell
            # or task that happened to start the worker.
            task = contextvars.Context().run(asyncio.get_running_loop().create_task, self._execute(record, ctx))
            self._active[record.id] = _Running(record, task, ctx)
            task.add_done_callback(functools.partial(self._finished, record.id))

    def _finished(self, job_id: str, _task: object) -> None:
        self._active.pop(job_id, None)
        if self._wake is not None:
            self._wake.set()

    async def _guard(self, coro: Coroutine[Any, Any, T], doing: str) -> T | None:
        """Run a driver call; if storage is unreachable, log and carry on: the next poll
        retries, or sooner a wake-up (the store's own, when it is back)."""
        try:
            return await coro
        except Exception as exc:
            self._store_failed = True
            pause = self.options.poll_interval
            logger.warning("worker %s: %s failed (%r); retrying within %.1fs", self.id, doing, exc, pause)
            if self._wake is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
            return None

    async def _heartbeat(self) -> None:
        interval = self.options.lease_timeout / 3
        while True:
            await asyncio.sleep(interval)
            held = [*(running.record for running in self._active.values()), *(record for record, _ in self._acks)]
            if held:
                now = self.manager.clock()
                stopping = await self._guard(
                    self.driver.extend_leases(held, self.id, now + self.options.lease_timeout), "extending leases"
                )
                for job_id in stopping or ():
                    self._stop_job(job_id)

    def _stop_job(self, job_id: str) -> None:
        """Someone cancelled a job we run: a sync handler sees ``ctx.cancelled``, an async one
        is cancelled; either way it ends CANCELLED (see _execute)."""
        running = self._active.get(job_id)
        if running is not None and job_id not in self._cancelling:
            self._cancelling.add(job_id)
            running.ctx.cancel()
            running.task.cancel()

    async def _drain(self) -> None:
        try:
            await self._drain_active()
        finally:
            await self._acks_stored()

    async def _drain_active(self) -> None:
        if not self._active:
            return
        tasks = {running.task: running for running in self._active.values()}
        _, unfinished = await asyncio.wait(tasks, timeout=self._grace)
        if not unfinished:
            return
        for task in unfinished:
            tasks[task].ctx.cancel()
            self._releasing.add(tasks[task].record.id)
        # A sync handler's thread can't be stopped: releasing its job while the thread runs
        # would let another worker run it at the same time. Those are released once it returns.
        in_thread = {task for task in unfinished if tasks[task].record.id in self._in_thread}
        if in_thread:
            logger.warning("worker %s: waiting for %d sync job(s) still running past the grace period (they "
                           "ignore ctx.cancelled); a second SIGTERM or Ctrl-C stops the process without them",
                           self.id, len(in_thread))
        cancelled = unfinished - in_thread
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        jobs = [tasks[task].record for task in unfinished]
        released = await self._persist(lambda: self.driver.release(jobs, self.id, self.manager.clock()), "release")
        self._releasing.clear()
        logger.info("worker %s released %s unfinished job(s) back to the queue", self.id, released)

    # --- running one job --------------------------------------------------------------

    def _report_progress(self, record: JobRecord, progress: dict[str, Any]) -> None:
        """What ``ctx.progress`` calls, from the loop or from a sync handler's thread."""
        loop = self._loop
        if loop is None:
            return
        if _running_loop() is loop:
            self._note_progress(record, progress)
        else:
            loop.call_soon_threadsafe(self._note_progress, record, progress)

    def _note_progress(self, record: JobRecord, progress: dict[str, Any]) -> None:
        self._dirty_progress[record.id] = (record, progress)
        self.manager.events.emit("progress", record, progress=progress)
        if self._progress_writer is None or self._progress_writer.done():
            # In a context of its own, not the reporting job's (whose output it would capture).
            loop = asyncio.get_running_loop()
            self._progress_writer = contextvars.Context().run(loop.create_task, self._write_progress())

    async def _write_progress(self) -> None:
        """Store the latest progress of each job that reported some, PROGRESS_EVERY after the
        first report: seen everywhere within that, and however often a job reports, a few
        writes a second (the last value is stored before the job's outcome)."""
        while self._dirty_progress:
            await asyncio.sleep(PROGRESS_EVERY)
            await self._flush_progress()

    async def _flush_progress(self, only: str | None = None) -> None:
        ids = [only] if only is not None else list(self._dirty_progress)
        for job_id in ids:
            dirty = self._dirty_progress.pop(job_id, None)
            if dirty is not None:
                record, progress = dirty
                await self._guard(self.driver.set_progress(record, self.id, progress), "saving progress")

    async def _execute(self, record: JobRecord, ctx: Context) -> None:
        events = self.manager.events
        events.emit("started", record)
        job: Any = None
        output = capture.Output()
        try:
            job = decode_job(record)
            try:
                with capture.capturing(output):  # this task runs in a context of its own (see _start)
                    value = await self._call(job, ctx, record.timeout or self.options.timeout, output)
            finally:
                if output:
                    await self._guard(self.driver.save_output(record, self.id, output.text()), "saving output")
        except asyncio.CancelledError:
            if record.id not in self._cancelling:
                raise  # stop(): _drain releases the job
            self._cancelling.discard(record.id)
            _uncancel()
            await self._fail(record, JobCancelled("cancelled while running"), Status.CANCELLED)
        except (UnknownJobError, PayloadError) as exc:
            # Retrying can't help until someone imports or fixes something.
            await self._fail(record, exc)
        except Exception as exc:
            await self._after_error(record, job, exc)
        except GeneratorExit:  # the task itself is being closed (its loop is going): nothing to record
            raise
        except BaseException as exc:
            # sys.exit(), KeyboardInterrupt and the like, raised by the handler: they end the
            # job, never retried, and never the worker (escaping the task they would stop the loop).
            await self._fail(record, exc)
        else:
            if record.id in self._dirty_progress:
                await self._flush_progress(record.id)
            result = encode_result(value, record)
            if record.flow is not None and not await self._advance_flow(record, result, succeeded=True):
                return  # no ack: the lease runs out and the job runs again, its flow intact
            self._acknowledge(record, result)

    async def _advance_flow(self, record: JobRecord, result: str | None, succeeded: bool) -> bool:
        """Before a chain step's or batch job's final outcome is stored, store what comes next:
        the chain's next step, the batch's callback (each once, whoever tries). False when
        the store stayed unreachable."""
        async def advance() -> bool:
            step = workflows.next_step(record, result, self.manager.clock()) if succeeded else None
            if step is not None and await self.driver.enqueue_once(step):
                self.manager._wake_workers(step.queue)
            await workflows.member_finished(self.manager, record, result)
            return True

        return await self._persist(advance, "continue the workflow of") is not None

    def _acknowledge(self, record: JobRecord, result: str | None) -> None:
        """Queue the job's success. Acks within ACK_DELAY of each other, or arriving while a
        write is in flight, go together in one write: a busy worker acknowledges in batches."""
        self._acks.append((record, result))
        if self._ack_flusher is None or self._ack_flusher.done():
            self._ack_flusher = asyncio.create_task(self._flush_acks())

    async def _acks_stored(self) -> None:
        if self._ack_flusher is not None:
            await self._ack_flusher

    async def _flush_acks(self) -> None:
        # A millisecond's wait: the claim for the slots these jobs freed goes to the store
        # ahead of their acks (Redis runs commands in order, and the next jobs wait on the
        # claim, nobody on the ack), and jobs ending meanwhile are acknowledged in this write.
        await asyncio.sleep(ACK_DELAY)
        while self._acks:
            batch = self._acks[:]
            write = functools.partial(self.driver.complete, batch, self.id, self.manager.clock())
            done = set(await self._persist(write, "complete") or ())
            del self._acks[: len(batch)]  # only now: the heartbeat keeps pending leases alive
            for record, _ in batch:
                if record.id in done:
                    self.manager.events.emit("succeeded", record)
                else:
                    logger.warning("job %s finished, but its lease had passed to another worker", record.id)

    async def _call(self, job: Any, ctx: Context, timeout: float | None, output: capture.Output) -> Any:
        """Run the handler in this task; past ``timeout`` the task is cancelled (a timer, not
        ``wait_for``, which would cost a second task per job). The timeout counts from when
        the handler starts."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        timed_out = False
        in_thread = not is_async_job(job)
        thread_started: list[float] = []  # when a sync handler's thread began to run it
        timer: asyncio.TimerHandle | None = None

        def expire() -> None:
            nonlocal timed_out, timer
            if in_thread:
                left = thread_started[0] + limit - time.monotonic() if thread_started else limit
                if left > 0:  # it waited for a thread: its time counts from the start
                    timer = loop.call_later(left, expire)
                    return
            timed_out = True
            ctx.cancel()  # a sync handler's thread can't be killed: ask it to stop
            task.cancel()

        limit = timeout or 0.0
        if limit:
            timer = loop.call_later(limit, expire)
        try:
            if not in_thread:
                return await job.handle(ctx)
            try:
                return await self._in_a_thread(ctx, capture.calling(output, job.handle), thread_started)
            finally:
                if ctx.job_id in self._releasing:
                    # stop() interrupted it and waited for its thread: however it ended, it goes
                    # back to the queue like a cancelled async job.
                    raise asyncio.CancelledError
        except asyncio.CancelledError:
            if not timed_out:
                raise
            _uncancel()
            raise JobTimeout(f"job ran longer than its timeout of {timeout:g}s") from None
        finally:
            if timer is not None:
                timer.cancel()

    async def _in_a_thread(self, ctx: Context, handle: Callable[[Context], Any], started: list[float]) -> Any:
        """Run a sync handler on the worker's threads; the job holds its slot until its thread
        returns, even when its task ended first (a timeout the handler ignored)."""
        assert self._executor is not None and self._loop is not None
        loop, job_id = self._loop, ctx.job_id

        def run() -> Any:
            started.append(time.monotonic())
            return contextvars.Context().run(handle, ctx)

        def returned(_future: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing is left to wake
                loop.call_soon_threadsafe(self._thread_returned, job_id)

        self._in_thread.add(job_id)
        future = self._executor.submit(run)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if future.done():
                self._in_thread.discard(job_id)
            else:  # its task ends first (a timeout, a stop): the thread frees the slot when it returns
                self._stuck.add(job_id)
                future.add_done_callback(returned)

    def _thread_returned(self, job_id: str) -> None:
        self._in_thread.discard(job_id)
        self._stuck.discard(job_id)
        if self._wake is not None:
            self._wake.set()

    async def _after_error(self, record: JobRecord, job: Any, exc: Exception) -> None:
        config = self.manager.config
        info = error_info(exc)
        try:
            delay = retry_delay_for(job, record, exc, config.retry_delay, config.backoff_cap, config.backoff_jitter)
        except Exception as hook_error:
            # The job's own error stays the one recorded: it is what the user must fix first.
            logger.exception("job %s: its should_retry/retry_delay raised; failing the job", record.id)
            hook = error_info(hook_error)
            info["message"] += f" (then deciding whether to retry raised {hook['type']}: {hook['message']})"
            info["traceback"] += "\nWhile deciding whether to retry:\n\n" + hook["traceback"]
            delay = None
        if delay is None:
            await self._fail(record, exc, info=info)
            return
        await self._flush_progress(record.id)
        run_at = self.manager.clock() + delay
        if await self._persist(lambda: self.driver.retry(record, self.id, run_at, info), "retry"):
            self._next_due = min(self._next_due, run_at)
            logger.info("job %s (%s) attempt %d failed (%s); retrying in %.1fs",
                        record.id, record.name, record.attempts, info["type"], delay)
            self.manager.events.emit("retrying", record, error=info, retry_in=delay)

    async def _fail(self, record: JobRecord, exc: BaseException, status: Status = Status.FAILED,
                    info: dict[str, Any] | None = None) -> None:
        await self._flush_progress(record.id)
        if record.flow is not None:
            await self._advance_flow(record, None, succeeded=False)
        info = info or error_info(exc)
        now = self.manager.clock()
        if await self._persist(lambda: self.driver.fail(record, self.id, now, info, status), status.value):
            logger.warning("job %s (%s) %s after %d attempt(s): %s: %s", record.id, record.name, status.value,
                           record.attempts, info["type"], info["message"])
            self.manager.events.emit(status.value, record, error=info)

    async def _persist(self, write: Callable[[], Awaitable[T]], what: str) -> T | None:
        """Record an outcome, retrying while storage is unreachable. If it never comes back
        the job's lease runs out and another worker runs it again: at-least-once holds."""
        delay = 0.1
        for _ in range(8):
            try:
                return await write()
            except Exception as exc:
                logger.warning("worker %s: could not %s a job (%r); retrying in %.1fs", self.id, what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None


def _uncancel() -> None:
    """After handling our own cancellation of the current task, so its later awaits run."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
        task.uncancel()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _log_crash(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("worker crashed", exc_info=future.exception())

