"""Cron and recurring schedules: ``qm.scheduler()``.

    s = qm.scheduler()
    s.cron("nightly-report", "0 2 * * *", BuildReport(), tz="Europe/Berlin")
    s.cron("heartbeat", "*/10 * * * * *", Ping())        # six fields: seconds first
    s.every("refresh", "5m", refresh.call("prices"))
    s.start()                                           # on the background loop; or s.run()

Single fire with many schedulers: the job of a tick gets an id made from the schedule's name
and the tick's time, and the driver stores a job only if no job with that id exists
(``enqueue_once``, atomic in every driver). So any number of schedulers, in kernels or on
machines, may run the same schedules: each tick is dispatched exactly once.

Missed ticks: a scheduler looks back ``catch_up`` (default 0: skip what was missed) when it
starts, and dispatches the ticks of that window that no one dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._loop import run_sync, submit
from .config import parse_duration
from .errors import ConfigError, MissingDependency

if TYPE_CHECKING:
    import concurrent.futures

    import pandas as pd

    from .handles import JobHandle
    from .manager import QueueManager

logger = logging.getLogger("neonnb.scheduler")

MAX_CATCH_UP_TICKS = 1000  # a catch-up window never dispatches more than this per schedule


@dataclass
class Schedule:
    """One named schedule: a cron expression or a fixed interval, and the job it dispatches."""

    name: str
    job: Any
    queue: str
    cron: str | None = None
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    interval: float | None = None
    catch_up: float = 0.0
    last_tick: float | None = None  # the latest tick this scheduler dispatched or saw dispatched

    def ticks(self, after: float, until: float) -> list[float]:
        """The tick times in (after, until], oldest first, at most MAX_CATCH_UP_TICKS."""
        out: list[float] = []
        tick = self.next_tick(after)
        while tick <= until and len(out) < MAX_CATCH_UP_TICKS:
            out.append(tick)
            tick = self.next_tick(tick)
        return out

    def next_tick(self, after: float) -> float:
        if self.interval is not None:
            # Ticks sit on multiples of the interval since the epoch, so every scheduler
            # computes the same ones whenever it started.
            return (after // self.interval + 1) * self.interval
        assert self.cron is not None
        start = dt.datetime.fromtimestamp(after, self.tz)
        return float(_croniter(self.cron, start).get_next(float))

    def job_id(self, tick: float) -> str:
        """The id of this tick's job: the same in every process, and time-ordered like the
        ids of ordinary jobs (nanoseconds first)."""
        digest = hashlib.sha256(f"{self.name}\0{tick!r}".encode()).hexdigest()
        return f"{round(tick * 1e9):016x}{digest[:16]}"


class Scheduler:
    def __init__(self, manager: QueueManager, *, poll_interval: float = 1.0) -> None:
        self.manager = manager
        self.poll_interval = poll_interval
        self.schedules: dict[str, Schedule] = {}
        self._checked: dict[str, float] = {}  # per schedule: ticks up to here are handled
        self._task: concurrent.futures.Future[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<neonnb.Scheduler {len(self.schedules)} schedule(s) {'running' if self.is_running else 'stopped'}>"

    # --- declaring schedules ---------------------------------------------------------------

    def cron(self, name: str, expr: str, job: Any, *, tz: str = "UTC", queue: str | None = None,
             catch_up: Any = 0) -> Schedule:
        """Dispatch ``job`` on the cron expression ``expr``: five fields, or six with seconds
        first (``"*/10 * * * * *"``), in time zone ``tz``."""
        _croniter(expr, dt.datetime.now(dt.timezone.utc))  # refuses a bad expression now
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"unknown time zone {tz!r} for schedule {name!r}: use an IANA name such as "
                              "'Europe/Berlin' or 'UTC'") from None
        return self._add(Schedule(name, job, queue or self.manager.config.default_queue, cron=expr, tz=zone,
                                  catch_up=parse_duration(catch_up, f"schedule {name!r} catch_up")))

    def every(self, name: str, interval: Any, job: Any, *, queue: str | None = None, catch_up: Any = 0) -> Schedule:
        """Dispatch ``job`` every ``interval`` (seconds, timedelta or "5m")."""
        seconds = parse_duration(interval, f"schedule {name!r} interval")
        if seconds <= 0:
            raise ConfigError(f"schedule {name!r}: interval must be positive, got {interval!r}")
        return self._add(Schedule(name, job, queue or self.manager.config.default_queue, interval=seconds,
                                  catch_up=parse_duration(catch_up, f"schedule {name!r} catch_up")))

    def _add(self, schedule: Schedule) -> Schedule:
        if schedule.catch_up >= self.manager.config.result_ttl:
            raise ConfigError(
                f"schedule {schedule.name!r}: catch_up ({schedule.catch_up:g}s) must be shorter than result_ttl "
                f"({self.manager.config.result_ttl:g}s), which is how long a dispatched tick is remembered"
            )
        self.manager._record(schedule.queue, schedule.job)  # refuses a job that can't be stored, now
        self.schedules[schedule.name] = schedule  # declaring a name again replaces it
        self._checked.pop(schedule.name, None)
        return schedule

    # --- running -----------------------------------------------------------------------

    async def atick(self) -> list[JobHandle]:
        """Dispatch every tick that is due and not yet handled; returns the handles of the
        jobs this scheduler stored (ticks another scheduler had stored are skipped)."""
        from .handles import JobHandle

        now = self.manager.clock()
        stored = []
        for schedule in list(self.schedules.values()):
            since = self._checked.setdefault(schedule.name, now - schedule.catch_up)
            for tick in schedule.ticks(since, now):
                record = self.manager._record(schedule.queue, schedule.job, run_at=tick)
                record.id = schedule.job_id(tick)
                if await self.manager.driver.enqueue_once(record):
                    stored.append(JobHandle(self.manager, record.id, record.queue))
                    self.manager._wake_workers(record.queue, tick)
                    logger.info("schedule %s: dispatched the tick of %s", schedule.name, _iso(tick))
                schedule.last_tick = tick
                self._checked[schedule.name] = tick
            self._checked[schedule.name] = max(self._checked[schedule.name], now)
        return stored

    def tick(self) -> list[JobHandle]:
        return run_sync(self.atick())

    def next_due(self) -> float | None:
        """When the earliest schedule ticks next (seconds since the epoch)."""
        now = self.manager.clock()
        ticks = [s.next_tick(self._checked.get(s.name, now)) for s in self.schedules.values()]
        return min(ticks) if ticks else None

    async def arun(self) -> None:
        """Tick on the current loop until ``stop()``."""
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                await self.atick()
            except Exception as exc:  # the store may be away for a while: keep the schedule going
                logger.warning("scheduler: dispatching failed (%r); retrying", exc)
            due = self.next_due()
            pause = self.poll_interval if due is None else min(max(due - self.manager.clock(), 0.0),
                                                               self.poll_interval)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)

    def start(self) -> Scheduler:
        """Run on neonnb's background loop; returns at once."""
        if self._task is None or self._task.done():
            self._task = submit(self.arun())
        return self

    def run(self) -> None:
        """Run until stopped (Ctrl-C stops it)."""
        run_sync(self.arun())

    def stop(self) -> None:
        stopping, loop = self._stopping, self._loop
        if stopping is not None and loop is not None:
            loop.call_soon_threadsafe(stopping.set)
        if self._task is not None:
            self._task.result(10)
            self._task = None

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    # --- looking at it -------------------------------------------------------------------

    def schedules_df(self, upcoming: int = 3) -> pd.DataFrame:
        """One row per schedule: its rule, queue, last tick and the next ``upcoming`` ticks."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise MissingDependency("DataFrame views need pandas: pip install 'neonnb[notebook]'") from exc
        now = self.manager.clock()
        rows = []
        for s in self.schedules.values():
            nexts, tick = [], now
            for _ in range(upcoming):
                tick = s.next_tick(tick)
                nexts.append(pd.Timestamp(tick, unit="s", tz="UTC"))
            rows.append({
                "name": s.name, "rule": s.cron or f"every {s.interval:g}s", "tz": str(s.tz), "queue": s.queue,
                "job": getattr(s.job, "job_name", None) or repr(s.job),
                "last_run": pd.Timestamp(s.last_tick, unit="s", tz="UTC") if s.last_tick else pd.NaT,
                "next_runs": nexts,
            })
        frame = pd.DataFrame(rows, columns=["name", "rule", "tz", "queue", "job", "last_run", "next_runs"])
        frame["last_run"] = pd.to_datetime(frame["last_run"], utc=True).astype("datetime64[ns, UTC]")
        return frame.set_index("name")


def _croniter(expr: str, start: dt.datetime) -> Any:
    try:
        from croniter import croniter
    except ImportError as exc:  # pragma: no cover - croniter is a dependency
        raise MissingDependency("cron schedules need croniter: pip install croniter") from exc
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ConfigError(f"cron expression {expr!r} has {len(fields)} fields; use five (minute hour day month "
                          "weekday) or six with seconds first")
    try:
        return croniter(expr, start, second_at_beginning=len(fields) == 6)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"invalid cron expression {expr!r}: {exc}") from None


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat()
