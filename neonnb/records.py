"""The bottom layer: a job as stored (``JobRecord``), its ``Status`` and ``Priority``, the
counts of a queue, the names every store can hold, and how a stored record is read back.
Plain data and pure functions: the drivers import this module and nothing above it.

``RECORD_FIELDS`` lists the stored fields once; the SQL columns, the Redis hash fields and
the Lua scripts' field list are checked against it (tests/test_layers.py).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError


class Priority(str, enum.Enum):
    """The spec's ``PriorityHigh``, ``PriorityNormal`` and ``PriorityLow``."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Sort key: 0 runs first."""
        return _RANKS[self]

    @classmethod
    def from_rank(cls, rank: int) -> Priority:
        return _BY_RANK[rank]


def parse_priority(value: Priority | str) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise ConfigError(f"priority must be 'high', 'normal' or 'low', got {value!r}") from None


_RANKS = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
_BY_RANK = {rank: p for p, rank in _RANKS.items()}
_BANDS = {p.value for p in Priority}


# Limits every store can hold (the SQL columns' widths), checked before anything is stored.
MAX_QUEUE_NAME, MAX_JOB_NAME, MAX_UNIQUE_KEY, MAX_WORKER_ID = 200, 300, 300, 100


def split_selector(selector: str) -> tuple[str, Priority | None]:
    """A worker's queue selector: ``"emails"`` (every priority) or ``"emails:high"``, the
    spec's ``qm.Worker("emails:high", 5)``: only that priority band of queue ``emails``."""
    queue, colon, band = selector.rpartition(":")
    if colon and queue and band in _BANDS:
        return queue, Priority(band)
    return selector, None


def check_queue_name(queue: Any) -> str:
    """``queue`` if every store can keep it; else ConfigError saying what is wrong."""
    if not isinstance(queue, str) or not queue:
        raise ConfigError(f"a queue name must be a non-empty string, got {queue!r}")
    return _checked_queue_name(queue)


@functools.lru_cache(maxsize=1024)  # a process dispatches to a few queues, again and again
def _checked_queue_name(queue: str) -> str:
    problem = None
    if len(queue) > MAX_QUEUE_NAME:
        problem = f"is {len(queue)} characters long; at most {MAX_QUEUE_NAME} fit"
    elif any(c in queue for c in "{}\x00"):
        problem = "contains '{', '}' or a NUL byte, which Redis's hash tags and SQL text can't hold"
    elif split_selector(queue)[1] is not None:
        band = queue.rpartition(":")[2]
        problem = (f"ends in ':{band}', which names a worker's priority band: dispatch to "
                   f"{queue.rpartition(':')[0]!r} with priority {band!r} instead")
    if problem:
        raise ConfigError(f"queue name {queue[:60]!r}{'...' if len(queue) > 60 else ''} {problem}")
    return queue


def check_text(value: str, limit: int, what: str) -> str:
    if len(value) > limit or "\x00" in value:
        raise ConfigError(f"{what} {value[:60]!r}... must be at most {limit} characters, without NUL bytes "
                          f"(it has {len(value)})")
    return value


class Status(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # not started before its expiry (dispatch(..., expires=)): it never ran


FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED)


def parse_status(value: Status | str) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise ConfigError(f"unknown status {value!r}: use one of {', '.join(s.value for s in Status)}") from None


def new_job_id() -> str:
    """32 hex digits: nanoseconds since the epoch, then 64 random bits. Ids sort by creation
    time, so the databases' id indexes grow at one end instead of splitting pages everywhere,
    and Redis orders jobs due at the same moment by them (FIFO). Within a process they strictly
    increase even if the clock stalls or steps back."""
    global _last_id_time
    with _id_lock:
        _last_id_time = max(time.time_ns(), _last_id_time + 1)
        stamp = _last_id_time
    return f"{stamp:016x}{os.urandom(8).hex()}"


_id_lock = threading.Lock()
_last_id_time = 0


