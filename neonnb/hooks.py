"""Hooks: the extension point around every job, in the spirit of dramatiq's middleware.

A hook sees each job a worker of its manager runs: as it starts, as it reports progress,
and its outcome (success, a retry, a failure for good, a cancellation), both before that
outcome is stored (``settle``: what must be stored with it, such as a chain's next step)
and after (``after_job``, which by default calls ``on_success``, ``on_retry`` or
``on_failure``). Chains and batches (neonnb.workflows) and the lifecycle events
(``qm.events``) are hooks; users add their own with ``qm.add_hook(hook)``: metrics,
tracing, notifications::

    class CountFailures(neonnb.Hook):
        def __init__(self): self.failed = collections.Counter()
        def on_failure(self, job, error): self.failed[job.name] += 1

    qm.add_hook(CountFailures())

Hooks run on the worker's event loop and must be quick. An exception in ``before_job``,
``on_progress`` or ``after_job`` is logged and ignored: a hook never stops a job or a
worker. One in ``settle`` keeps the outcome from being stored: the worker tries again, and
if it keeps failing the job's lease runs out and it runs again (so ``settle`` must be
idempotent, as a step stored under a fixed id is).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .records import JobRecord, Status

logger = logging.getLogger("neonnb.hooks")


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: ``status`` SUCCEEDED (with the JSON ``result``), QUEUED (a
    retry in ``retry_in`` seconds), FAILED or CANCELLED (with the ``error``: its type,
    message and traceback)."""

    status: Status
    result: str | None = None
    error: dict[str, Any] | None = None
    retry_in: float | None = None


class Hook:
    """Override what you need; every method does nothing by default."""

    def before_job(self, job: JobRecord) -> None:
        """The job's handler is about to run (``job.attempts`` is this attempt's number)."""

    def on_progress(self, job: JobRecord, progress: dict[str, Any]) -> None:
        """The job reported ``{"done": ..., "total": ..., "message": ...}``."""

    async def settle(self, job: JobRecord, outcome: Outcome) -> None:
        """Before ``outcome`` is stored: store what must exist once it is (see the module)."""

    def after_job(self, job: JobRecord, outcome: Outcome) -> None:
        """``outcome`` is stored. Calls ``on_success``, ``on_retry`` or ``on_failure``."""
        if outcome.status is Status.SUCCEEDED:
            self.on_success(job, outcome.result)
        elif outcome.status is Status.QUEUED:
            self.on_retry(job, outcome.error or {}, outcome.retry_in or 0.0)
        else:
            self.on_failure(job, outcome.error or {})

    def on_success(self, job: JobRecord, result: str | None) -> None:
        """The job succeeded; ``result`` is its stored JSON result (None: it returned None)."""

    def on_retry(self, job: JobRecord, error: dict[str, Any], delay: float) -> None:
        """The attempt failed with ``error``; the job runs again in ``delay`` seconds."""

    def on_failure(self, job: JobRecord, error: dict[str, Any]) -> None:
        """The job ended without success: failed for good (it is in the failed store) or
        cancelled (``error["type"]`` says which)."""


_AFTER = ("after_job", "on_success", "on_retry", "on_failure")


class Hooks:
    """A manager's hooks, called in the order they were added. Each call goes only to the
    hooks that define the method (a worker calls them for every job)."""

    def __init__(self) -> None:
        self._hooks: list[Hook] = []
        self._before: list[Hook] = []
        self._progress: list[Hook] = []
        self._settling: list[Hook] = []
        self._after: list[Hook] = []

    def add(self, hook: Hook) -> Callable[[], None]:
        """Add ``hook``; returns a function that removes it."""
        if not isinstance(hook, Hook):
            raise TypeError(f"a hook must be an instance of a neonnb.Hook subclass, got {hook!r}")
        self._hooks.append(hook)
        self._sort()
        return functools.partial(self._remove, hook)

    def _remove(self, hook: Hook) -> None:
        if hook in self._hooks:
            self._hooks.remove(hook)
            self._sort()

    def _sort(self) -> None:
        def defining(*names: str) -> list[Hook]:
            return [h for h in self._hooks if any(getattr(type(h), n) is not getattr(Hook, n) for n in names)]

        self._before, self._progress = defining("before_job"), defining("on_progress")
        self._settling, self._after = defining("settle"), defining(*_AFTER)

    def before_job(self, job: JobRecord) -> None:
        for hook in self._before:
            try:
                hook.before_job(job)
            except Exception:
                _failed(hook, "before_job", job)

    def on_progress(self, job: JobRecord, progress: dict[str, Any]) -> None:
        for hook in self._progress:
            try:
                hook.on_progress(job, progress)
            except Exception:
                _failed(hook, "on_progress", job)

    async def settle(self, job: JobRecord, outcome: Outcome) -> None:
        for hook in self._settling:
            await hook.settle(job, outcome)

    def after_job(self, job: JobRecord, outcome: Outcome) -> None:
        for hook in self._after:
            try:
                hook.after_job(job, outcome)
            except Exception:
                _failed(hook, "after_job", job)


