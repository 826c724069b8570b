"""The runtime under the facade: one per manager, shared by its workers, schedulers,
handles and workflows, which take it instead of the manager's privates.

It holds the store (driver), the clock, the config, the hooks (events among them) and the
dependencies handlers receive; it knows this process's workers, to wake them when jobs
become due; it turns user jobs into records and stores them; and it keeps the store tidy
(housekeeping: the jobs of dead workers, expired results).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._loop import on_loop_thread, run_sync
from .artifacts import ARTIFACT_BYTES, Artifacts, default_location
from .config import Config, parse_duration
from .drivers.base import BlockingEnqueue, Driver, StoreClock, WakeUps
from .errors import ClockSkew, ConfigError, SerializationError, error_info
from .feed import Feed
from .hooks import Hooks, Outcome
from .job import encode_job, unreadable
from .records import (
    MAX_UNIQUE_KEY,
    JobRecord,
    Member,
    Priority,
    QueueCounts,
    Status,
    check_queue_name,
    check_text,
    new_job_id,
    parse_priority,
)

logger = logging.getLogger("neonnb.core")

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
LOST_WORKERS_KEPT = 3600.0  # seconds a lost worker stays listed (as lost) before housekeeping drops it
SETTINGS_LOOK = 1.0  # seconds between reads of the queues' settings (paused, rate), shared by a manager's workers


class Counting:
    """The per-queue counts (``qm.stats()``), at any size of store.

    A SQL or memory store counts its rows (Redis keeps its counts), so at a million jobs one
    count takes a noticeable share of a second. Counters kept in step with every state change
    would make that O(1), but cost every dispatch, claim and acknowledgement an extra write
    (benchmarks/count_triggers.py; the figures are in benchmarks/DECISIONS.md): a dashboard is
    not worth slowing every job for. So a count that is cheap (under
    ``CHEAP`` seconds, or of fewer than ``SMALL`` jobs) is made afresh on every call: exact.
    One that is not is served from the last count, and made again in the background once that
    count is older than its own duration over ``SHARE``: however many views refresh, counting
    takes at most that share of the store's time, and no call waits for it."""

    CHEAP = 0.02
    SMALL = 10_000
    SHARE = 0.1

    def __init__(self, driver: Driver, clock: Callable[[], float]) -> None:
        self.driver, self.clock = driver, clock
        self._last: dict[str, QueueCounts] | None = None
        self._counted_at = 0.0  # time.monotonic() when the last count started
        self._took = 0.0
        self._refresh: asyncio.Task[dict[str, QueueCounts]] | None = None

    async def counts(self) -> dict[str, QueueCounts]:
        last = self._last
        if last is None or self._took < self.CHEAP or sum(c.total for c in last.values()) < self.SMALL:
            return copy.deepcopy(await self._count())
        stale = time.monotonic() - self._counted_at > self._took / self.SHARE
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(self._count())
            self._refresh.add_done_callback(_log_failed_count)
        return copy.deepcopy(last)

    async def _count(self) -> dict[str, QueueCounts]:
        started = time.monotonic()
        counts = await self.driver.counts(self.clock())
        self._last, self._counted_at, self._took = counts, started, time.monotonic() - started
        return counts


