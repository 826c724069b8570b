"""Running one claimed job: decode it, tell the hooks, capture its output, call its handler
(async ones on the loop, sync ones on the worker's threads) within its timeout, and hand
whatever happened to the outcomes. Nothing a job does escapes: every failure becomes a
retry or an entry in the failed store.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from .. import capture
from ..artifacts import OFF_LOOP_BYTES, is_reference
from ..codec import is_data_value
from ..config import Rate, parse_rate
from ..errors import ConfigError, JobCancelled, JobExpired, JobTimeout, PayloadError, ResultError, UnknownJobError
from ..hooks import Hooks
from ..job import Context, JobType, decode_job, is_async_job, known_type
from ..records import JobRecord, Status
from .outcomes import Outcomes, encode_result

PERMIT_RETRY = 1.0  # seconds a rate-limited job waits when the store could not say when a permit frees
SLOT_RETRY = 0.5  # seconds a job waits for a place of its concurrency key (a place frees when a job ends)

class Running(NamedTuple):
    """A job a worker has claimed and is running."""

    record: JobRecord
    task: asyncio.Task[None]
    ctx: Context


class JobRunner:
    """One worker's way of running jobs, and what it knows of the threads they run in.
    ``slot_freed`` is called when a thread that outlived its job's task returns."""

    def __init__(self, hooks: Hooks, outcomes: Outcomes, slot_freed: Callable[[], None]) -> None:
        self.hooks, self.outcomes, self.slot_freed = hooks, outcomes, slot_freed
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancelling: set[str] = set()  # jobs being stopped because someone cancelled them
        # Jobs whose sync handler is running in a thread, and of those the ones whose task has
        # ended (a timeout the handler ignored): their threads go on and still hold their slots.
        self._in_thread: set[str] = set()
        self.stuck: set[str] = set()
        self.releasing: set[str] = set()  # interrupted by stop(): whatever they end with, they go back

    def open(self, threads: int, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._loop = None

    def in_thread(self, job_id: str) -> bool:
        return job_id in self._in_thread

    def cancel(self, running: Running) -> None:
        """Someone cancelled the job: a sync handler sees ``ctx.cancelled``, an async one is
        cancelled; either way it ends CANCELLED."""
        if running.record.id not in self._cancelling:
            self._cancelling.add(running.record.id)
            running.ctx.cancel()
            running.task.cancel()

    async def run(self, record: JobRecord, ctx: Context, default_timeout: float | None) -> None:
        expires_at = record.expires_at
        if expires_at is not None and self.outcomes.core.clock() >= expires_at:
            # Claimed after its expiry: it never runs, and ends EXPIRED (not in the failed store).
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires_at))
            await self.outcomes.failed(record, JobExpired(f"not started before its expiry ({when})"), Status.EXPIRED)
            return
        if await self._over_its_rate(record):
            return
        held: list[str] = []
        try:
            for key, limit in await self._places(record):
                taken = await self.outcomes.persist(functools.partial(
                    self.outcomes.driver.take_slot, record.queue, key, limit, record.id), "take a place for")
                if not taken:  # every place of a key is held: back to the queue, uncharged
                    await self.outcomes.postpone(record, SLOT_RETRY)
                    return
                held.append(key)
            await self._run(record, ctx, default_timeout)
        finally:
            for key in held:
                with contextlib.suppress(Exception):  # else it frees when this job is no longer running
                    await self.outcomes.driver.release_slot(record.queue, key, record.id)

    async def _places(self, record: JobRecord) -> list[tuple[str, int]]:
        """(key, limit) of each concurrency limit on this job: its queue's, then its type's
        (per its limit_key's value)."""
        places = []
        queue_limit = (await self.outcomes.core.queue_settings()).get(record.queue, {}).get("concurrency")
        if isinstance(queue_limit, int) and not isinstance(queue_limit, bool) and queue_limit > 0:
            places.append(("", queue_limit))  # "": the queue as a whole
        job_type = known_type(record.name)
        if job_type is not None and job_type.concurrency is not None and (key := _key_of(record, job_type)):
            places.append((key, job_type.concurrency))
        return places

    async def _run(self, record: JobRecord, ctx: Context, default_timeout: float | None) -> None:
        self.hooks.before_job(record)
        job: Any = None
        output = capture.Output()
        try:
            # A big payload (a DataFrame argument) decodes on a thread: the loop keeps beating.
            small = len(record.payload) < OFF_LOOP_BYTES and not is_reference(record.payload)
            job = decode_job(record) if small else await asyncio.to_thread(decode_job, record)
            try:
                with capture.capturing(output):  # this task runs in a context of its own (Worker._start)
                    result = await self._call(job, ctx, record.timeout or default_timeout, output)
            finally:
                if output:
                    await self.outcomes.save_output(record, output.text())
        except asyncio.CancelledError:
            if record.id not in self._cancelling:
                raise  # stop(): the worker releases the job
            self._cancelling.discard(record.id)
            _uncancel()
            await self.outcomes.failed(record, JobCancelled("cancelled while running"), Status.CANCELLED)
        except UnknownJobError as exc:
            await self.outcomes.undefined(record, exc)
        except (PayloadError, ResultError) as exc:
            # Retrying can't help until someone imports or fixes something (or the job returns
            # something storable): into the failed store, where it shows.
            await self.outcomes.failed(record, exc)
        except Exception as exc:
            await self.outcomes.errored(record, job, exc)
        except GeneratorExit:  # the task itself is being closed (its loop is going): nothing to record
            raise
        except BaseException as exc:
            # sys.exit(), KeyboardInterrupt and the like, raised by the handler: they end the
            # job, never retried, and never the worker (escaping the task they would stop the loop).
            await self.outcomes.failed(record, exc)
        else:
            await self.outcomes.succeeded(record, result)

    async def _over_its_rate(self, record: JobRecord) -> bool:
        """A job of a rate-limited queue or type takes a permit of each limit first (one
        atomic step in the store each); with none left in a window the job goes back to its
        queue, due when one frees: not charged an attempt, no error, its slot free for the
        jobs behind it."""
        limits = await self._limits(record)
        outcomes = self.outcomes
        for key, rate in limits:
            take = functools.partial(outcomes.driver.take_permit, key, rate.count, rate.window, uuid.uuid4().hex)
            wait = await outcomes.persist(take, "take a rate permit for")
            if wait != 0:
                await outcomes.postpone(record, PERMIT_RETRY if wait is None else wait)
                return True
        return False

    async def _limits(self, record: JobRecord) -> list[tuple[str, Rate]]:
        """(permit key, rate) of each limit on this job: its queue's, then its type's."""
        limits = []
        queue_rate = (await self.outcomes.core.queue_settings()).get(record.queue, {}).get("rate")
        if isinstance(queue_rate, str):
            with contextlib.suppress(ConfigError):  # a rate this version can't read limits nothing
                limits.append((f"queue:{record.queue}", parse_rate(queue_rate, "queue rate")))
        job_type = known_type(record.name)
        if job_type is not None and job_type.rate is not None and (key := _key_of(record, job_type)):
            limits.append((key, job_type.rate))
        return limits

    async def _call(self, job: Any, ctx: Context, timeout: float | None, output: capture.Output) -> str | None:
        """Run the handler in this task and encode what it returned (ResultError if that can't
        be stored); past ``timeout`` the task is cancelled (a timer, not ``wait_for``, which
        would cost a second task per job). The timeout counts from when the handler starts.
        A sync handler's result is encoded on its thread, a big async one's on a thread too."""
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
                value = await job.handle(ctx)
                return await asyncio.to_thread(encode_result, value) if is_big(value) else encode_result(value)
            handle = capture.calling(output, job.handle)
            try:
                result: str | None = await self._in_a_thread(ctx, lambda ctx: encode_result(handle(ctx)),
                                                             thread_started)
            except BaseException:
                if ctx.job_id in self.releasing:
                    # stop() interrupted it and waited for its thread, which raised: its work
                    # isn't done, so it goes back to the queue like a cancelled async job.
                    raise asyncio.CancelledError from None
                raise
            if ctx.job_id in self.releasing and ctx.saw_cancel:
                raise asyncio.CancelledError  # it returned early because it was asked to: not done
            # Returned without heeding the stop, even past its grace: its work is done, and is
            # recorded, not run a second time.
            return result
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
                self.stuck.add(job_id)
                future.add_done_callback(returned)

    def _thread_returned(self, job_id: str) -> None:
        self._in_thread.discard(job_id)
        self.stuck.discard(job_id)
        self.slot_freed()


def _key_of(record: JobRecord, job_type: JobType) -> str | None:
    """What a limit of ``job_type`` counts this job under (its name, with its limit_key's
    value); None where the job can't be read: its run meets the same error and records it."""
    if record.broken:
        return None
    if job_type.limit_key is None:
        return job_type.name
    try:
        return job_type.permit_key(decode_job(record))
    except Exception:
        return None


def is_big(value: Any) -> bool:
    """Whether encoding ``value`` may hold the loop long enough to miss a beat: data values,
    big bytes, long containers."""
    return is_data_value(value) or (isinstance(value, bytes | bytearray | str | list | dict) and len(value) > 10_000)


def _uncancel() -> None:
    """After handling our own cancellation of the current task, so its later awaits run."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):  # Python 3.11+
        task.uncancel()
