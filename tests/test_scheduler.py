"""Cron and recurring schedules, on every driver (conftest.DRIVERS), with an injected clock;
then three real scheduler processes against one PostgreSQL and one Redis."""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from neonnb import ConfigError, QueueManager, SerializationError, Status
from tests import jobs
from tests.conftest import FakeClock, config_for, connection_for

MakeManager = Callable[..., QueueManager]
START = 1_800_000_000.0  # FakeClock's start: a multiple of every interval used below


def sharing_one_store(make_manager: MakeManager, clock: FakeClock, n: int) -> list[QueueManager]:
    """n managers on one store: separate connections, except in memory, where the store is
    the driver object itself."""
    first = make_manager(clock=clock)
    if first.config.driver == "memory":
        return [first] + [QueueManager(first.config, driver=first.driver, clock=clock) for _ in range(n - 1)]
    return [first] + [make_manager(clock=clock) for _ in range(n - 1)]


def test_several_schedulers_dispatch_each_tick_once(make_manager: MakeManager, clock: FakeClock) -> None:
    managers = sharing_one_store(make_manager, clock, 3)
    schedulers = [qm.scheduler() for qm in managers]
    for s in schedulers:
        s.every("beat", 2, jobs.Note("beat"), queue="ticks")
        s.tick()  # starts now: nothing missed, nothing due
    stored = 0
    for _ in range(10):
        clock.advance(1)
        for s in schedulers:
            stored += len(s.tick())
    assert stored == 5  # ticks at +2, +4, ..., +10, each stored by exactly one scheduler
    queued = managers[0].jobs(Status.QUEUED, queue="ticks")
    assert sorted(r.run_at for r in queued) == [START + 2 * i for i in range(1, 6)]
    worker = managers[0].worker("ticks", 2)
    while worker.run_once():
        pass
    assert managers[0].stats()["ticks"].succeeded == 5


def test_cron_with_seconds_and_a_time_zone(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    s = qm.scheduler()
    berlin = s.cron("standup", "30 9 * * *", jobs.Note("standup"), tz="Europe/Berlin")
    clock.now = dt.datetime(2026, 12, 1, 7, 0, tzinfo=dt.timezone.utc).timestamp()
    # 09:30 in Berlin is 08:30 UTC in winter
    assert berlin.next_tick(clock.now) == dt.datetime(2026, 12, 1, 8, 30, tzinfo=dt.timezone.utc).timestamp()
    every_ten = s.cron("ten-seconds", "*/10 * * * * *", jobs.Note("ten"))
    assert every_ten.next_tick(clock.now + 3) == clock.now + 10
    s.tick()
    fired = 0
    for _ in range(31):
        clock.advance(1)
        fired += len(s.tick())
    assert fired == 3  # +10, +20, +30; the standup is still an hour and a half away
    frame = s.schedules_df()
    assert list(frame.index) == ["standup", "ten-seconds"]
    assert frame.loc["ten-seconds", "last_run"] == dt.datetime.fromtimestamp(clock.now - 1, dt.timezone.utc)
    assert len(frame.loc["standup", "next_runs"]) == 3


def test_missed_ticks_are_skipped_or_caught_up_within_the_bound(make_manager: MakeManager, clock: FakeClock) -> None:
    managers = sharing_one_store(make_manager, clock, 4)
    first = managers[0].scheduler()
    first.every("hourly", 3600, jobs.Note("hourly"), queue="h")
    first.tick()
    clock.advance(3600)
    assert len(first.tick()) == 1
    clock.advance(10 * 3600)  # every scheduler was down for ten ticks

    skipping = managers[1].scheduler()
    skipping.every("hourly", 3600, jobs.Note("hourly"), queue="h")
    assert skipping.tick() == []

    catching_up = managers[2].scheduler()
    catching_up.every("hourly", 3600, jobs.Note("hourly"), queue="h", catch_up="3h")
    assert len(catching_up.tick()) == 3  # the last three missed ticks, not all ten
    again = managers[3].scheduler()
    again.every("hourly", 3600, jobs.Note("hourly"), queue="h", catch_up="3h")
    assert again.tick() == []  # already dispatched by someone: never twice


def test_enqueue_once_stores_an_id_only_once(make_manager: MakeManager) -> None:
    import neonnb._loop as loop

    qm = make_manager()
    record = qm.core.record("q", jobs.Note("once"))
    assert loop.run_sync(qm.driver.enqueue_once(record)) is True
    assert loop.run_sync(qm.driver.enqueue_once(record)) is False
    assert qm.size("q") == 1


def test_bad_schedules_are_refused_with_what_was_wrong() -> None:
    qm = QueueManager(config_for("memory://"))
    s = qm.scheduler()
    with pytest.raises(ConfigError, match=r"invalid cron expression '61 \* \* \* \*'"):
        s.cron("bad", "61 * * * *", jobs.Note("x"))
    with pytest.raises(ConfigError, match=r"cron expression 'every monday' has 2 fields"):
        s.cron("bad", "every monday", jobs.Note("x"))
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        s.cron("bad", "0 * * * *", jobs.Note("x"), tz="Mars/Olympus")
    with pytest.raises(ConfigError, match="interval must be positive"):
        s.every("bad", 0, jobs.Note("x"))
    with pytest.raises(ConfigError, match=r"'0 0 31 2 \*' of schedule 'bad' never fires"):
        s.cron("bad", "0 0 31 2 *", jobs.Note("x"))
    for not_a_cron in (None, 5):
        with pytest.raises(ConfigError, match="a cron expression is a string such as"):
            s.cron("bad", not_a_cron, jobs.Note("x"))  # type: ignore[arg-type]
    for not_an_interval in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="must be a finite duration"):
            s.every("bad", not_an_interval, jobs.Note("x"))
    with pytest.raises(SerializationError, match="conn"):
        s.every("bad", 60, jobs.HoldsObject("x", jobs.Unstorable()))
    assert s.schedules == {}
    qm.close()