def _log_failed_count(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:  # the next call counts again
        logger.warning("counting the queues' jobs failed: %r", task.exception())


class Wakeable(Protocol):
    """A worker, as far as the core is concerned: woken when jobs of its queues are due."""

    queue_names: list[str]

    def notify(self, due: float | None = None) -> None: ...


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


ANNOUNCE_GAP = 0.5  # seconds: a worker's entry in the store follows its jobs at most this often

class Core:
    def __init__(self, config: Config, driver: Driver, clock: Callable[[], float]) -> None:
        self.config, self.driver, self.clock = config, driver, clock
        self._enqueue_blocking = driver.enqueue_blocking if isinstance(driver, BlockingEnqueue) else None
        self.hooks = Hooks()
        self.feed = Feed(driver, self.hooks, clock, self.announce, self.withdraw)
        self.events = self.feed.events
        self.dependencies: dict[str, Any] = {}
        self.counting = Counting(driver, clock)
        location = config.artifacts or default_location(config.driver, config.connection)
        self.artifacts = None if location is None else Artifacts(location)
        self._workers: dict[Wakeable, None] = {}  # in the order they started (a set that keeps it)
        self._workers_lock = threading.Lock()  # the driver's notification thread reads them
        self._watching = False
        self._next_housekeeping = 0.0
        self._recover_after = 0.0  # leases expired while the store was away aren't taken before this
        self._settings: tuple[float, dict[str, dict[str, Any]]] | None = None  # (when read, the settings)
        self.store_failures = 0  # calls to the store that failed: a worker's leases may need taking back
        self.clocks_checked = False  # a worker compared this process's clock with the store's (Worker.start)

    # --- the store's registry of workers and schedulers --------------------------------

    async def announce(self, info: Callable[[], Member], beat: float, changed: asyncio.Event | None = None) -> None:
        """Register ``info()`` in the store, then refresh it every ``beat`` seconds until
        cancelled: other processes see this worker or scheduler, and see it lost when the
        beats stop. ``changed`` (a job started or ended) refreshes it sooner, at most once
        per ANNOUNCE_GAP, so a listing follows the jobs within a second. A failed beat is
        logged, and the next one tries again."""
        loop = asyncio.get_running_loop()
        while True:
            member = info()
            saved = loop.time()
            try:
                await self.driver.save_member(member)
            except Exception as exc:
                logger.warning("%s %s: could not announce itself to the store (%r)", member.kind, member.id, exc)
            if changed is None:
                await asyncio.sleep(beat)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), beat)
            await asyncio.sleep(max(0.0, saved + ANNOUNCE_GAP - loop.time()))  # changes coalesce meanwhile
            changed.clear()

    async def withdraw(self, member_id: str) -> None:
        try:
            await self.driver.remove_member(member_id)
        except Exception as exc:  # the store is away: the entry shows as lost, then goes
            logger.warning("%s: could not unregister from the store (%r)", member_id, exc)

    # --- this process's workers --------------------------------------------------------

    def add_worker(self, worker: Wakeable) -> None:
        with self._workers_lock:
            self._workers[worker] = None
            if not self._watching:
                self._watching = True
                if isinstance(self.driver, WakeUps):
                    self.driver.watch(self.wake)

    def remove_worker(self, worker: Wakeable) -> None:
        with self._workers_lock:
            self._workers.pop(worker, None)

    def workers(self) -> list[Any]:
        """This process's running workers, in the order they started."""
        with self._workers_lock:
            return list(self._workers)

    def wake(self, queue: str = "*", due: float | None = None) -> None:
        """Jobs of ``queue`` ("*": any) are due at ``due`` (None: now). Called after our own
        dispatches, and by the driver when another process made jobs due."""
        for worker in self.workers():
            if queue == "*" or queue in worker.queue_names:
                worker.notify(due)

    # --- new jobs --------------------------------------------------------------------------

    def record(self, queue: str, job: Any, *, priority: Priority | str | None = None,
               run_at: float | None = None) -> JobRecord:
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
            priority=parse_priority(priority),
            max_attempts=max_attempts or self.config.max_attempts,
            timeout=None if timeout is None else parse_duration(timeout, f"{name}.timeout()"),
            run_at=run_at,
            created_at=now,
            unique_key=_unique_key(job),
        )

    async def enqueue(self, records: list[JobRecord]) -> list[JobRecord]:
        """Store new jobs and wake this process's workers for them. A unique job whose key
        a queued or running job holds takes that job's id."""
        if any(len(r.payload) >= ARTIFACT_BYTES for r in records):
            await asyncio.to_thread(self.keep_payloads, records)
        plain = [r for r in records if r.unique_key is None]
        if plain:
            await self.driver.enqueue(plain)
        for r in records:
            if r.unique_key is not None:
                r.id = await self.driver.enqueue_unique(r)
        self._wake_for(records)
        return records

    def keep_payloads(self, records: list[JobRecord]) -> None:
        """Big payloads (a DataFrame argument) go to the artifacts before their records are
        stored, each record keeping a reference; SerializationError where there is no such
        place and one is over max_value_bytes."""
        for record in records:
            if len(record.payload) >= ARTIFACT_BYTES:
                record.payload = self.keep_apart(record.id, "payload", record.payload,
                                                 SerializationError, f"the arguments of {record.name}")

    def keep_apart(self, job_id: str, part: str, text: str, error: type[Exception], what: str) -> str:
        """``text`` (a payload or result of ARTIFACT_BYTES or more) as the record keeps it."""
        if self.artifacts is not None:
            return self.artifacts.put(job_id, part, text)
        limit, why = self.config.max_value_bytes, "Config.max_value_bytes"
        store = self.driver.value_limit()
        if store is not None and store[0] < limit:
            limit, why = store
        if len(text) > limit:
            raise error(f"{what} take {len(text):,} bytes encoded, over the {limit:,} allowed for values kept in "
                        f"the store itself ({why}): set artifacts= (an fsspec URL such as file:///shared/neonnb or "
                        "s3://bucket/prefix) to keep big values apart")
        return text

    def enqueue_sync(self, record: JobRecord) -> JobRecord:
        """The sync dispatch family's way in: a store that can (BlockingEnqueue) stores the
        job on the calling thread, not on neonnb's loop thread, which would cost a thread
        wake-up each way (and on SQL one more each way to the driver's threads;
        benchmarks/DECISIONS.md)."""
        self.keep_payloads([record])
        blocking = self._enqueue_blocking
        if record.unique_key is None and blocking is not None and not on_loop_thread() and blocking([record]):
            self._wake_for([record])
            return record
        return run_sync(self.enqueue([record]))[0]

    async def enqueue_once(self, record: JobRecord) -> bool:
        """Store a job that must exist once, under its fixed id (a chain's next step, a
        batch's callback, a schedule's tick), and wake workers for it; True if stored now."""
        stored = await self.driver.enqueue_once(record)
        if stored:
            self.wake(record.queue, record.run_at)
        return stored

    def _wake_for(self, records: list[JobRecord]) -> None:
        earliest: dict[str, float] = {}
        for r in records:
            earliest[r.queue] = min(r.run_at, earliest.get(r.queue, r.run_at))
        for queue, due in earliest.items():
            self.wake(queue, due)

    # --- ending jobs outside a worker ------------------------------------------------------

    async def cancel(self, job_id: str, queue: str | None = None) -> Status | None:
        """See ``QueueManager.acancel``."""
        was = await self.driver.cancel(job_id, queue, self.clock())
        if was is Status.QUEUED:
            record = await self.driver.get(job_id, queue)
            if record is not None:
                outcome = Outcome(Status.CANCELLED, error={"type": "neonnb.errors.JobCancelled",
                                                           "message": "cancelled before it ran", "traceback": ""})
                await self.hooks.settle(record, outcome)  # a batch counts it as finished
                self.hooks.after_job(record, outcome)
        return was

    async def requeue_failed(self, ids: list[str] | None, queue: str | None) -> list[str]:
        moved = await self.driver.requeue_failed(ids, queue, self.clock())
        self.wake()
        return moved

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
        skewed = clock_skew_error(await self.clock_skew(), config.lease_timeout) if self.clocks_checked else None
        if skewed is not None:
            logger.error("%s; leases are not recovered until the clocks agree", skewed)
            return
        if now >= self._recover_after:
            await self._recover(now)
        await self.driver.purge_finished(now - config.result_ttl)
        await self.driver.drop_members(now - LOST_WORKERS_KEPT)
        if self.artifacts is not None:
            await self.artifacts.sweep(now, self._stored, asyncio.to_thread)

    async def queue_settings(self) -> dict[str, dict[str, Any]]:
        """The queues' settings in the store, read at most every SETTINGS_LOOK seconds for
        all of this manager's workers (a pause or a limit set anywhere reaches them within that)."""
        now = time.monotonic()
        if self._settings is None or now - self._settings[0] >= SETTINGS_LOOK:
            self._settings = (now, await self.driver.queue_settings())
        return self._settings[1]

    async def configure_queue(self, queue: str, settings: dict[str, Any]) -> None:
        await self.driver.configure_queue(check_queue_name(queue), settings)
        self._settings = None  # set here: the next look reads the store

    def store_unreachable(self) -> None:
        """A call to the store failed. Leases run out while it is away, also those of live
        workers (their heartbeats fail too): once it is back, they get one lease to renew them
        and to store what their jobs did before this process takes any lease for dead."""
        self._recover_after = max(self._recover_after, self.clock() + self.config.lease_timeout)
        self.store_failures += 1

    async def _recover(self, now: float) -> None:
        recovered = await self.driver.recover_expired(now)
        if recovered.requeued:
            logger.warning("requeued %d job(s) whose worker stopped heartbeating", len(recovered.requeued))
        for record in recovered.exhausted:
            # Settled first (a batch counts the member's end), then ended: if this process dies
            # between the two, the next housekeeping finds the job again and does both.
            error = error_info(unreadable(record)) if record.broken else LEASE_ERROR
            outcome = Outcome(Status.FAILED, error=error)
            await self.hooks.settle(record, outcome)
            if await self.driver.fail(record, record.worker_id or "", now, error):
                logger.warning("job %s (%s) failed: its worker stopped heartbeating on its last allowed attempt",
                               record.id, record.name)
                self.hooks.after_job(record, outcome)

    async def _stored(self, job_ids: list[str]) -> set[str]:
        return {record.id for record in await self.driver.get_many(job_ids, None)}

    async def clock_skew(self) -> float:
        """Seconds this process's clock is ahead of the store's (behind: negative); 0 for a
        store on this machine. Leases are times by the workers' clocks, so they must agree."""
        if not isinstance(self.driver, StoreClock):
            return 0.0
        # The server read its clock somewhere within the round trip; the shortest of a few
        # says best where (the first may include connecting, which comes before the read).
        best: tuple[float, float] | None = None
        for _ in range(3):
            before = self.clock()
            server = await self.driver.server_time()
            after = self.clock()
            if server is None:
                return 0.0
            if best is None or after - before < best[0]:
                best = (after - before, (before + after) / 2 - server)
            if after - before < 0.02:
                break
        assert best is not None
        return best[1]


def _unique_key(job: Any) -> str | None:
    key = job.unique_key() if hasattr(job, "unique_key") else None
    if key is not None and not isinstance(key, str):
        raise ConfigError(f"{type(job).__qualname__}.unique_key() must return a string or None, got {key!r}")
    return None if key is None else check_text(key, MAX_UNIQUE_KEY, "unique key")

