"""What you hold after a dispatch: ``JobHandle`` (status, progress, output, result, cancel)
and the failed store (``qm.failed``) with its ``FailedJob`` entries."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import frames, render
from ._loop import run_sync
from .artifacts import OFF_LOOP_BYTES, is_reference
from .codec import loads, shown_payload, untag
from .errors import JobCancelled, JobExpired, JobFailed, JobNotFound, PayloadError
from .records import FINISHED, JobRecord, Status, check_job_id, check_page, check_queue_name

if TYPE_CHECKING:
    from .core import Core


class JobHandle:
    """What dispatch returns: the job's id, its live status and progress, and its result."""

    def __init__(self, core: Core, job_id: str, queue: str | None = None, *,
                 stored_later: bool = False) -> None:
        self.core = core
        self.id = check_job_id(job_id)
        self.queue = queue
        # A job stored once others end (a batch's callback, a chain's later step): waiting on
        # it waits for it to appear.
        self.stored_later = stored_later

    def __repr__(self) -> str:
        return f"<JobHandle {self.id}>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """In a notebook: a live progress bar while the job runs (neonnb.notebook.live)."""
        return render.VIEWS["job_handle"](self)  # type: ignore[no-any-return]

    def _repr_html_(self) -> str:
        try:
            record = self.fetch()
        except JobNotFound as exc:
            return render.panel(f"job {self.id}", render.escape(str(exc)), "neonnb-panel neonnb-job")
        rows = [["name", record.name], ["queue", record.queue], ["status", render.status_badge(record.status.value)],
                ["attempts", f"{record.attempts} of {record.max_attempts}"]]
        if record.status is Status.RUNNING or record.progress:
            progress = record.progress or {}
            rows.append(["progress", render.progress_bar(frames.fraction(progress), frames.progress_message(progress))])
        if record.error:
            rows.append(["last error", f"{record.error.get('type')}: {record.error.get('message')}"])
        fields = render.table(["", ""], rows, "neonnb-job-fields")
        return render.panel(f"job {self.id}", fields, "neonnb-panel neonnb-job")

    async def afetch(self) -> JobRecord:
        record = await self.core.driver.get(self.id, self.queue)
        if record is None and self.stored_later:
            raise JobNotFound(f"job {self.id} is not stored yet: it is stored once the jobs before it have ended")
        if record is None:
            raise JobNotFound(
                f"job {self.id} not found: it never existed, was forgotten, or finished more "
                f"than result_ttl ({self.core.config.result_ttl:g}s) ago"
            )
        return record

    def fetch(self) -> JobRecord:
        return run_sync(self.afetch())

    @property
    def status(self) -> Status:
        return self.fetch().status

    @property
    def progress(self) -> dict[str, Any] | None:
        return self.fetch().progress

    @property
    def output(self) -> str | None:
        """What the job's last attempt printed and logged (None: nothing)."""
        return self.fetch().output

    async def await_finished(self, timeout: float | None = None) -> JobRecord:
        """Wait until the job succeeded or failed for good, polling the driver."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            record = await (self.core.driver.get(self.id, self.queue) if self.stored_later else self.afetch())
            if record is not None and record.status in FINISHED:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                state = "not stored yet" if record is None else f"still {record.status.value}"
                raise TimeoutError(f"job {self.id} {state} after {timeout:g}s")
            await asyncio.sleep(pause)
            pause = min(pause * 1.5, 0.2)

    def cancel(self) -> Status | None:
        """See ``QueueManager.cancel``."""
        return run_sync(self.core.cancel(self.id, self.queue))

    async def aresult(self, timeout: float | None = None) -> Any:
        record = await self.await_finished(timeout)
        if record.status is Status.CANCELLED:
            raise JobCancelled(f"job {self.id} ({record.name}) was cancelled")
        if record.status is Status.EXPIRED:
            raise JobExpired(f"job {self.id} ({record.name}) expired before it started: it never ran")
        if record.status is Status.FAILED:
            error = record.error or {}
            raise JobFailed(
                f"job {self.id} ({record.name}) failed after {record.attempts} attempt(s): "
                f"{error.get('type')}: {error.get('message')}",
                error=error,
            )
        if record.result is None:
            return None
        # A big result (a DataFrame) decodes on a thread: the loop serves the other callers meanwhile.
        if len(record.result) < OFF_LOOP_BYTES and not is_reference(record.result):
            return loads(record.result)
        return await asyncio.to_thread(loads, record.result)

    def wait(self, timeout: float | None = None) -> Status:
        """Block until the job finished; returns SUCCEEDED or FAILED."""
        return run_sync(self.await_finished(timeout)).status

    def result(self, timeout: float | None = None) -> Any:
        """Block until the job finished; its stored result, or JobFailed."""
        return run_sync(self.aresult(timeout))


@dataclass(repr=False)
class FailedJob:
    """An entry of the failed store (the spec's ``FailedJob``)."""

    id: str
    queue: str
    name: str
    arguments: Any
    error_type: str
    error: str
    traceback: str
    attempts: int
    failed_at: dt.datetime
    created_at: dt.datetime

    def __repr__(self) -> str:
        return f"<FailedJob {self.id} {self.name}: {self.error_type}>"

    def _repr_html_(self) -> str:
        rows: list[list[Any]] = [["name", self.name], ["queue", self.queue], ["attempts", self.attempts],
                ["failed at", render.when(self.failed_at)], ["error", f"{self.error_type}: {self.error}"],
                ["arguments", render.Raw(f"<code>{render.escape(json.dumps(self.arguments, default=str))}</code>")]]
        trace = f"<details><summary>traceback</summary><pre>{render.escape(self.traceback)}</pre></details>"
        return render.panel(f"failed job {self.id}", render.table(["", ""], rows, "neonnb-failed-fields") + trace,
                          "neonnb-panel neonnb-failed-job")

    @classmethod
    def from_record(cls, record: JobRecord) -> FailedJob:
        error = record.error or {}
        return cls(
            id=record.id,
            queue=record.queue,
            name=record.name,
            arguments=shown_payload(record.payload),
            error_type=str(error.get("type", "")),
            error=str(error.get("message", "")),
            traceback=str(error.get("traceback", "")),
            attempts=record.attempts,
            failed_at=_datetime(record.finished_at or record.created_at),
            created_at=_datetime(record.created_at),
        )


class FailedStore:
    """``qm.failed``: list, inspect, retry and forget jobs that used up their attempts."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def alist(self, limit: int = 50, offset: int = 0, queue: str | None = None) -> list[FailedJob]:
        check_page(limit, offset)
        if queue is not None:
            check_queue_name(queue)
        records = await self.core.driver.list_jobs(status=Status.FAILED, queue=queue, limit=limit, offset=offset)
        return [FailedJob.from_record(r) for r in records]

    async def aget(self, job_id: str) -> FailedJob:
        record = await self.core.driver.get(check_job_id(job_id))
        if record is None or record.status is not Status.FAILED:
            raise JobNotFound(f"job {job_id} is not in the failed store")
        return FailedJob.from_record(record)

    async def atotal(self, queue: str | None = None) -> int:
        """How many jobs the failed store holds (of ``queue``, if given)."""
        counts = await self.core.counting.counts()
        return sum(c.failed for name, c in counts.items() if queue in (None, name))

    async def aretry(self, job_id: str) -> JobHandle:
        """Queue the job again: same id and arguments, attempts reset."""
        if not await self._requeue([check_job_id(job_id)], None):
            raise JobNotFound(f"job {job_id} is not in the failed store")
        return JobHandle(self.core, job_id)

    async def aretry_all(self, queue: str | None = None) -> int:
        if queue is not None:
            check_queue_name(queue)
        return len(await self._requeue(None, queue))

    async def _requeue(self, ids: list[str] | None, queue: str | None) -> list[str]:
        return await self.core.requeue_failed(ids, queue)

    async def aarguments(self, job_id: str) -> Any:
        """A failed job's arguments, whole and decoded (the listing shows them shortened)."""
        record = await self.core.driver.get(check_job_id(job_id))
        if record is None or record.status is not Status.FAILED:
            raise JobNotFound(f"job {job_id} is not in the failed store")
        try:
            return untag(json.loads(record.payload), record.name)
        except (ValueError, RecursionError) as exc:
            raise PayloadError(f"job {job_id}: its stored arguments can't be read ({type(exc).__name__}: "
                               f"{str(exc)[:200]}); `failed.list()` shows them as stored") from None

    def arguments(self, job_id: str) -> Any:
        return run_sync(self.aarguments(job_id))

    async def aforget(self, job_id: str) -> bool:
        forgotten = await self.core.driver.delete_failed([check_job_id(job_id)]) == 1
        if forgotten and self.core.artifacts is not None:  # its big values go with it (others: the sweep)
            await asyncio.to_thread(self.core.artifacts.delete, [job_id])
        return forgotten

    async def aflush(self) -> int:
        return await self.core.driver.delete_failed(None)

    def list(self, limit: int = 50, offset: int = 0, queue: str | None = None) -> list[FailedJob]:
        """Failed jobs, newest first."""
        return run_sync(self.alist(limit, offset, queue))

    def total(self, queue: str | None = None) -> int:
        return run_sync(self.atotal(queue))

    def get(self, job_id: str) -> FailedJob:
        return run_sync(self.aget(job_id))

    def retry(self, job_id: str) -> JobHandle:
        return run_sync(self.aretry(job_id))

    def retry_all(self, queue: str | None = None) -> int:
        return run_sync(self.aretry_all(queue))

    def forget(self, job_id: str) -> bool:
        return run_sync(self.aforget(job_id))

    def flush(self) -> int:
        return run_sync(self.aflush())


def _datetime(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
