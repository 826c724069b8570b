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

Missed ticks: a tick seen more than a second after its time was missed (the scheduler was
down, paused or its machine asleep). Missed ticks within ``catch_up`` (default 0) of now are
dispatched if no one did; of the others only the latest fires, once, on resume.

Time zones: a cron whose hour is fixed ("30 2 * * *") follows the wall clock of its ``tz``:
once a day across DST changes. On the autumn day whose 02:30 happens twice it fires at the
first; on the spring day whose 02:30 doesn't exist it fires when the clock jumps past it
(03:30 by the wall clock). A cron of every hour ("0 * * * *") fires every real hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from . import frames
from ._loop import run_sync, submit
from .config import DurationInput, parse_duration
from .errors import ConfigError
from .records import JobRecord, SchedulerInfo

if TYPE_CHECKING:
    import concurrent.futures

    import pandas as pd

    from .core import Core
    from .handles import JobHandle

logger = logging.getLogger("neonnb.scheduler")

MAX_CATCH_UP_TICKS = 1000  # a catch-up window never dispatches more than this per schedule
# A tick seen later than this after its time was missed. The running scheduler wakes at each
# tick's time, so an on-time tick is seen within milliseconds.
LATE_AFTER = 1.0
BEAT = 5.0  # seconds between a running scheduler's refreshes of its entry in the store


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

    def describe(self, after: float) -> dict[str, Any]:
        """The schedule as plain data, with its next tick after ``after``."""
        return {"name": self.name, "rule": self.rule, "tz": str(self.tz), "queue": self.queue,
                "job": getattr(self.job, "job_name", None) or type(self.job).__name__,
                "last_tick": self.last_tick, "next_tick": self.next_tick(after)}

    @property
    def rule(self) -> str:
        return self.cron or f"every {self.interval:g}s"

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
        if not _follows_wall_clock(self.cron):
            return float(_croniter(self.cron, dt.datetime.fromtimestamp(after, self.tz)).get_next(float))
        # On the wall clock: the next matching local time, placed at its first occurrence
        # (fold=0; a time in the spring gap lands just past the jump). A time whose first
        # occurrence is before ``after`` (we are in the repeated hour) is skipped.
        ticks = _croniter(self.cron, dt.datetime.fromtimestamp(after, self.tz).replace(tzinfo=None))
        while True:
            tick = ticks.get_next(dt.datetime).replace(tzinfo=self.tz).timestamp()
            if tick > after:
                return float(tick)

    def latest_tick(self, at: float) -> float | None:
        """The latest tick at or before ``at`` (None: none in the two years before): looks
        back in doubling windows until one holds a tick, then walks forward."""
        window = 1.0
        while window < 2 * 366 * 86400:
            tick = self.next_tick(at - window)
            if tick <= at:
                while (following := self.next_tick(tick)) <= at:
                    tick = following
                return tick
            window *= 2
        return None

    def job_id(self, tick: float) -> str:
        """The id of this tick's job: the same in every process, and time-ordered like the
        ids of ordinary jobs (nanoseconds first)."""
        digest = hashlib.sha256(f"{self.name}\0{tick!r}".encode()).hexdigest()
        return f"{round(tick * 1e9):016x}{digest[:16]}"


