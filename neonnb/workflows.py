"""Workflows over several jobs: chains, and the handle of a batch.

Chains: ``qm.chain(queue, [step1, step2, step3])`` runs the steps in order, each only once
the one before it succeeded; ``ctx.previous`` holds the previous step's result.

Every step's record carries the whole chain (``JobRecord.flow``): its id, the step's index,
every step's encoded job, and the previous result. When a step succeeds, its worker stores
the next step before acknowledging this one (``FlowHook.settle``), with ``enqueue_once`` and
an id made from the chain id and the index, so a step that runs twice (its worker died
before the ack) never starts the next one twice. A step that finally fails stops the chain
in the failed store; retrying it from there resumes the chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import frames, render
from ._loop import run_sync
from .core import Core
from .errors import ConfigError, JobCancelled, JobFailed
from .handles import JobHandle
from .hooks import Hook, Outcome
from .records import FINISHED, JobRecord, Priority, Status

if TYPE_CHECKING:
    import pandas as pd


def step_id(flow_id: str, index: int | str) -> str:
    """Time-ordered like other ids (the flow's creation time first), the same everywhere."""
    return f"{flow_id[:16]}{hashlib.sha256(f'{flow_id}:{index}'.encode()).hexdigest()[:16]}"


def _step(r: JobRecord) -> dict[str, Any]:
    """What a flow keeps of a job it will enqueue later."""
    return {"name": r.name, "payload": r.payload, "priority": r.priority.rank, "max_attempts": r.max_attempts,
            "timeout": r.timeout}


def _job_from(step: dict[str, Any], job_id: str, queue: str, now: float, flow: dict[str, Any] | None) -> JobRecord:
    return JobRecord(
        id=job_id, queue=queue, name=step["name"], payload=step["payload"],
        priority=Priority.from_rank(step["priority"]), max_attempts=step["max_attempts"], timeout=step["timeout"],
        run_at=now, created_at=now, flow=flow,
    )


def first_step(chain_id: str, records: list[JobRecord]) -> JobRecord:
    steps = [_step(r) for r in records]
    first = records[0]
    first.id = step_id(chain_id, 0)
    first.flow = {"chain": {"id": chain_id, "index": 0, "steps": steps, "previous": None}}
    return first


def next_step(record: JobRecord, result: str | None, now: float) -> JobRecord | None:
    """The step after ``record`` (which just succeeded with ``result``), or None at the end."""
    chain = (record.flow or {}).get("chain")
    if chain is None or chain["index"] + 1 >= len(chain["steps"]):
        return None
    index = chain["index"] + 1
    flow = {"chain": {**chain, "index": index, "previous": result}}
    return _job_from(chain["steps"][index], step_id(chain["id"], index), record.queue, now, flow)


def member_id(batch_id: str, index: int) -> str:
    """A batch member's id: the batch's creation time, the member's place, then the batch's
    random part. Time-ordered and FIFO within the batch, and derivable from the batch, so its
    callback can gather every member's result."""
    return f"{batch_id[:16]}{index:08x}{batch_id[24:32]}"


def join_batch(batch_id: str, records: list[JobRecord], then: JobRecord) -> None:
    """Make ``records`` one batch whose last finished job stores ``then``."""
    batch = {"id": batch_id, "size": len(records), "then": _step(then)}
    for index, record in enumerate(records):
        record.id = member_id(batch_id, index)
        record.flow = {**(record.flow or {}), "batch": batch}  # (with its expiry, if it has one)


class FlowHook(Hook):
    """Chains and batches, on the hooks: before a chain step's or batch job's final outcome
    is stored, store what comes next (the chain's next step, the batch's callback), each
    once, whoever tries."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def settle(self, job: JobRecord, outcome: Outcome) -> None:
        if job.flow is None or outcome.status is Status.QUEUED:  # a retry ends nothing
            return
        succeeded = outcome.status is Status.SUCCEEDED
        step = next_step(job, outcome.result, self.core.clock()) if succeeded else None
        if step is not None:
            await self.core.enqueue_once(step)
        await member_finished(self.core, job, outcome.result if succeeded else None)


async def member_finished(core: Core, record: JobRecord, result: str | None) -> None:
    """Count a batch job's final outcome (succeeded with ``result``, failed for good,
    cancelled). Whoever completes the count stores the batch's callback job, once (its id is
    fixed), with every member's result in order (None for those that did not succeed) as its
    ``ctx.previous``."""
    batch = (record.flow or {}).get("batch")
    if batch is None:
        return
    driver, now = core.driver, core.clock()
    results = await driver.mark(record.queue, f"batch:{batch['id']}", record.id, result or "null", now,
                                batch["size"])
    if results is None:
        return
    ids = [member_id(batch["id"], index) for index in range(batch["size"])]
    previous = "[" + ",".join(results.get(job_id) or "null" for job_id in ids) + "]"
    flow = {"after_batch": {"id": batch["id"], "previous": previous}}
    callback = _job_from(batch["then"], step_id(batch["id"], "then"), record.queue, now, flow)
    await core.enqueue_once(callback)


@dataclass
class ChainStatus:
    state: str  # "running", "succeeded", "failed" or "cancelled"
    steps: list[str]  # each step's status; "pending" before it was enqueued
    failed_step: int | None = None  # the index of the step that failed or was cancelled

    def __str__(self) -> str:
        """Steps counted from 1, as people count them: "failed at step 3 of 3: 1 succeeded, ..."."""
        where = f" at step {self.failed_step + 1} of {len(self.steps)}" if self.failed_step is not None else ""
        return f"{self.state}{where}: " + ", ".join(f"{i} {s}" for i, s in enumerate(self.steps, start=1))


class ChainHandle:
    """What ``qm.chain`` returns: the chain's status, its steps' handles and its result."""

    def __init__(self, core: Core, chain_id: str, queue: str, length: int) -> None:
        self.core, self.id, self.queue, self.length = core, chain_id, queue, length

    def __repr__(self) -> str:
        return f"<ChainHandle {self.id} {self.length} steps>"

    def step(self, index: int) -> JobHandle:
        return JobHandle(self.core, step_id(self.id, index), self.queue, stored_later=index > 0)

    async def astatus(self) -> ChainStatus:
        steps = []
        for index in range(self.length):
            record = await self.core.driver.get(step_id(self.id, index), self.queue)
            steps.append("pending" if record is None else record.status.value)
        for ended in (Status.FAILED.value, Status.CANCELLED.value, Status.EXPIRED.value):
            if ended in steps:
                return ChainStatus(ended, steps, steps.index(ended))
        return ChainStatus("succeeded" if steps[-1] == Status.SUCCEEDED.value else "running", steps)

    def status(self) -> ChainStatus:
        return run_sync(self.astatus())

    async def aresult(self, timeout: float | None = None) -> Any:
        """The last step's result; raises JobFailed (or JobCancelled) for the step that ended
        the chain early."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = await self.astatus()
            if status.failed_step is not None:
                return await self.step(status.failed_step).aresult(0)  # raises with the step's error
            if status.steps[-1] != "pending":  # the last step exists: wait on it like any job
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                return await self.step(self.length - 1).aresult(left)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"chain {self.id} not finished after {timeout:g}s: {status}")
            await asyncio.sleep(0.02)

    def result(self, timeout: float | None = None) -> Any:
        return run_sync(self.aresult(timeout))