@dataclass
class JobRecord:
    """A job as a driver stores it. Times are seconds since the epoch.

    ``attempts`` counts reservations, so a job whose worker died has that attempt counted.
    ``error`` holds ``type``, ``message`` and ``traceback`` of the last failure.
    """

    id: str
    queue: str
    name: str
    payload: str
    priority: Priority = Priority.NORMAL
    status: Status = Status.QUEUED
    attempts: int = 0
    max_attempts: int = 4
    timeout: float | None = None
    run_at: float = 0.0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    lease_expires: float | None = None
    worker_id: str | None = None
    progress: dict[str, Any] | None = None
    result: str | None = None
    error: dict[str, Any] | None = None
    output: str | None = None  # what the last attempt printed and logged (neonnb.capture)
    # What the job carries beyond its arguments: a chain step's or batch member's place in it
    # (neonnb.workflows), and when it expires ("expires_at", an epoch time).
    flow: dict[str, Any] | None = None
    unique_key: str | None = None  # at most one queued or running job per key
    cancel_requested: bool = False  # someone asked this running job to stop
    broken: str | None = None  # what could not be read of the stored record (never stored)

    @property
    def expires_at(self) -> float | None:
        """When a job not started by then ends EXPIRED instead of running (None: never)."""
        value = (self.flow or {}).get("expires_at")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None



# What a store keeps of a record, in order ("broken" is what reading found, never stored).
RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord) if f.name != "broken")


class JobPage(list[JobRecord]):
    """A page of jobs, newest first (``Driver.list_jobs``); ``cursor`` continues after its
    last job (None: this is the last page)."""

    def __init__(self, records: list[JobRecord], cursor: str | None = None) -> None:
        super().__init__(records)
        self.cursor = cursor


def listed_by_finish(status: Status | None) -> bool:
    """Whether a listing of ``status`` orders by when jobs finished (finished states), not
    by when they were created (any status, queued, running)."""
    return status in FINISHED and status is not Status.EXPIRED  # (expired: by creation, as stores index it)


def page_cursor(position: float, tiebreak: str | int) -> str:
    """The cursor after a job listed at ``position`` (its time in the listing's order), with
    ``tiebreak`` (its id, or the store's own row number) ordering jobs of equal position."""
    return f"{position!r}/{tiebreak}"


def read_cursor(cursor: str) -> tuple[float, str]:
    position, _, tiebreak = cursor.partition("/")
    try:
        value = float(position)
    except ValueError:
        raise bad_cursor(cursor) from None
    if not math.isfinite(value) or not _ID.fullmatch(tiebreak):
        raise bad_cursor(cursor)
    return value, tiebreak


MAX_PAGE = 10_000  # jobs in one listing: more is a mistake (and a huge number overflows SQL's integers)
MAX_OFFSET = 2**31 - 1
_ID = re.compile(r"[0-9A-Za-z_.:-]{1,100}")  # what new_job_id makes, and room for ids made elsewhere


def check_job_id(job_id: Any) -> str:
    """``job_id`` if it can be an id; else ConfigError saying what is wrong (a NUL byte, say,
    that a store would refuse with an error of its own)."""
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise ConfigError(f"{job_id!r} is not a job id: ids are up to 100 letters, digits, '_', '.', ':' or '-'")
    return job_id


def check_page(limit: Any, offset: Any = 0) -> tuple[int, int]:
    """``limit`` and ``offset`` of a listing if they are in range; else ConfigError."""
    for name, value, least, most in (("limit", limit, 1, MAX_PAGE), ("offset", offset, 0, MAX_OFFSET)):
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            raise ConfigError(f"{name} must be an integer from {least} to {most}, got {value!r}")
    return limit, offset


def bad_cursor(cursor: str) -> ConfigError:
    return ConfigError(f"cursor {cursor!r} is not one a page of jobs gave: pass a page's .cursor as it was")


