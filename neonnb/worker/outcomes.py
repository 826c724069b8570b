"""What a worker stores about the jobs it runs: leases (the heartbeat), progress, and each
attempt's outcome (acknowledged in batches, retried with backoff, or failed), with the
hooks settled before an outcome is stored and told after.

Every write is retried while the store is unreachable (``persist``); if it never comes
back, the job's lease runs out and another worker runs it again: at-least-once holds.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from ..artifacts import ARTIFACT_BYTES
from ..codec import dumps, encode
from ..config import WorkerSettings, parse_duration, printable
from ..core import Core
from ..errors import ResultError, Retry, SerializationError, StoreError, StoreUnavailable, error_info
from ..hooks import Outcome
from ..job import takes_no_arguments
from ..records import JobRecord, Status

logger = logging.getLogger("neonnb.worker")
ACK_DELAY = 0.001  # seconds a finished job's ack waits for others to travel with
PROGRESS_EVERY = 0.25  # seconds from a job's progress report to the store
T = TypeVar("T")


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


UNDEFINED_WAIT = 5.0  # seconds a job of a type not defined yet waits before a worker looks again
UNDEFINED_GRACE = 600.0  # after its dispatch, how long it may wait for its definition


def encode_result(value: Any) -> str | None:
    """The stored result; ResultError saying what was returned and what would work if it
    can't be stored (the job then fails: a result is never silently dropped)."""
    if value is None:
        return None
    try:
        return dumps(encode(value, "the result"))
    except (SerializationError, ValueError) as exc:
        raise ResultError(f"the job returned a value that can't be stored: {exc}") from None