class BatchHandle(list["JobHandle"]):
    """What ``dispatch_batch`` returns: still the list of its jobs' handles, plus the batch's
    counts and progress, read in one round trip, and the handle of its ``then`` job."""

    def __init__(self, core: Core, handles: list[JobHandle], then: JobHandle | None = None) -> None:
        super().__init__(handles)
        self.core = core
        self.then = then  # the callback job, stored once every job of the batch has finished
        self._done: set[str] = set()  # jobs seen succeeded or gone (past their result TTL)

    def __repr__(self) -> str:
        return f"<BatchHandle {len(self)} jobs>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """In a notebook: one live bar for the batch while its jobs run (neonnb.notebook.live)."""
        return render.VIEWS["batch_handle"](self)  # type: ignore[no-any-return]

    async def acounts(self) -> dict[str, int]:
        """How many of the batch's jobs are pending (queued or delayed), running, done,
        failed and cancelled (jobs past their result TTL count as done). Reads only the jobs
        not seen done before: a done job stays done, so a panel following a large batch reads
        less and less of it."""
        queue = self[0].queue if self else None
        unsettled = [h.id for h in self if h.id not in self._done]
        records = await self.core.driver.get_many(unsettled, queue) if unsettled else []
        found = {record.id for record in records}
        self._done.update(job_id for job_id in unsettled if job_id not in found)
        counts = {"pending": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
        names = {Status.QUEUED: "pending", Status.RUNNING: "running", Status.FAILED: "failed",
                 Status.CANCELLED: "cancelled", Status.EXPIRED: "cancelled"}
        for record in records:
            if record.status is Status.SUCCEEDED:
                self._done.add(record.id)
            else:
                counts[names[record.status]] += 1
        counts["done"] = len(self._done)
        return counts

    def counts(self) -> dict[str, int]:
        return run_sync(self.acounts())

    @property
    def progress(self) -> float:
        """The finished share of the batch, 0.0 to 1.0."""
        return self.finished_share(self.counts())

    def finished_share(self, counts: dict[str, int]) -> float:
        """The share of the batch that ended, however, from its ``counts()``."""
        return 1.0 if not self else (counts["done"] + counts["failed"] + counts["cancelled"]) / len(self)

    def results(self, timeout: float | None = None, errors: str = "raise") -> list[Any]:
        """Every job's result, in order, once all have finished (``timeout``: seconds to wait
        for each). A job that failed or was cancelled: ``errors="raise"`` raises its JobFailed
        (or JobCancelled) once the others are known, ``"return"`` puts the error in its place,
        ``"skip"`` leaves it out."""
        return run_sync(self.aresults(timeout, errors))

    async def aresults(self, timeout: float | None = None, errors: str = "raise") -> list[Any]:
        if errors not in ("raise", "return", "skip"):
            raise ConfigError(f"errors must be 'raise', 'return' or 'skip', got {errors!r}")
        outcomes: list[Any] = []
        for handle in self:
            try:
                outcomes.append(await handle.aresult(timeout))
            except (JobFailed, JobCancelled) as exc:
                outcomes.append(exc)
        first_error = next((o for o in outcomes if isinstance(o, JobFailed | JobCancelled)), None)
        if errors == "raise" and first_error is not None:
            raise first_error
        if errors == "skip":
            return [o for o in outcomes if not isinstance(o, JobFailed | JobCancelled)]
        return outcomes

    def results_df(self, timeout: float | None = None) -> pd.DataFrame:
        """The results as one DataFrame, failed and cancelled jobs left out: DataFrame results
        concatenated in batch order; other results one row per job, indexed by job id."""
        outcomes = self.results(timeout, errors="return")
        kept = [(handle.id, o) for handle, o in zip(self, outcomes, strict=True)
                if not isinstance(o, JobFailed | JobCancelled)]
        return frames.results_frame([o for _, o in kept], [job_id for job_id, _ in kept])

    def as_completed(self, timeout: float | None = None, poll: float = 0.05) -> Iterator[JobHandle]:
        """The batch's handles as their jobs finish (succeeded, failed or cancelled), first
        finished first; TimeoutError if ``timeout`` seconds pass before all have."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting = {handle.id: handle for handle in self}
        queue = self[0].queue if self else None
        while waiting:
            records = run_sync(self.core.driver.get_many(list(waiting), queue))
            found = {record.id: record for record in records}
            for job_id in list(waiting):
                record = found.get(job_id)
                if record is None or record.status in FINISHED:  # gone: past its result TTL
                    yield waiting.pop(job_id)
            if waiting:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{len(waiting)} of the batch's {len(self)} jobs still unfinished")
                time.sleep(poll)
