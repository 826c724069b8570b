"""The one Driver protocol every storage backend implements.

Drivers store ``JobRecord``s and make each state change atomic; the manager and worker decide
which change to make. All times are passed in (``now``) so tests can inject a clock. Methods
that act for a worker take the records it holds (not bare ids: Redis finds a job under its
queue's hash tag) and its ``worker_id``, and do nothing (returning False) when the job is no
longer that worker's: its lease expired and someone else may have it now.

Drivers must work from any event loop: the sync API runs them on neonnb's background loop,
the async API on the caller's.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from ..records import JobPage, JobRecord, Member, QueueCounts, Recovered, Status


class Driver(abc.ABC):
    """The job-level contract: what every store does. What only some stores can do is a
    capability below, which a driver class adds to its bases (``class RedisDriver(Driver,
    BlockingEnqueue, HandOff, ...)``) and its callers check with ``isinstance``."""

    def value_limit(self) -> tuple[int, str] | None:
        """The most characters one stored value (a payload, a result) may take in this store,
        and why, where the store itself sets a limit below ``Config.max_value_bytes``. May
        ask the store (blocking): called only for values of ARTIFACT_BYTES or more."""
        return None

    @abc.abstractmethod
    async def enqueue(self, records: Sequence[JobRecord]) -> None:
        """Store new jobs, all in one round trip; when this returns they are durable."""

    @abc.abstractmethod
    async def enqueue_once(self, record: JobRecord) -> bool:
        """Store the job unless one with its id exists (in any state, until purged); True if
        stored. Atomic: of several processes enqueuing the same id at once, one wins."""

    @abc.abstractmethod
    async def enqueue_unique(self, record: JobRecord) -> str:
        """Store the job unless a queued or running job has its ``unique_key``; returns the
        id of the job that has it (this one's when stored). Atomic across processes."""

    @abc.abstractmethod
    async def mark(self, queue: str, group: str, member: str, value: str, now: float,
                   complete_at: int) -> dict[str, str] | None:
        """Add ``member`` with ``value`` to the set ``group`` (kept with ``queue``'s jobs; a
        member added twice keeps its first value) and, if the set now has ``complete_at``
        members or more, return every member's value; else None. Atomic: of members added
        at once, the one that completes the set sees it complete. Sets are dropped with
        finished jobs by ``purge_finished``. Batches count their finished jobs this way, each
        with its result."""

    @abc.abstractmethod
    async def reserve(
        self, queues: Sequence[str], limit: int, worker_id: str, now: float, lease_expires: float,
        ranks: Sequence[int] | None = None,
    ) -> list[JobRecord]:
        """Claim up to ``limit`` due jobs: highest priority first, FIFO within a priority;
        with ``ranks``, only jobs of those priorities (``Priority.rank``).

        Each claimed job becomes RUNNING with ``attempts + 1``, ``worker_id`` and the lease.
        """

    @abc.abstractmethod
    async def extend_leases(self, jobs: Sequence[JobRecord], worker_id: str, lease_expires: float) -> list[str]:
        """Push out the lease of jobs this worker still runs (the heartbeat); returns the ids
        of those someone asked to stop (``cancel``)."""

    @abc.abstractmethod
    async def take_permit(self, key: str, count: int, window: float, token: str) -> float:
        """A rate limit's check and count in one atomic step: if fewer than ``count`` permits
        of ``key`` were taken in the last ``window`` seconds (a sliding window), take one (named
        ``token``) and return 0; else take none and return the seconds until one frees. The
        time is read inside that step (the store's clock where it has one): a caller that
        waited for the step must not be counted at the moment it asked."""

    @abc.abstractmethod
    async def take_slot(self, queue: str, key: str, limit: int, job_id: str) -> bool:
        """Concurrency per key, in one atomic step: unless ``limit`` running jobs of ``queue``
        hold a slot of ``key``, the job takes one. A holder that is no longer running (it
        ended, or its dead worker's lease was recovered) no longer counts."""

    @abc.abstractmethod
    async def release_slot(self, queue: str, key: str, job_id: str) -> None:
        """The job's attempt ended: its slot frees at once."""

    @abc.abstractmethod
    async def configure_queue(self, queue: str, settings: dict[str, Any]) -> None:
        """Merge ``settings`` into what is kept for ``queue`` as a whole (``paused``: True,
        ``rate``: "100/m"; a value of None removes the setting). Kept in the store: every
        worker, in any process, sees it."""

    @abc.abstractmethod
    async def queue_settings(self) -> dict[str, dict[str, Any]]:
        """What is set for each queue that has settings."""

    @abc.abstractmethod
    async def stopping(self, jobs: Sequence[JobRecord], worker_id: str) -> list[str]:
        """Of ``jobs``, which this worker holds, the ids someone asked to stop (``cancel``). A
        read only: workers ask every CANCEL_POLL seconds while they run jobs."""

    @abc.abstractmethod
    async def reacquire(self, jobs: Sequence[JobRecord], worker_id: str, lease_expires: float) -> list[str]:
        """Take back, in one atomic step each, jobs this worker runs that went back to the queue
        while it could not reach the store, if nobody claimed them since: queued with the
        attempts of this worker's claim (a lease recovered meanwhile) or one fewer (a claim the
        store lost in a crash). They become this worker's again, running under the same attempt
        with the new lease. Returns the ids taken back."""

    @abc.abstractmethod
    async def set_progress(self, job: JobRecord, worker_id: str, progress: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def save_output(self, job: JobRecord, worker_id: str, output: str) -> None:
        """Store what the job's attempt printed and logged (replacing an earlier attempt's)."""

    @abc.abstractmethod
    async def complete(self, results: Sequence[tuple[JobRecord, str | None]], worker_id: str, now: float) -> list[str]:
        """Mark jobs SUCCEEDED with their JSON results, all in one round trip where the store
        allows; returns the ids that were still this worker's."""

    @abc.abstractmethod
    async def retry(self, job: JobRecord, worker_id: str, run_at: float, error: dict[str, Any]) -> bool:
        """Put a job back to QUEUED, due at ``run_at``, keeping its attempts."""

    @abc.abstractmethod
    async def fail(
        self, job: JobRecord, worker_id: str, now: float, error: dict[str, Any], status: Status = Status.FAILED
    ) -> bool:
        """Move a job to the failed store (FAILED), or end it CANCELLED when it stopped on request."""

    @abc.abstractmethod
    async def cancel(self, job_id: str, queue: str | None, now: float) -> Status | None:
        """A queued (or delayed) job becomes CANCELLED and never runs; a running one is asked
        to stop (its worker learns it with ``stopping``). Returns the status the job had
        (None: no such job)."""

    @abc.abstractmethod
    async def release(self, jobs: Sequence[JobRecord], worker_id: str, now: float) -> int:
        """Give jobs back to the queue unfinished (graceful stop); their attempt is not counted."""

    @abc.abstractmethod
    async def postpone(self, job: JobRecord, worker_id: str, run_at: float) -> bool:
        """Give a job back to the queue, due at ``run_at``, its attempt not counted (a job this
        process can't run yet: its type is about to be defined). True if it was still this worker's."""

    @abc.abstractmethod
    async def release_unheld(self, queues: Sequence[str], worker_id: str, held: Sequence[str], now: float) -> int:
        """Give back, attempt not counted, the jobs of ``queues`` running under ``worker_id``
        that are not in ``held``: a claim whose reply was lost left them claimed for a
        worker that never got them. Returns how many."""

    @abc.abstractmethod
    async def recover_expired(self, now: float) -> Recovered:
        """Requeue RUNNING jobs whose lease ended (their worker died), attempt counted. Those
        that used up ``max_attempts`` stay as they are and come back as records: the caller
        ends them (``fail`` under their dead worker's id) once it has counted them where they
        count (a batch), so that an end is never recorded without its consequences."""

    @abc.abstractmethod
    async def purge_finished(self, before: float) -> int:
        """Delete SUCCEEDED and CANCELLED jobs that finished before ``before`` (their TTL ended)."""

    @abc.abstractmethod
    async def purge_queued(self, queue: str) -> int:
        """Delete the jobs of ``queue`` that have not started (waiting and delayed); returns
        how many. Running jobs finish; a batch or chain a deleted job belonged to never ends."""

    @abc.abstractmethod
    async def get(self, job_id: str, queue: str | None = None) -> JobRecord | None:
        """The job's record; ``queue``, when the caller knows it, spares Redis a search."""

    @abc.abstractmethod
    async def get_many(self, job_ids: Sequence[str], queue: str | None = None) -> list[JobRecord]:
        """The records of those of ``job_ids`` that exist, in one round trip where the store allows."""

    @abc.abstractmethod
    async def list_jobs(
        self, *, status: Status | None = None, queue: str | None = None, limit: int = 100, offset: int = 0,
        cursor: str | None = None,
    ) -> JobPage:
        """Jobs newest first: finished ones (``listed_by_finish``) by when they finished, the
        others by when they were created. ``cursor``, a page's ``cursor``, continues after
        that page. Costs what the page holds, not what the store holds (past ``offset``
        rows, which it skips)."""

    @abc.abstractmethod
    async def counts(self, now: float) -> dict[str, QueueCounts]:
        """Per-queue counts of every queue that holds a job."""

    @abc.abstractmethod
    async def requeue_failed(self, ids: Sequence[str] | None, queue: str | None, now: float) -> list[str]:
        """Move failed jobs back to the queue with attempts reset; ``ids=None`` means all
        failed jobs (of ``queue`` if given). Returns the ids moved."""

    @abc.abstractmethod
    async def delete_failed(self, ids: Sequence[str] | None) -> int:
        """Forget failed jobs; ``ids=None`` flushes the whole failed store."""

    @abc.abstractmethod
    async def save_member(self, info: Member) -> None:
        """Register a worker or scheduler, or refresh what the store knows of it (its beat)."""

    @abc.abstractmethod
    async def remove_member(self, member_id: str) -> None:
        """The worker or scheduler stopped."""

    @abc.abstractmethod
    async def list_members(self) -> list[Member]:
        """Every registered worker and scheduler, of every process (lost ones too, until
        dropped), as ``records.read_member`` reads them."""

    @abc.abstractmethod
    async def drop_members(self, seen_before: float) -> int:
        """Forget members last seen before ``seen_before``; returns how many."""

    async def close(self) -> None:  # noqa: B027 - drivers without resources need nothing
        """Release connections."""


# --- optional capabilities -------------------------------------------------------------


class BlockingEnqueue(abc.ABC):
    """A store that can take a sync dispatch on the calling thread: it then costs the
    store's own round trip, without a hop to neonnb's loop thread and back (two thread
    wake-ups)."""

    @abc.abstractmethod
    def enqueue_blocking(self, records: Sequence[JobRecord]) -> bool:
        """``enqueue`` on the calling thread. False: not this way now (Redis: a lost
        connection, which the loop's way retries); the caller then goes through the loop."""


class Waiter(abc.ABC):
    """One idle worker's wait for a job handed over as it is dispatched: one trip from the
    dispatcher to the worker, where a wake-up and then a claim would take two."""

    @abc.abstractmethod
    async def wait(self, now: float, lease_timeout: float, timeout: float, wake: asyncio.Event,
                   start: Callable[[list[JobRecord]], None]) -> None:
        """Wait until a job is handed over, ``wake`` is set or ``timeout`` passes. Jobs handed
        over (already claimed for this worker, their lease running) go to ``start`` as soon
        as they arrive."""

    @abc.abstractmethod
    async def close(self) -> None:
        """The worker stops: let go of what the waits held."""


class HandOff(abc.ABC):
    """A store that can hand a job to an idle worker as it is dispatched, claimed for it."""

    @abc.abstractmethod
    async def waiter(self, worker_id: str, queues: Sequence[str]) -> Waiter | None:
        """How the worker ``worker_id`` on ``queues`` waits for jobs handed to it; None: it
        can't for these queues (it waits for a wake-up, then claims)."""


class PipelinedClaims(abc.ABC):
    """A store that answers a big claim sooner as several small ones sent together: Redis
    runs pipelined commands one after another, PostgreSQL claims the pieces on several
    connections at once. The worker starts the first jobs while the store still claims the
    rest."""

    claim_piece: int | None  # jobs per reserve call; None: a claim is one call


class WakeUps(abc.ABC):
    """A store that tells when another process made jobs due (LISTEN/NOTIFY, pub/sub, a
    file's change); without it workers poll."""

    @abc.abstractmethod
    def watch(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(queue)``, from any thread, when another process makes a job of
        ``queue`` due (``"*"``: any queue may have jobs). Called once per driver; a store
        that can't tell for its configuration (SQLite in memory) does nothing."""


class StoreClock(abc.ABC):
    """A store on another machine, whose clock the leases depend on."""

    @abc.abstractmethod
    async def server_time(self) -> float | None:
        """The store's clock, seconds since the epoch; None where it is this machine's
        (SQLite through the same driver as PostgreSQL)."""


class EventFeed(abc.ABC):
    """A store that carries messages between processes (the job events of ``qm.events``):
    Redis pub/sub, PostgreSQL NOTIFY, a table of recent messages elsewhere. Delivery is for
    listeners connected at the time (a listener that reconnects misses what was sent
    meanwhile), in the order each process sent them."""

    @abc.abstractmethod
    async def publish(self, message: str) -> None:
        """Send ``message`` (JSON text, up to ``MAX_MESSAGE`` characters) to every listener."""

    @abc.abstractmethod
    def listen(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(message)``, from a thread of the driver's, for each message any
        process publishes (this one's too), and ``"*"`` whenever the listener (re)connects
        (what was sent meanwhile is lost); returns what stops it."""


MAX_MESSAGE = 7_000  # PostgreSQL's NOTIFY takes payloads under 8,000 bytes