def _failed(hook: Hook, method: str, job: JobRecord) -> None:
    logger.exception("hook %s.%s failed on job %s (%s); the job goes on", type(hook).__qualname__, method, job.id,
                     job.name)


@dataclass
class JobEvent:
    """A lifecycle event: ``started``, ``progress``, ``succeeded``, ``retrying``, ``failed`` or
    ``cancelled``, of a job run by ``worker`` (its id) at ``at`` (seconds since the epoch);
    a job's end carries its attempt's ``duration`` in seconds."""

    kind: str
    job_id: str
    queue: str
    name: str
    attempt: int
    progress: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    retry_in: float | None = None
    worker: str = ""
    at: float = 0.0
    duration: float | None = None

    def as_data(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> JobEvent | None:
        """None for data this version can't read."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return None


_KINDS = {Status.SUCCEEDED: "succeeded", Status.QUEUED: "retrying", Status.FAILED: "failed",
          Status.CANCELLED: "cancelled", Status.EXPIRED: "expired"}


class Events(Hook):
    """``qm.events``: subscribers receive every JobEvent; they must be quick. A hook among
    ``hooks`` while it has subscribers: this process's workers' events arrive on the worker's
    loop. ``remote``, given, is called at the first subscriber and returns what to call after
    the last: it brings other processes' events, which arrive through ``deliver``."""

    def __init__(self, hooks: Hooks, clock: Callable[[], float],
                 remote: Callable[[], Callable[[], None]] | None = None) -> None:
        self._hooks = hooks
        self._clock = clock
        self._remote = remote
        self._subscribers: list[Callable[[JobEvent], None]] = []
        self._remove_hook: Callable[[], None] | None = None
        self._stop_remote: Callable[[], None] | None = None

    def subscribe(self, callback: Callable[[JobEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for each event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        if self._remove_hook is None:
            self._remove_hook = self._hooks.add(self)
            if self._remote is not None:
                self._stop_remote = self._remote()
        return functools.partial(self._unsubscribe, callback)

    def _unsubscribe(self, callback: Callable[[JobEvent], None]) -> None:
        self._subscribers.remove(callback)
        if not self._subscribers and self._remove_hook is not None:
            self._remove_hook()
            self._remove_hook = None
            if self._stop_remote is not None:
                self._stop_remote()
                self._stop_remote = None

    def forget_remote(self) -> None:
        """Other processes' events stopped (the store closes): none until the next first subscriber."""
        self._stop_remote = None

    def before_job(self, job: JobRecord) -> None:
        self.deliver(event_of("started", job, self._clock()))

    def on_progress(self, job: JobRecord, progress: dict[str, Any]) -> None:
        self.deliver(event_of("progress", job, self._clock(), progress=progress))

    def after_job(self, job: JobRecord, outcome: Outcome) -> None:
        self.deliver(ended_event(job, outcome, self._clock()))

    def deliver(self, event: JobEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                logger.exception("event subscriber %r failed on %s", callback, event.kind)


def event_of(kind: str, job: JobRecord, now: float, **details: Any) -> JobEvent:
    return JobEvent(kind, job.id, job.queue, job.name, job.attempts, worker=job.worker_id or "", at=now, **details)


def ended_event(job: JobRecord, outcome: Outcome, now: float) -> JobEvent:
    duration = None if job.started_at is None else max(now - job.started_at, 0.0)
    if outcome.status is Status.SUCCEEDED:
        return event_of("succeeded", job, now, duration=duration)
    return event_of(_KINDS[outcome.status], job, now, error=outcome.error, retry_in=outcome.retry_in,
                    duration=duration)