def test_a_pause_fires_at_most_the_latest_tick_without_catch_up(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    s = qm.scheduler()
    s.every("each-second", 1, jobs.Note("beat"), queue="t")
    s.cron("each-second-cron", "* * * * * *", jobs.Note("cron-beat"), queue="t")
    s.every("caught-up", 1, jobs.Note("caught"), queue="c", catch_up=5)
    s.tick()
    for pause in (20, 3600):  # a SIGSTOP, a laptop asleep for an hour
        clock.advance(pause)
        fired = s.tick()
        by_queue = sorted(h.queue or "" for h in fired)
        assert by_queue == ["c"] * 5 + ["t", "t"], f"after {pause}s: {by_queue}"
        assert {h.fetch().run_at for h in fired if h.queue == "t"} == {clock()}
        clock.advance(1)
        assert len(s.tick()) == 3, "on time again: one tick each"


def test_one_failing_schedule_never_stops_the_others(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    s = qm.scheduler()
    s.every("fragile", 1, jobs.Fragile(), queue="t")
    s.every("sturdy", 1, jobs.Note("sturdy"), queue="t")
    s.tick()
    jobs.FRAGILE_BROKEN.set()
    try:
        clock.advance(1)
        fired = s.tick()
    finally:
        jobs.FRAGILE_BROKEN.clear()
    assert [h.fetch().name for h in fired] == ["tests.jobs.Note"]
    clock.advance(1)
    assert len(s.tick()) == 2


def _local(schedule: object, start: dt.datetime, end: dt.datetime) -> list[str]:
    from neonnb.scheduler import Schedule

    assert isinstance(schedule, Schedule)
    return [dt.datetime.fromtimestamp(t, schedule.tz).isoformat()
            for t in schedule.ticks(start.timestamp(), end.timestamp())]


def test_a_daily_cron_fires_once_a_day_across_dst_changes() -> None:
    qm = QueueManager(config_for("memory://"))
    s = qm.scheduler()
    daily = s.cron("nightly", "30 2 * * *", jobs.Note("x"), tz="Europe/Berlin")
    hourly = s.cron("hourly", "0 * * * *", jobs.Note("x"), tz="Europe/Berlin")
    utc = dt.timezone.utc
    autumn = _local(daily, dt.datetime(2026, 10, 24, 12, tzinfo=utc), dt.datetime(2026, 10, 26, 12, tzinfo=utc))
    assert autumn == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]  # 02:30 happens twice: once
    spring = _local(daily, dt.datetime(2026, 3, 28, 12, tzinfo=utc), dt.datetime(2026, 3, 30, 12, tzinfo=utc))
    assert spring == ["2026-03-29T03:30:00+02:00", "2026-03-30T02:30:00+02:00"]  # no 02:30: as the clock jumps
    hours = _local(hourly, dt.datetime(2026, 10, 24, 22, tzinfo=utc), dt.datetime(2026, 10, 25, 23, tzinfo=utc))
    assert len(hours) == 25, "every real hour, the repeated one too"
    qm.close()


SCHEDULER_PROCESS = """
import sys, time
from neonnb import QueueManager
from tests.conftest import config_for
from tests import jobs
qm = QueueManager(config_for(sys.argv[1]))
s = qm.scheduler(poll_interval=0.2)
s.cron("every-second", "*/1 * * * * *", jobs.Note("tick"), queue="cron")
s.start()
time.sleep(float(sys.argv[2]))
s.stop()
qm.close()
"""


@pytest.mark.parametrize("driver", ["postgres", "redis"])
def test_three_scheduler_processes_fire_every_second_exactly_once(
    driver: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    connection = connection_for(request, driver, tmp_path)
    seconds = 20
    started = time.time()
    processes = [
        subprocess.Popen([sys.executable, "-c", SCHEDULER_PROCESS, connection, str(seconds)],
                         cwd=Path(__file__).parents[1])
        for _ in range(3)
    ]
    for p in processes:
        assert p.wait(seconds + 30) == 0
    ended = time.time()
    with QueueManager(config_for(connection)) as qm:
        ticks = sorted(r.run_at for r in qm.jobs(Status.QUEUED, queue="cron", limit=1000))
    assert len(ticks) == len(set(ticks)), "a tick was dispatched twice"
    assert all(t == int(t) for t in ticks) and all(b - a == 1 for a, b in itertools.pairwise(ticks))
    assert seconds - 1 <= len(ticks) <= seconds + 1, f"{len(ticks)} dispatches in {ended - started:.1f}s"