def record_data(record: JobRecord) -> dict[str, Any]:
    """A record as plain JSON data, statuses and priorities by name (the CLI's ``--json``)."""
    data = {name: getattr(record, name) for name in RECORD_FIELDS}
    data["status"], data["priority"] = record.status.value, record.priority.value
    if record.broken is not None:
        data["broken"] = record.broken
    return data


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None or value == "" else _text(value)


def _optional_number(value: Any) -> float | None:
    return None if value is None or value == "" else _number(value)


def _number(value: Any) -> float:
    number = float(value)
    if number != number:
        raise ValueError("NaN")
    return number


def _json_object(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


_STATUSES = {status.value: status for status in Status}
_PRIORITIES: dict[int | str, Priority] = {key: p for p in Priority for key in (p.rank, str(p.rank))}

# How each stored field is read; Redis keeps text (""/absent: none), SQL typed values.
_READERS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("id", _text), ("queue", _text), ("name", _text), ("payload", _text),
    ("priority", _PRIORITIES.__getitem__), ("status", _STATUSES.__getitem__),
    ("attempts", int), ("max_attempts", int), ("timeout", _optional_number), ("run_at", _number),
    ("created_at", _number), ("started_at", _optional_number), ("finished_at", _optional_number),
    ("lease_expires", _optional_number), ("worker_id", _optional_text), ("progress", _json_object),
    ("result", _optional_text), ("error", _json_object), ("output", _optional_text), ("flow", _json_object),
    ("unique_key", _optional_text), ("cancel_requested", lambda v: v in (1, "1", True)),
)


def read_record(stored: Any) -> JobRecord:
    """A job's record from its stored fields (a mapping: a SQL row's, a Redis hash). A field
    that can't be read (a bad JSON flow, text where a number goes, an unknown status, nesting
    too deep, a missing field) keeps its default and the record says what is wrong in
    ``broken``: a worker sends such a job to the failed store, listings show it, and nothing
    else breaks."""
    try:  # every field readable: the usual case, and the claim's hot path
        return JobRecord(**{name: read(stored[name]) for name, read in _READERS if name in stored})
    except Exception:  # RecursionError too: JSON nested too deep
        return _read_broken(stored)


def _read_broken(stored: Any) -> JobRecord:
    values: dict[str, Any] = {}
    problems = []
    for name, read in _READERS:
        if name not in stored:
            if name in ("id", "queue", "name", "payload"):
                values[name] = ""
                problems.append(f"{name} missing")
            continue
        try:
            values[name] = read(stored[name])
        except Exception as exc:
            shown = repr(stored[name])
            problems.append(f"{name} {shown[:40]}{'...' if len(shown) > 40 else ''} ({type(exc).__name__})")
    record = JobRecord(**values)
    record.broken = "can't read " + ", ".join(problems)
    return record


# --- the state changes: the fields each move of a job sets, written once for the drivers that
# store fields (memory, SQL; the Redis Lua scripts make the same moves in the store).


def given_back() -> dict[str, Any]:
    """Back to the queue as it was, nobody's (a worker stopping gives back what it can't finish)."""
    return {"status": Status.QUEUED, "worker_id": None, "lease_expires": None}


def requeued(run_at: float) -> dict[str, Any]:
    """Back to the queue, due at ``run_at``, nobody's (a dead worker's job recovered)."""
    return {**given_back(), "run_at": run_at}


def retried(run_at: float, error: dict[str, Any]) -> dict[str, Any]:
    """An attempt failed with ``error``; the job runs again at ``run_at``, its attempt counted."""
    return {**requeued(run_at), "error": error}