class Outcomes:
    """One worker's writes about its jobs. ``guard`` runs a driver call the worker can live
    without for now (progress, output, leases), logging a failure."""

    def __init__(self, core: Core, worker_id: str, options: WorkerSettings,
                 guard: Callable[[Coroutine[Any, Any, Any], str], Awaitable[Any]]) -> None:
        self.core, self.driver, self.worker_id, self.options = core, core.driver, worker_id, options
        self.guard = guard
        self._dirty_progress: dict[str, tuple[JobRecord, dict[str, Any]]] = {}
        self._progress_writer: asyncio.Task[None] | None = None
        # Finished jobs waiting to be acknowledged together. Their slots are free already;
        # their leases are kept until the ack is stored.
        self._acks: list[tuple[JobRecord, Outcome]] = []
        self._ack_flusher: asyncio.Task[None] | None = None
        self.jobs_done = 0  # acknowledged successes
        self.jobs_failed = 0  # jobs this worker moved to the failed store
        self._undefined_said: set[str] = set()  # job types said to be undefined (Outcomes.undefined)

    # --- leases -------------------------------------------------------------------------

    def unacknowledged(self) -> list[JobRecord]:
        """Jobs that finished and wait for their ack: still this worker's, their leases kept."""
        return [record for record, _ in self._acks]

    async def heartbeat(self, running: Callable[[], Iterable[JobRecord]], stop_job: Callable[[str], None]) -> None:
        """Keep the leases of the jobs ``running()`` and those waiting for their ack alive;
        jobs someone cancelled go to ``stop_job``."""
        interval = self.options.lease_timeout / 3
        failures_seen = self.core.store_failures
        while True:
            await asyncio.sleep(interval)
            held = [*running(), *self.unacknowledged()]
            if held:
                failures = self.core.store_failures
                lease = self.core.clock() + self.options.lease_timeout
                stopping = await self.guard(self.driver.extend_leases(held, self.worker_id, lease), "extending leases")
                for job_id in stopping or ():
                    stop_job(job_id)
                # The store was away: some of these may have gone back to the queue meanwhile.
                if (stopping is not None and failures != failures_seen
                        and await self.take_back(held, lease) is not None):
                    failures_seen = failures

    async def take_back(self, held: list[JobRecord], lease: float) -> list[str] | None:
        taken: list[str] | None = await self.guard(self.driver.reacquire(held, self.worker_id, lease),
                                                   "taking back leases")
        if taken:
            logger.warning("worker %s: took back %d job(s) that went back to the queue while the store was away "
                           "and nobody else claimed: they are not run twice", self.worker_id, len(taken))
        return taken

    # --- progress -----------------------------------------------------------------------

    def note_progress(self, record: JobRecord, progress: dict[str, Any]) -> None:
        """A job's progress report, on the worker's loop: stored within PROGRESS_EVERY."""
        self._dirty_progress[record.id] = (record, progress)
        self.core.hooks.on_progress(record, progress)
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
                await self.guard(self.driver.set_progress(record, self.worker_id, progress), "saving progress")

    async def save_output(self, record: JobRecord, text: str) -> None:
        await self.guard(self.driver.save_output(record, self.worker_id, text), "saving output")

    def stop(self) -> None:
        if self._progress_writer is not None:
            self._progress_writer.cancel()

    # --- an attempt's outcome --------------------------------------------------------------

    async def succeeded(self, record: JobRecord, result: str | None) -> None:
        """The job returned: ``result`` is its value, encoded (``encode_result``); a big one
        goes to the artifacts first (or fails the job if it can't be kept)."""
        if result is not None and len(result) >= ARTIFACT_BYTES:
            try:
                result = await asyncio.to_thread(self.core.keep_apart, record.id, "result", result, ResultError,
                                                 "the job's result")
            except ResultError as exc:
                await self.failed(record, exc)
                return
        if record.id in self._dirty_progress:
            await self._flush_progress(record.id)
        outcome = Outcome(Status.SUCCEEDED, result=result)
        if not await self._settle(record, outcome):
            return  # no ack: the lease runs out and the job runs again, its flow intact
        self._acks.append((record, outcome))
        # Acks within ACK_DELAY of each other, or arriving while a write is in flight, go
        # together in one write: a busy worker acknowledges in batches.
        if self._ack_flusher is None or self._ack_flusher.done():
            self._ack_flusher = asyncio.create_task(self._flush_acks())

    async def acks_stored(self) -> None:
        if self._ack_flusher is not None:
            await self._ack_flusher

    async def _flush_acks(self) -> None:
        # A millisecond's wait: the claim for the slots these jobs freed goes to the store
        # ahead of their acks (Redis runs commands in order, and the next jobs wait on the
        # claim, nobody on the ack), and jobs ending meanwhile are acknowledged in this write.
        await asyncio.sleep(ACK_DELAY)
        while self._acks:
            batch = self._acks[:]
            results = [(record, outcome.result) for record, outcome in batch]
            done, refused = await self._complete(results)
            missed = [(record, result) for record, result in results
                      if record.id not in done and record.id not in refused]
            if missed:  # the store was away (a lost claim, a lease recovered): nobody else took them?
                lease = self.core.clock() + self.options.lease_timeout
                if await self.take_back([record for record, _ in missed], lease):
                    done |= (await self._complete(missed))[0]
            del self._acks[: len(batch)]  # only now: the heartbeat keeps pending leases alive
            for record, outcome in batch:
                if record.id in refused:
                    await self.failed(record, ResultError(f"the store refused the job's result: {refused[record.id]}"))
                elif record.id in done:
                    self.jobs_done += 1
                    self.core.hooks.after_job(record, outcome)
                else:
                    logger.warning("job %s finished, but its lease had passed to another worker", record.id)

    async def _complete(self, results: list[tuple[JobRecord, str | None]]) -> tuple[set[str], dict[str, str]]:
        """Acknowledge ``results``: the ids stored, and those the store refused (a value it
        won't take) with what it said. A batch the store refuses is split: one member's value
        never takes the others' acknowledgements down with it."""
        write = functools.partial(self.driver.complete, results, self.worker_id, self.core.clock())
        try:
            return set(await self.persist(write, "complete", retry_refusals=False) or ()), {}
        except StoreError as exc:
            if len(results) == 1:
                return set(), {results[0][0].id: str(exc)}
        done: set[str] = set()
        refused: dict[str, str] = {}
        for one in results:
            stored, said = await self._complete([one])
            done |= stored
            refused |= said
        return done, refused

    async def errored(self, record: JobRecord, job: Any, exc: Exception) -> None:
        """The attempt raised ``exc``: retry the job (backoff, or its own rules) or fail it."""
        config = self.core.config
        info = error_info(exc)
        try:
            delay = retry_delay_for(job, record, exc, config.retry_delay, config.backoff_cap, config.backoff_jitter)
        except Exception as hook_error:
            # The job's own error stays the one recorded: it is what the user must fix first.
            logger.exception("job %s: its should_retry/retry_delay raised; failing the job", record.id)
            rule = error_info(hook_error)
            info["message"] += f" (then deciding whether to retry raised {rule['type']}: {rule['message']})"
            info["traceback"] += "\nWhile deciding whether to retry:\n\n" + rule["traceback"]
            delay = None
        if delay is None:
            await self.failed(record, exc, info=info)
            return
        await self._flush_progress(record.id)
        run_at = self.core.clock() + delay
        outcome = Outcome(Status.QUEUED, error=info, retry_in=delay)
        if not await self._settle(record, outcome):
            return
        if await self.persist(lambda: self.driver.retry(record, self.worker_id, run_at, info), "retry"):
            self.core.wake(record.queue, run_at)
            logger.info("job %s (%s) attempt %d failed (%s); retrying in %.1fs",
                        record.id, printable(record.name), record.attempts, printable(info["type"]), delay)
            self.core.hooks.after_job(record, outcome)

    async def postpone(self, record: JobRecord, wait: float) -> None:
        """Back to the queue uncharged, due in ``wait`` seconds (a rate limit's window)."""
        run_at = self.core.clock() + wait
        if await self.persist(lambda: self.driver.postpone(record, self.worker_id, run_at), "put back"):
            self.core.wake(record.queue, run_at)

    async def undefined(self, record: JobRecord, exc: BaseException) -> None:
        """The job's type isn't registered here. One defined in a notebook or script
        (``__main__.``) may be about to be (a kernel restarted, its cells not run yet): it goes
        back, uncharged, for UNDEFINED_WAIT seconds at a time, until UNDEFINED_GRACE after it
        was dispatched; anything else is a missing ``--import``, and fails at once."""
        now = self.core.clock()
        if record.name.startswith("__main__.") and now < record.created_at + UNDEFINED_GRACE:
            run_at = now + UNDEFINED_WAIT
            if await self.persist(lambda: self.driver.postpone(record, self.worker_id, run_at), "put back"):
                self.core.wake(record.queue, run_at)
                if record.name not in self._undefined_said:  # once per type: the panel's log shows it
                    self._undefined_said.add(record.name)
                    logger.warning("job %s (%s): not defined in this process yet; its jobs wait (attempts not "
                                   "counted) until it is, and fail if it still isn't %gs after they were dispatched",
                                   record.id, printable(record.name), UNDEFINED_GRACE)
            return
        await self.failed(record, exc)

    async def failed(self, record: JobRecord, exc: BaseException, status: Status = Status.FAILED,
                     info: dict[str, Any] | None = None) -> None:
        """The job ends without success: FAILED (into the failed store), CANCELLED or EXPIRED."""
        await self._flush_progress(record.id)
        info = info or error_info(exc)
        outcome = Outcome(status, error=info)
        # The end is stored even when settling kept failing: the job ran for good, and the
        # store that refused the hooks' writes most likely refuses this one too (then the
        # lease runs out, and housekeeping settles and fails it).
        await self._settle(record, outcome)
        now = self.core.clock()
        if await self.persist(lambda: self.driver.fail(record, self.worker_id, now, info, status), status.value):
            if status is Status.EXPIRED:
                logger.info("job %s (%s) expired: %s", record.id, printable(record.name), printable(info["message"]))
            else:
                logger.warning("job %s (%s) %s after %d attempt(s): %s: %s", record.id, printable(record.name),
                               status.value, record.attempts, printable(info["type"]), printable(info["message"]))
            self.jobs_failed += status is Status.FAILED
            self.core.hooks.after_job(record, outcome)

    async def _settle(self, record: JobRecord, outcome: Outcome) -> bool:
        """The hooks' ``settle``, retried like a write; False when it kept failing."""
        try:
            await self.core.hooks.settle(record, outcome)
            return True
        except Exception as exc:
            logger.warning("worker %s: settling job %s failed (%r); trying again", self.worker_id, record.id, exc)
        return await self.persist(lambda: self._settled(record, outcome), "settle the hooks of") is not None

    async def _settled(self, record: JobRecord, outcome: Outcome) -> bool:
        await self.core.hooks.settle(record, outcome)
        return True

    async def persist(self, write: Callable[[], Awaitable[T]], what: str, retry_refusals: bool = True) -> T | None:
        """Record an outcome, retrying while storage is unreachable. If it never comes back
        the job's lease runs out and another worker runs it again: at-least-once holds.
        ``retry_refusals=False``: a write the store refuses (StoreError, not unreachable) raises."""
        delay = 0.1
        for _ in range(8):
            try:
                return await write()
            except Exception as exc:
                if not retry_refusals and isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable):
                    raise
                self.core.store_unreachable()
                logger.warning("worker %s: could not %s a job (%r); retrying in %.1fs", self.worker_id, what, exc,
                               delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None