class Scheduler:
    def __init__(self, core: Core, *, poll_interval: float = 1.0) -> None:
        self.core = core
        self.poll_interval = poll_interval
        self.schedules: dict[str, Schedule] = {}
        self._checked: dict[str, float] = {}  # per schedule: ticks up to here are handled
        self._task: concurrent.futures.Future[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host = socket.gethostname()
        self.id = f"scheduler:{self._host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._started_at = 0.0

    def __repr__(self) -> str:
        return f"<neonnb.Scheduler {len(self.schedules)} schedule(s) {'running' if self.is_running else 'stopped'}>"

    # --- declaring schedules ---------------------------------------------------------------

    def cron(self, name: str, expr: str, job: Any, *, tz: str = "UTC", queue: str | None = None,
             catch_up: DurationInput = 0) -> Schedule:
        """Dispatch ``job`` on the cron expression ``expr``: five fields, or six with seconds
        first (``"*/10 * * * * *"``), in time zone ``tz``."""
        if not isinstance(expr, str):
            raise ConfigError(f"schedule {name!r}: a cron expression is a string such as '*/5 * * * *', "
                              f"got {expr!r}")
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ConfigError(f"unknown time zone {tz!r} for schedule {name!r}: use an IANA name such as "
                              "'Europe/Berlin' or 'UTC'") from None
        schedule = Schedule(name, job, queue or self.core.config.default_queue, cron=expr, tz=zone,
                            catch_up=parse_duration(catch_up, f"schedule {name!r} catch_up"))
        try:
            schedule.next_tick(self.core.clock())  # refuses a bad or impossible expression now
        except CroniterBadDateError:
            raise ConfigError(f"cron expression {expr!r} of schedule {name!r} never fires (no such date)") from None
        return self._add(schedule)

    def every(self, name: str, interval: DurationInput, job: Any, *, queue: str | None = None,
              catch_up: DurationInput = 0) -> Schedule:
        """Dispatch ``job`` every ``interval`` (seconds, timedelta or "5m")."""
        seconds = parse_duration(interval, f"schedule {name!r} interval")
        if seconds <= 0:
            raise ConfigError(f"schedule {name!r}: interval must be positive, got {interval!r}")
        return self._add(Schedule(name, job, queue or self.core.config.default_queue, interval=seconds,
                                  catch_up=parse_duration(catch_up, f"schedule {name!r} catch_up")))

    def _add(self, schedule: Schedule) -> Schedule:
        if schedule.catch_up >= self.core.config.result_ttl:
            raise ConfigError(
                f"schedule {schedule.name!r}: catch_up ({schedule.catch_up:g}s) must be shorter than result_ttl "
                f"({self.core.config.result_ttl:g}s), which is how long a dispatched tick is remembered"
            )
        self.core.record(schedule.queue, schedule.job)  # refuses a job that can't be stored, now
        self.schedules[schedule.name] = schedule  # declaring a name again replaces it
        self._checked.pop(schedule.name, None)
        return schedule

    # --- running -----------------------------------------------------------------------

    async def atick(self) -> list[JobHandle]:
        """Dispatch every tick that is due and not yet handled; returns the handles of the
        jobs this scheduler stored (ticks another scheduler had stored are skipped)."""
        from .handles import JobHandle

        now = self.core.clock()
        stored = []
        for schedule in list(self.schedules.values()):
            try:
                stored += await self._tick_one(schedule, now)
            except Exception as exc:  # a store outage, or a job that no longer encodes: the others go on
                logger.error("schedule %s: dispatching failed (%r); the other schedules go on", schedule.name, exc)
        return [JobHandle(self.core, record.id, record.queue) for record in stored]

    async def _tick_one(self, schedule: Schedule, now: float) -> list[JobRecord]:
        since = self._checked.setdefault(schedule.name, now - schedule.catch_up)
        # Ticks on time or within catch_up; of those missed before, the latest alone.
        ticks = schedule.ticks(max(since, now - max(schedule.catch_up, LATE_AFTER)), now)
        if not ticks and (latest := schedule.latest_tick(now)) is not None and latest > since:
            ticks = [latest]
        stored = []
        for tick in ticks:
            record = self.core.record(schedule.queue, schedule.job, run_at=tick)
            record.id = schedule.job_id(tick)
            if await self.core.enqueue_once(record):
                stored.append(record)
                logger.info("schedule %s: dispatched the tick of %s", schedule.name, _iso(tick))
            schedule.last_tick = tick
            self._checked[schedule.name] = tick
        self._checked[schedule.name] = max(self._checked[schedule.name], now)
        return stored

    def tick(self) -> list[JobHandle]:
        return run_sync(self.atick())

    def next_due(self) -> float | None:
        """When the earliest schedule ticks next (seconds since the epoch)."""
        now = self.core.clock()
        ticks = [s.next_tick(self._checked.get(s.name, now)) for s in self.schedules.values()]
        return min(ticks) if ticks else None

    async def arun(self) -> None:
        """Tick on the current loop until ``stop()``, registered in the store meanwhile (so
        ``neonnb schedules`` and the dashboards list this scheduler's schedules)."""
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._started_at = self.core.clock()
        announce = asyncio.create_task(self.core.announce(self.info, BEAT))
        try:
            while not self._stopping.is_set():
                try:
                    await self.atick()
                except Exception as exc:  # the store may be away for a while: keep the schedule going
                    logger.warning("scheduler: dispatching failed (%r); retrying", exc)
                due = self.next_due()
                pause = self.poll_interval if due is None else min(max(due - self.core.clock(), 0.0),
                                                                   self.poll_interval)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
        finally:
            announce.cancel()
            await self.core.withdraw(self.id)

    def info(self) -> SchedulerInfo:
        """What the store knows of this scheduler (``qm.known_schedulers()``), as of now."""
        now = self.core.clock()
        return SchedulerInfo(
            id=self.id, host=self._host, pid=os.getpid(), started_at=self._started_at, last_seen=now,
            beat=BEAT, schedules=[s.describe(self._checked.get(s.name, now)) for s in self.schedules.values()],
        )

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
        pd = frames.pandas_module()
        now = self.core.clock()
        rows = []
        for s in self.schedules.values():
            nexts, tick = [], now
            for _ in range(upcoming):
                tick = s.next_tick(tick)
                nexts.append(pd.Timestamp(tick, unit="s", tz="UTC"))
            rows.append({
                "name": s.name, "rule": s.rule, "tz": str(s.tz), "queue": s.queue,
                "job": getattr(s.job, "job_name", None) or repr(s.job),
                "last_run": pd.Timestamp(s.last_tick, unit="s", tz="UTC") if s.last_tick else pd.NaT,
                "next_runs": nexts,
            })
        frame = pd.DataFrame(rows, columns=["name", "rule", "tz", "queue", "job", "last_run", "next_runs"])
        frame["last_run"] = pd.to_datetime(frame["last_run"], utc=True).astype("datetime64[ns, UTC]")
        return frame.set_index("name")


def _croniter(expr: str, start: dt.datetime) -> Any:
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ConfigError(f"cron expression {expr!r} has {len(fields)} fields; use five (minute hour day month "
                          "weekday) or six with seconds first")
    try:
        return croniter(expr, start, second_at_beginning=len(fields) == 6)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"invalid cron expression {expr!r}: {exc}") from None


def _follows_wall_clock(expr: str) -> bool:
    """Whether the cron names hours (``30 2 * * *``): then it follows the local wall clock,
    once a day across DST changes; with every hour (``*``) it follows real time."""
    fields = expr.split()
    return fields[2 if len(fields) == 6 else 1] != "*"


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat()