def ended(status: Status, now: float, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job ended (SUCCEEDED, FAILED, CANCELLED or EXPIRED) at ``now``."""
    changes: dict[str, Any] = {"status": status, "finished_at": now, "lease_expires": None}
    if error is not None:
        changes["error"] = error
    return changes


def revived(now: float) -> dict[str, Any]:
    """A failed job retried from the failed store: queued now, its attempts and progress reset."""
    return {**requeued(now), "attempts": 0, "finished_at": None, "progress": None}


@dataclass
class QueueCounts:
    """How many jobs of one queue are in each state; ``waiting`` is split by priority."""

    waiting: dict[str, int] = field(default_factory=lambda: {"high": 0, "normal": 0, "low": 0})
    delayed: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    paused: bool = False  # no worker claims its jobs until it is resumed
    rate: str | None = None  # at most so many of its jobs start per window (qm.limit_queue)
    concurrency: int | None = None  # at most so many of its jobs run at once (qm.limit_queue)

    @property
    def size(self) -> int:
        """Jobs not yet started: waiting now plus delayed."""
        return sum(self.waiting.values()) + self.delayed

    @property
    def total(self) -> int:
        """Jobs in every state."""
        return self.size + self.running + self.succeeded + self.failed + self.cancelled + self.expired

    def as_data(self) -> dict[str, Any]:
        """Plain JSON data, with the size."""
        return {**dataclasses.asdict(self), "size": self.size}


@dataclass
class Recovered:
    """What ``recover_expired`` found: the requeued ids, and the jobs that used up their
    attempts (still RUNNING under their dead worker's id)."""

    requeued: list[str] = field(default_factory=list)
    exhausted: list[JobRecord] = field(default_factory=list)


@dataclass(kw_only=True)
class Member:
    """A process's entry in the store's registry, from any process on any machine (workers
    and schedulers): registered as it starts, refreshed every ``beat`` seconds, removed as it
    stops. One that missed three beats (killed, its machine gone) is lost; housekeeping drops
    it later."""

    kind: ClassVar[str]
    id: str
    host: str
    pid: int
    started_at: float
    last_seen: float
    beat: float
    stopping: bool = False

    def state(self, now: float) -> str:
        """"running", "stopping" (finishing what it started) or "lost"."""
        if now - self.last_seen > 3 * self.beat:
            return "lost"
        return "stopping" if self.stopping else "running"

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, **dataclasses.asdict(self)}, separators=(",", ":"))

    def as_data(self, now: float) -> dict[str, Any]:
        """Plain JSON data, with the state as of ``now``."""
        return {**dataclasses.asdict(self), "state": self.state(now)}


@dataclass(kw_only=True)
class WorkerInfo(Member):
    """A worker as the store knows it (``qm.known_workers()``)."""

    kind: ClassVar[str] = "worker"
    queues: list[str]
    concurrency: int
    running: list[str] = field(default_factory=list)  # the ids of the jobs it runs
    jobs_done: int = 0
    jobs_failed: int = 0


@dataclass(kw_only=True)
class SchedulerInfo(Member):
    """A running scheduler as the store knows it, with its schedules (``qm.known_schedules()``):
    each a dict of name, rule, tz, queue, job, last_tick and next_tick."""

    kind: ClassVar[str] = "scheduler"
    schedules: list[dict[str, Any]] = field(default_factory=list)


def schedules_data(schedulers: list[SchedulerInfo], now: float) -> list[dict[str, Any]]:
    """Every schedule of these schedulers, each with the scheduler that runs it and that
    one's state, by name (a schedule several schedulers run is listed once per scheduler)."""
    rows = [{**schedule, "scheduler": info.id, "state": info.state(now)}
            for info in schedulers for schedule in info.schedules]
    return sorted(rows, key=lambda row: (str(row.get("name")), row["scheduler"]))


@dataclass(kw_only=True)
class ListenerInfo(Member):
    """A process whose ``qm.events`` has subscribers: while one is registered, workers in
    other processes publish their job events (neonnb.feed)."""

    kind: ClassVar[str] = "listener"


MEMBER_KINDS: dict[str, type[Member]] = {"worker": WorkerInfo, "scheduler": SchedulerInfo, "listener": ListenerInfo}


def read_member(text: str) -> Member | None:
    """A registry entry; None for one this version can't read (written by hand, or by
    another version). Entries without a kind are workers (written before schedulers were)."""
    try:
        data = json.loads(text)
        cls = MEMBER_KINDS[data.pop("kind", "worker")]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
