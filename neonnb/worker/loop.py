"""The worker's loop: its lifecycle (start, run, stop, drain), claiming jobs for its free
slots (or taking those a store hands it), waiting for work, and the watch on its event loop.
Running one job is neonnb.worker.execute; what is stored about it, neonnb.worker.outcomes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import math
import os
import socket
import sys
import sysconfig
import threading
import time
import traceback
import uuid
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from .. import _loop, render
from ..config import WorkerOptions
from ..core import Core, clock_skew_error
from ..drivers.base import HandOff, PipelinedClaims
from ..job import Context
from ..records import MAX_WORKER_ID, JobRecord, WorkerInfo, check_queue_name, check_text, split_selector
from .execute import JobRunner, Running
from .outcomes import Outcomes

logger = logging.getLogger("neonnb.worker")
T = TypeVar("T")
CANCEL_POLL = 0.5  # seconds between a busy worker's looks for jobs someone cancelled


def claim_groups(selectors: Iterable[str]) -> list[tuple[list[str], list[int] | None]]:
    """What a worker on ``selectors`` claims, in order: each queue with the priority ranks to
    take from it (None: every priority). ``["emails:high", "emails:normal", "reports"]``
    claims ranks 0 and 1 of emails, then all of reports. Each queue is claimed on its own, in
    the order given: a worker takes the jobs of its first queue before any of the next."""
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
    return [([queue], None if ranks is None else sorted(ranks)) for queue, ranks in wanted.items()]


def _weights(weights: Mapping[str, float], groups: list[tuple[list[str], list[int] | None]]) -> dict[str, float]:
    for selector, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < float("inf"):
            raise ValueError(f"worker queue weights must be numbers above 0, got {weight!r} for {selector!r}")
    by_queue: dict[str, float] = {}
    for selector, weight in weights.items():
        queue = split_selector(selector)[0]
        by_queue[queue] = by_queue.get(queue, 0.0) + float(weight)
    return {queues[0]: by_queue[queues[0]] for queues, _ in groups}


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
            stack = self._stack()
            advice = ("an async handler must not block (await instead, or make the handler sync: it then runs in "
                      "a thread)" if _in_user_code(stack) else
                      "the blocking call is neonnb's or a library's, not the handler's own code: please report it")
            logger.warning("worker %s: its event loop has been blocked for %.1fs by %s; %s. Leases can't be "
                           "extended meanwhile: after %gs other workers may run its jobs again.%s",
                           self.worker.id, time.monotonic() - started, self._culprit(), advice,
                           self.worker.options.lease_timeout,
                           "" if not stack else "\nWhere the loop is:\n" + "".join(stack.format()[-4:]))
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

    def _stack(self) -> traceback.StackSummary | None:
        frame = sys._current_frames().get(self.loop_thread)
        return None if frame is None else traceback.extract_stack(frame)


_LIBRARY_PATHS = tuple({sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
                       | {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})


def _in_user_code(stack: traceback.StackSummary | None) -> bool:
    """Whether the loop is blocked inside code of the user's (a handler's module), rather than
    in neonnb, the standard library or an installed package that neonnb called."""
    return stack is None or any(not os.path.abspath(entry.filename).startswith(_LIBRARY_PATHS)
                                and not entry.filename.startswith("<") for entry in stack)


class Worker:
    """Runs jobs from ``queues`` with up to ``concurrency`` at a time (the spec's ``qm.Worker``).

    ``start()`` runs it on neonnb's background loop and returns at once; ``run()`` blocks;
    ``await arun()`` runs it on the current loop. ``stop(grace)`` claims nothing new, lets
    running jobs finish for ``grace`` seconds, then releases the rest back to the queue.
    """

    def __init__(self, core: Core, queues: Sequence[str] | Mapping[str, float], concurrency: int,
                 options: WorkerOptions) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"worker concurrency must be an integer of at least 1, got {concurrency!r}")
        if not queues:
            raise ValueError("a worker needs at least one queue name")
        self.core = core
        self.driver = core.driver
        self.queues = list(queues)  # as given: "emails", or "emails:high" for one priority band
        self._claims = claim_groups(self.queues)
        # {queue: weight}: slots shared by weight; else the queues in strict order of preference.
        self._weights = _weights(queues, self._claims) if isinstance(queues, Mapping) else None
        self.queue_names = [name for names, _ in self._claims for name in names]
        self.concurrency = concurrency
        self._roster_changed = asyncio.Event()  # a job started or ended: the store's entry follows soon
        self.options = options.resolve(core.config)
        self.id = check_text(self.options.worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
                             MAX_WORKER_ID, "WorkerOptions.worker_id")
        self.jobs_started = 0
        self._started_before_run = 0  # max_jobs counts the jobs of this run: a stopped worker starts again
        self._active: dict[str, Running] = {}
        self.outcomes = Outcomes(core, self.id, self.options, self._guard)
        self._piece_size = self.driver.claim_piece if isinstance(self.driver, PipelinedClaims) else None
        self._host = socket.gethostname()
        self.runner = JobRunner(core.hooks, self.outcomes, self._slot_freed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        # A call to the store failed since the last claim: the store may have claimed (or, on
        # Redis, handed) jobs for us whose reply was lost, and "nothing to run" is not known.
        self._store_failed = False
        self._warned_stuck = False
        self._grace = 0.0
        self._next_due = float("inf")  # earliest known run_at of a delayed job on our queues
        self._started_at = 0.0

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
            skew = await self.core.clock_skew()
        except Exception as exc:  # an unreachable store: the worker waits for it as usual
            logger.warning("worker %s: could not read the store's clock (%r)", self.id, exc)
            return
        refused = clock_skew_error(skew, self.options.lease_timeout)
        if refused is not None:
            self._unbind_loop()
            raise refused
        self.core.clocks_checked = True
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
        self.runner.open(self.concurrency, f"neonnb-job-{self.queues[0]}")

    def _unbind_loop(self) -> None:
        self.runner.close()
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
        if _loop.running_loop() is loop:
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
        self.core.add_worker(self)
        self._started_at = self.core.clock()
        # Beats as the leases' heartbeat does (a third of the lease). A failed beat says nothing
        # about the claims (unlike _guard's failures): it is only logged.
        announce = asyncio.create_task(self.core.announce(self.info, self.options.lease_timeout / 3,
                                                          self._roster_changed))
        await self.core.feed.look_for_listeners()
        listeners = asyncio.create_task(self.core.feed.follow_listeners())
        heartbeat = asyncio.create_task(self.outcomes.heartbeat(self._running_records, self._stop_job))
        cancels = asyncio.create_task(self._watch_cancels())
        watch = _LoopWatch(self, asyncio.get_running_loop(), min(1.0, self.options.lease_timeout / 6))
        # A store's hand-off gives an idle worker any job of its queues: not for priority bands.
        bands = any(ranks is not None for _, ranks in self._claims)
        driver = self.driver
        waiter = (await self._guard(driver.waiter(self.id, self.queue_names), "preparing to wait")
                  if isinstance(driver, HandOff) and not bands else None)
        logger.info("worker %s started on %s (concurrency %d)", self.id, ",".join(self.queues), self.concurrency)
        try:
            while not self._stopping:
                limit = self._free_slots()
                if limit == 0 and not self._active and not self.runner.stuck:
                    break  # max_jobs reached and the last job finished
                # Clear before claiming: a wake-up that lands while the claim is in flight
                # must end the wait below, not be lost.
                self._wake.clear()
                claimed = await self._claim(limit) if limit else 0
                if claimed:
                    # The jobs just started run to their first await before anything else (a
                    # SQLite claim made on this thread would not yield to them).
                    await asyncio.sleep(0)
                    if claimed == limit:
                        continue  # there may be more: claim again at once
                    # Fewer than asked: nothing else was due. A wake-up (a dispatch, a freed
                    # slot) that came during the claim ends the wait below at once.
                if self.options.burst and not self._active and not self._store_failed:
                    break  # the store said there is nothing to run (not: it could not be asked)
                until_due = self._next_due - self.core.clock()
                if until_due <= 0:
                    self._next_due = float("inf")
                    continue
                timeout = min(self.options.poll_interval, until_due)
                if waiter is not None and limit:
                    # The store may hand us a job as it is dispatched, claimed for us already.
                    now = self.core.clock()
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
            cancels.cancel()
            announce.cancel()
            listeners.cancel()
            await self.core.feed.flush()
            await self.core.withdraw(self.id)
            self.outcomes.stop()
            self.core.remove_worker(self)
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
        await self.outcomes.acks_stored()
        return claimed

    def _free_slots(self) -> int:
        stuck = len(self.runner.stuck)
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
        now = self.core.clock()
        await self._guard(self.core.housekeeping(now), "housekeeping")
        if self._store_failed and not await self._give_back_unheld(now):
            return 0
        self._store_failed = False
        settings = await self._guard(self.core.queue_settings(), "reading the queues' settings")
        if settings is None:
            return 0
        paused = {queue for queue, setting in settings.items() if setting.get("paused")}
        piece = self._piece_size or limit
        if limit <= piece:
            return await self._claim_piece(limit, now, paused)
        pieces = [min(piece, limit - taken) for taken in range(0, limit, piece)]
        return sum(await asyncio.gather(*(self._claim_piece(n, now, paused) for n in pieces)))

    async def _give_back_unheld(self, now: float) -> bool:
        """After a failed call: the store may have claimed jobs for us whose reply was lost.
        They go back uncharged, before they could sit out their lease and be charged an
        attempt that never ran. And the jobs we hold may have gone back to the queue (a claim
        lost in a crash): taken back first, before any claim could run them a second time.
        False while the store is still unreachable."""
        records = [*self._running_records(), *self.outcomes.unacknowledged()]
        if records and await self.outcomes.take_back(records, now + self.options.lease_timeout) is None:
            return False
        held = [record.id for record in records]
        released = await self._guard(self.driver.release_unheld(self.queue_names, self.id, held, now),
                                     "giving back what a lost claim took")
        if released:
            logger.warning("worker %s: gave back %d job(s) a claim took for it whose reply was lost", self.id,
                           released)
        return released is not None

    async def _claim_piece(self, limit: int, now: float, paused: set[str]) -> int:
        claimed = 0
        for queues, ranks, cap in self._claim_plan(limit, paused):
            if claimed >= limit:
                break
            wanted = min(cap, limit - claimed)
            if wanted <= 0:
                continue
            lease = now + self.options.lease_timeout
            records = await self._guard(self.driver.reserve(queues, wanted, self.id, now, lease, ranks),
                                        "claiming jobs")
            if records is None:
                break
            self._start(records)
            claimed += len(records)
        return claimed

    def _claim_plan(self, limit: int, paused: set[str]) -> list[tuple[list[str], list[int] | None, int]]:
        """The claims to make, in order, each with the most it may take; none of a paused
        queue. In strict order each queue may take every free slot; by weight, first each
        queue up to its share of the slots (less what it runs now), then whatever is left,
        heaviest first: no slot idles while any queue has a job."""
        claims = [(queues, ranks) for queues, ranks in self._claims if queues[0] not in paused]
        if self._weights is None:
            return [(queues, ranks, limit) for queues, ranks in claims]
        weights = self._weights
        running = collections.Counter(running.record.queue for running in self._active.values())
        total = sum(weights.values())
        shares = [(queues, ranks, math.ceil(self.concurrency * weights[queues[0]] / total) - running[queues[0]])
                  for queues, ranks in claims]
        rest = sorted(claims, key=lambda group: -weights[group[0][0]])
        return [*shares, *((queues, ranks, limit) for queues, ranks in rest)]

    def _start(self, records: Sequence[JobRecord]) -> None:
        """Run jobs claimed for this worker, each in its own task."""
        for record in records:
            self.jobs_started += 1
            ctx = Context(record, self.core.dependencies, self._report_progress)
            # A fresh contextvars.Context: the job must not inherit (and print into) the cell
            # or task that happened to start the worker.
            task = contextvars.Context().run(asyncio.get_running_loop().create_task,
                                             self.runner.run(record, ctx, self.options.timeout))
            self._active[record.id] = Running(record, task, ctx)
            task.add_done_callback(functools.partial(self._finished, record.id))
        self._roster_changed.set()

    def _finished(self, job_id: str, _task: object) -> None:
        self._active.pop(job_id, None)
        self._roster_changed.set()
        self._slot_freed()

    async def _guard(self, coro: Coroutine[Any, Any, T], doing: str) -> T | None:
        """Run a driver call; if storage is unreachable, log and carry on: the next poll
        retries, or sooner a wake-up (the store's own, when it is back)."""
        try:
            return await coro
        except Exception as exc:
            self._store_failed = True
            self.core.store_unreachable()
            pause = self.options.poll_interval
            logger.warning("worker %s: %s failed (%r); retrying within %.1fs", self.id, doing, exc, pause)
            if self._wake is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
            return None

    async def _watch_cancels(self) -> None:
        """A cancel reaches a running job within CANCEL_POLL seconds, not at the next
        heartbeat (a third of the lease): one small read while the worker runs jobs."""
        while True:
            await asyncio.sleep(CANCEL_POLL)
            records = self._running_records()
            if records:
                for job_id in await self._guard(self.driver.stopping(records, self.id), "looking for cancels") or ():
                    self._stop_job(job_id)

    def _stop_job(self, job_id: str) -> None:
        """Someone cancelled a job we run: a sync handler sees ``ctx.cancelled``, an async one
        is cancelled; either way it ends CANCELLED (JobRunner.run)."""
        running = self._active.get(job_id)
        if running is not None:
            self.runner.cancel(running)

    async def _drain(self) -> None:
        try:
            await self._drain_active()
        finally:
            await self.outcomes.acks_stored()

    async def _drain_active(self) -> None:
        if not self._active:
            return
        tasks = {running.task: running for running in self._active.values()}
        _, unfinished = await asyncio.wait(tasks, timeout=self._grace)
        if not unfinished:
            return
        for task in unfinished:
            tasks[task].ctx.cancel()
            self.runner.releasing.add(tasks[task].record.id)
        # A sync handler's thread can't be stopped: releasing its job while the thread runs
        # would let another worker run it at the same time. Its lease is kept until it returns:
        # then it is recorded as it ended if it returned, released if it raised.
        in_thread = {task for task in unfinished if self.runner.in_thread(tasks[task].record.id)}
        if in_thread:
            logger.warning("worker %s: waiting for %d sync job(s) still running past the grace period (they "
                           "ignore ctx.cancelled); a second SIGTERM or Ctrl-C stops the process without them",
                           self.id, len(in_thread))
        cancelled = unfinished - in_thread
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        # Those whose thread returned meanwhile are recorded as they ended; the rest go back.
        jobs = [tasks[task].record for task in unfinished if task.cancelled()]
        released = await self.outcomes.persist(lambda: self.driver.release(jobs, self.id, self.core.clock()),
                                               "release")
        self.runner.releasing.clear()
        logger.info("worker %s released %s unfinished job(s) back to the queue", self.id, released)

    # --- what the running jobs need of the loop --------------------------------------------

    def _report_progress(self, record: JobRecord, progress: dict[str, Any]) -> None:
        """What ``ctx.progress`` calls, from the loop or from a sync handler's thread."""
        loop = self._loop
        if loop is None:
            return
        if _loop.running_loop() is loop:
            self.outcomes.note_progress(record, progress)
        else:
            loop.call_soon_threadsafe(self.outcomes.note_progress, record, progress)

    def info(self) -> WorkerInfo:
        """What the store knows of this worker (``qm.known_workers()``), as of now."""
        return WorkerInfo(
            id=self.id, host=self._host, pid=os.getpid(), queues=list(self.queues),
            concurrency=self.concurrency, started_at=self._started_at, last_seen=self.core.clock(),
            beat=self.options.lease_timeout / 3, running=list(self._active), jobs_done=self.outcomes.jobs_done,
            jobs_failed=self.outcomes.jobs_failed, stopping=self._stopping,
        )

    def _running_records(self) -> list[JobRecord]:
        return [running.record for running in self._active.values()]

    def _slot_freed(self) -> None:
        if self._wake is not None:
            self._wake.set()



def _log_crash(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("worker crashed", exc_info=future.exception())

