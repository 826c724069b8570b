"""In-process driver: thread-safe, nothing on disk. For development, tests and notebooks."""

from __future__ import annotations

import collections
import copy
import heapq
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..records import (
    JobPage,
    JobRecord,
    Member,
    QueueCounts,
    Recovered,
    Status,
    ended,
    given_back,
    listed_by_finish,
    page_cursor,
    read_cursor,
    read_member,
    requeued,
    retried,
    revived,
)
from .base import BlockingEnqueue, Driver


class MemoryDriver(Driver, BlockingEnqueue):
    """Jobs in a dict; per queue a heap of not-yet-promoted jobs by due time, and per queue
    and priority a heap of due jobs by (due time, sequence). Heap entries are invalidated
    lazily: an entry counts only while its sequence number is the job's current one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}
        self._marks: dict[str, dict[str, tuple[str, float]]] = {}  # group -> member -> (value, when)
        self._entry_seq: dict[str, int] = {}
        self._scheduled: dict[str, list[tuple[float, int, str]]] = {}
        self._ready: dict[tuple[str, int], list[tuple[float, int, str]]] = {}
        self._seq = 0
        self._members: dict[str, str] = {}  # id -> the worker's or scheduler's entry as JSON
        self._queue_settings: dict[str, dict[str, Any]] = {}
        self._slots: dict[tuple[str, str], set[str]] = {}  # (queue, key) -> the jobs holding its slots
        self._permits: dict[str, collections.deque[float]] = {}  # key -> when its permits were taken

    def _schedule(self, record: JobRecord) -> None:
        self._seq += 1
        self._entry_seq[record.id] = self._seq
        heapq.heappush(self._scheduled.setdefault(record.queue, []), (record.run_at, self._seq, record.id))

    def _live(self, job_id: str, seq: int) -> bool:
        return self._entry_seq.get(job_id) == seq

    def _promote_due(self, queue: str, now: float) -> None:
        scheduled = self._scheduled.get(queue)
        while scheduled and scheduled[0][0] <= now:
            run_at, seq, job_id = heapq.heappop(scheduled)
            if self._live(job_id, seq):
                rank = self._jobs[job_id].priority.rank
                heapq.heappush(self._ready.setdefault((queue, rank), []), (run_at, seq, job_id))

    def _owned(self, job_id: str, worker_id: str) -> JobRecord | None:
        record = self._jobs.get(job_id)
        if record is None or record.status is not Status.RUNNING or record.worker_id != worker_id:
            return None
        return record

    async def enqueue(self, records: Sequence[JobRecord]) -> None:
        self.enqueue_blocking(records)

    def enqueue_blocking(self, records: Sequence[JobRecord]) -> bool:
        with self._lock:
            for record in records:
                self._store(record)
        return True

    async def enqueue_once(self, record: JobRecord) -> bool:
        with self._lock:
            if record.id in self._jobs:
                return False
            self._store(record)
            return True

    async def enqueue_unique(self, record: JobRecord) -> str:
        with self._lock:
            for job in self._jobs.values():
                if job.unique_key == record.unique_key and job.status in (Status.QUEUED, Status.RUNNING):
                    return job.id
            self._store(record)
            return record.id

    async def mark(self, queue: str, group: str, member: str, value: str, now: float,
                   complete_at: int) -> dict[str, str] | None:
        with self._lock:
            members = self._marks.setdefault(group, {})
            members.setdefault(member, (value, now))
            return {m: v for m, (v, _) in members.items()} if len(members) >= complete_at else None

    def _store(self, record: JobRecord) -> None:
        stored = copy.copy(record)
        self._jobs[record.id] = stored
        self._schedule(stored)

    async def reserve(
        self, queues: Sequence[str], limit: int, worker_id: str, now: float, lease_expires: float,
        ranks: Sequence[int] | None = None,
    ) -> list[JobRecord]:
        claimed: list[JobRecord] = []
        bands = [(rank, queue) for rank in sorted(range(3) if ranks is None else ranks) for queue in queues]
        with self._lock:
            for queue in queues:
                self._promote_due(queue, now)
            while len(claimed) < limit:
                best: tuple[str, int] | None = None  # (queue, rank)
                for rank, queue in bands:  # a higher priority first, then the earliest due
                    ready = self._ready.get((queue, rank))
                    while ready and not self._live(ready[0][2], ready[0][1]):
                        heapq.heappop(ready)
                    if ready and (best is None or (rank == best[1] and ready[0] < self._ready[best][0])):
                        best = (queue, rank)
                if best is None:
                    break
                job_id = heapq.heappop(self._ready[best])[2]
                del self._entry_seq[job_id]
                record = self._jobs[job_id]
                record.status = Status.RUNNING
                record.attempts += 1
                record.worker_id = worker_id
                record.lease_expires = lease_expires
                record.started_at = now
                claimed.append(JobRecord(**record.__dict__))  # a copy; copy.copy is slower
        return claimed

    async def extend_leases(self, jobs: Sequence[JobRecord], worker_id: str, lease_expires: float) -> list[str]:
        stopping = []
        with self._lock:
            for job in jobs:
                record = self._owned(job.id, worker_id)
                if record is not None:
                    record.lease_expires = lease_expires
                    if record.cancel_requested:
                        stopping.append(record.id)
        return stopping

    async def take_permit(self, key: str, count: int, window: float, token: str) -> float:
        with self._lock:
            now = time.time()
            taken = self._permits.setdefault(key, collections.deque())
            while taken and taken[0] <= now - window:
                taken.popleft()
            if len(taken) < count:
                taken.append(now)
                return 0.0
            return taken[0] + window - now

    async def take_slot(self, queue: str, key: str, limit: int, job_id: str) -> bool:
        with self._lock:
            holders = self._slots.setdefault((queue, key), set())
            holders -= {held for held in holders if held != job_id and (
                (record := self._jobs.get(held)) is None or record.status is not Status.RUNNING)}
            if job_id in holders or len(holders) < limit:
                holders.add(job_id)
                return True
            return False

    async def release_slot(self, queue: str, key: str, job_id: str) -> None:
        with self._lock:
            self._slots.get((queue, key), set()).discard(job_id)

    async def configure_queue(self, queue: str, settings: dict[str, Any]) -> None:
        with self._lock:
            merged = {**self._queue_settings.get(queue, {}), **settings}
            self._queue_settings[queue] = {name: value for name, value in merged.items() if value is not None}

    async def queue_settings(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {queue: dict(settings) for queue, settings in self._queue_settings.items() if settings}

    async def stopping(self, jobs: Sequence[JobRecord], worker_id: str) -> list[str]:
        with self._lock:
            return [job.id for job in jobs
                    if (record := self._owned(job.id, worker_id)) is not None and record.cancel_requested]

    async def reacquire(self, jobs: Sequence[JobRecord], worker_id: str, lease_expires: float) -> list[str]:
        taken = []
        with self._lock:
            for job in jobs:
                record = self._jobs.get(job.id)
                if record is not None and record.status is Status.QUEUED and record.attempts in (
                        job.attempts, job.attempts - 1):
                    self._entry_seq.pop(job.id, None)  # its queue entries lapse
                    record.status, record.attempts, record.worker_id, record.lease_expires = (
                        Status.RUNNING, job.attempts, worker_id, lease_expires)
                    taken.append(job.id)
        return taken

    async def cancel(self, job_id: str, queue: str | None, now: float) -> Status | None:
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            was = record.status
            if was is Status.QUEUED:
                self._entry_seq.pop(job_id, None)  # its heap entries are dead now
                self._apply(record, ended(Status.CANCELLED, now))
            elif was is Status.RUNNING:
                record.cancel_requested = True
            return was

    async def set_progress(self, job: JobRecord, worker_id: str, progress: dict[str, Any]) -> None:
        with self._lock:
            record = self._owned(job.id, worker_id)
            if record is not None:
                record.progress = dict(progress)

    async def save_output(self, job: JobRecord, worker_id: str, output: str) -> None:
        with self._lock:
            record = self._owned(job.id, worker_id)
            if record is not None:
                record.output = output

    def _apply(self, record: JobRecord, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            setattr(record, name, value)
        if record.status is Status.QUEUED:
            self._schedule(record)

    def _apply_owned(self, job_id: str, worker_id: str, changes: dict[str, Any]) -> bool:
        with self._lock:
            record = self._owned(job_id, worker_id)
            if record is None:
                return False
            self._apply(record, changes)
            return True

    async def complete(self, results: Sequence[tuple[JobRecord, str | None]], worker_id: str, now: float) -> list[str]:
        succeeded = ended(Status.SUCCEEDED, now)
        return [job.id for job, result in results
                if self._apply_owned(job.id, worker_id, {**succeeded, "result": result})]

    async def retry(self, job: JobRecord, worker_id: str, run_at: float, error: dict[str, Any]) -> bool:
        return self._apply_owned(job.id, worker_id, retried(run_at, error))

    async def fail(
        self, job: JobRecord, worker_id: str, now: float, error: dict[str, Any], status: Status = Status.FAILED
    ) -> bool:
        return self._apply_owned(job.id, worker_id, ended(status, now, error))

    async def release(self, jobs: Sequence[JobRecord], worker_id: str, now: float) -> int:
        released = 0
        with self._lock:
            for job in jobs:
                record = self._owned(job.id, worker_id)
                if record is not None:
                    record.attempts -= 1
                    self._apply(record, given_back())
                    released += 1
        return released

    async def postpone(self, job: JobRecord, worker_id: str, run_at: float) -> bool:
        with self._lock:
            record = self._owned(job.id, worker_id)
            if record is None:
                return False
            record.attempts -= 1
            self._apply(record, requeued(run_at))
            return True

    async def release_unheld(self, queues: Sequence[str], worker_id: str, held: Sequence[str], now: float) -> int:
        with self._lock:
            unheld = [r for r in self._jobs.values() if r.status is Status.RUNNING and r.worker_id == worker_id
                      and r.queue in queues and r.id not in held]
        return await self.release(unheld, worker_id, now)

    async def recover_expired(self, now: float) -> Recovered:
        recovered = Recovered()
        with self._lock:
            for record in self._jobs.values():
                if record.status is Status.RUNNING and record.lease_expires is not None and record.lease_expires < now:
                    if record.attempts >= record.max_attempts:
                        recovered.exhausted.append(replace(record))
                    else:
                        self._apply(record, requeued(now))
                        recovered.requeued.append(record.id)
        return recovered

    async def purge_finished(self, before: float) -> int:
        with self._lock:
            old = [
                r.id for r in self._jobs.values()
                if r.status in (Status.SUCCEEDED, Status.CANCELLED, Status.EXPIRED) and r.finished_at is not None
                and r.finished_at < before
            ]
            for job_id in old:
                del self._jobs[job_id]
            for group in [g for g, members in self._marks.items() if max(t for _, t in members.values()) < before]:
                del self._marks[group]
        return len(old)

    async def purge_queued(self, queue: str) -> int:
        with self._lock:
            doomed = [r.id for r in self._jobs.values() if r.queue == queue and r.status is Status.QUEUED]
            for job_id in doomed:
                del self._jobs[job_id]
        return len(doomed)

    async def get(self, job_id: str, queue: str | None = None) -> JobRecord | None:
        with self._lock:
            record = self._jobs.get(job_id)
            return None if record is None else replace(record)

    async def get_many(self, job_ids: Sequence[str], queue: str | None = None) -> list[JobRecord]:
        with self._lock:
            return [replace(self._jobs[i]) for i in job_ids if i in self._jobs]

    async def list_jobs(
        self, *, status: Status | None = None, queue: str | None = None, limit: int = 100, offset: int = 0,
        cursor: str | None = None,
    ) -> JobPage:
        by_finish = listed_by_finish(status)

        def key(r: JobRecord) -> tuple[float, str]:
            return ((r.finished_at or 0.0) if by_finish else r.created_at), r.id

        after = None if cursor is None else read_cursor(cursor)
        with self._lock:
            matching = [
                r for r in self._jobs.values()
                if (status is None or r.status is status) and (queue is None or r.queue == queue)
                and (after is None or key(r) < after)
            ]
        matching.sort(key=key, reverse=True)
        page = [replace(r) for r in matching[offset : offset + limit + 1]]
        more = len(page) > limit
        return JobPage(page[:limit], page_cursor(*key(page[limit - 1])) if more else None)

    async def counts(self, now: float) -> dict[str, QueueCounts]:
        result: dict[str, QueueCounts] = {}
        with self._lock:
            for r in self._jobs.values():
                c = result.setdefault(r.queue, QueueCounts())
                if r.status is Status.QUEUED:
                    if r.run_at > now:
                        c.delayed += 1
                    else:
                        c.waiting[r.priority.value] += 1
                else:
                    setattr(c, r.status.value, getattr(c, r.status.value) + 1)
        return result

    async def requeue_failed(self, ids: Sequence[str] | None, queue: str | None, now: float) -> list[str]:
        moved = []
        with self._lock:
            candidates = list(self._jobs) if ids is None else ids
            for job_id in candidates:
                record = self._jobs.get(job_id)
                if record is None or record.status is not Status.FAILED:
                    continue
                if queue is not None and record.queue != queue:
                    continue
                self._apply(record, revived(now))
                moved.append(job_id)
        return moved

    async def delete_failed(self, ids: Sequence[str] | None) -> int:
        with self._lock:
            candidates = list(self._jobs) if ids is None else ids
            doomed = [i for i in candidates if i in self._jobs and self._jobs[i].status is Status.FAILED]
            for job_id in doomed:
                del self._jobs[job_id]
        return len(doomed)

    async def save_member(self, info: Member) -> None:
        with self._lock:
            self._members[info.id] = info.to_json()  # a copy: later changes to info are not stored

    async def remove_member(self, member_id: str) -> None:
        with self._lock:
            self._members.pop(member_id, None)

    async def list_members(self) -> list[Member]:
        with self._lock:
            stored = list(self._members.values())
        return [info for text in stored if (info := read_member(text)) is not None]

    async def drop_members(self, seen_before: float) -> int:
        gone = [info.id for info in await self.list_members() if info.last_seen < seen_before]
        with self._lock:
            for worker_id in gone:
                self._members.pop(worker_id, None)
        return len(gone)

