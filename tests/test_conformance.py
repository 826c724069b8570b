"""ONE suite of driver behaviour, run against every driver (see conftest.DRIVERS).

Time-dependent behaviour uses an injected clock and `run_once()` steps, never sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import neonnb._loop as loop
from neonnb import (
    ConfigError,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobHandle,
    PayloadError,
    Priority,
    QueueManager,
    SerializationError,
    Status,
)
from neonnb.core import Counting
from neonnb.job import decode_job
from tests import jobs
from tests.conftest import FakeClock, wait_until

MakeManager = Callable[..., QueueManager]


@pytest.fixture(autouse=True)
def fresh_recorder() -> None:
    jobs.RECORD.__init__()  # type: ignore[misc]
    jobs.RELEASE.clear()


def test_eight_workers_run_2000_jobs_exactly_once(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    handles = qm.dispatch_batch("bulk", [jobs.Note(f"job-{i}") for i in range(2000)])
    workers = [qm.worker("bulk", 1).start() for _ in range(8)]
    try:
        wait_until(lambda: qm.stats()["bulk"].succeeded == 2000, timeout=90, what="2000 jobs to succeed")
    finally:
        for w in workers:
            w.stop()
    assert len(jobs.RECORD.counts) == 2000
    assert set(jobs.RECORD.counts.values()) == {1}, "a job ran more than once"
    assert handles[123].result(timeout=1) == "job-123"
    assert qm.size("bulk") == 0


def test_priority_is_strict_and_fifo_within_a_priority(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    order = [Priority.LOW, Priority.NORMAL, Priority.HIGH] * 5
    for i, priority in enumerate(order):
        qm.dispatch_with_priority("q", jobs.Note(f"{priority.value}-{i:02d}"), priority)
        clock.advance(0.001)
    qm.dispatch("q", jobs.Urgent("high-by-method", urgent=True))
    qm.dispatch("q", jobs.Urgent("low-by-method", urgent=False))
    worker = qm.worker("q", 1)
    while worker.run_once():
        pass
    ran = jobs.RECORD.order
    ranks = [{"h": 0, "n": 1, "l": 2}[tag[0]] for tag in ran]
    assert ranks == sorted(ranks), ran
    assert [t for t in ran if t.startswith("high-")] == ["high-02", "high-05", "high-08", "high-11", "high-14",
                                                         "high-by-method"]
    assert ran[-1] == "low-by-method"


def test_fifo_within_one_priority(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    handles = [qm.dispatch("q", jobs.Note(f"{i:02d}")) for i in range(30)]  # one timestamp: dispatch order decides
    handles += qm.dispatch_batch("q", [jobs.Note(f"b{i:02d}") for i in range(10)])
    # Claims of three at a time come out in dispatch order. (Running them would not show it:
    # three jobs of one claim run at once and may finish in any order.)
    claimed: list[str] = []
    while batch := loop.run_sync(qm.driver.reserve(["q"], 3, "w", clock(), clock() + 30)):
        claimed += [record.id for record in batch]
    assert claimed == [h.id for h in handles]


def test_delayed_jobs_never_run_early_and_keep_their_priority(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    later = qm.dispatch_after("q", jobs.Urgent("delayed-high", urgent=True), 10)
    qm.dispatch_at("q", jobs.Note("at"), clock() + 20)
    worker = qm.worker("q", 1)
    assert qm.stats()["q"].delayed == 2
    clock.advance(9.999)
    assert worker.run_once() == 0
    assert later.status is Status.QUEUED
    qm.dispatch_with_priority("q", jobs.Note("normal-now"), Priority.NORMAL)
    clock.advance(0.001)
    assert worker.run_once() == 1
    assert jobs.RECORD.order == ["delayed-high"]
    assert worker.run_once() == 1
    clock.advance(9.9)
    assert worker.run_once() == 0
    clock.advance(0.1)
    assert worker.run_once() == 1
    assert jobs.RECORD.order == ["delayed-high", "normal-now", "at"]


def test_backoff_schedule_doubles_until_the_failed_store(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock, retry_delay=5)
    handle = qm.dispatch("q", jobs.Flaky(attempts=5))
    worker = qm.worker("q", 1)
    delays = []
    for _ in range(4):
        assert worker.run_once() == 1
        record = handle.fetch()
        assert record.status is Status.QUEUED
        delays.append(record.run_at - clock())
        clock.advance(delays[-1] - 0.01)
        assert worker.run_once() == 0, "a retry ran before its backoff ended"
        clock.advance(0.01)
    assert delays == [5, 10, 20, 40]
    assert worker.run_once() == 1
    assert handle.status is Status.FAILED
    failed = qm.failed.get(handle.id)
    assert (failed.attempts, failed.error_type, failed.error) == (5, "ConnectionError", "flaky attempt 5")
    assert "ConnectionError: flaky attempt 5" in failed.traceback


def test_retry_rules_of_the_job_are_honoured(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock, retry_delay=5, max_retries=3)
    permanent = qm.dispatch("q", jobs.Permanent())
    custom = qm.dispatch("q", jobs.CustomDelay())
    asked = qm.dispatch("q", jobs.AskRetry())
    recovers = qm.dispatch("q", jobs.Flaky(succeed_on=2))
    worker = qm.worker("q", 4)
    assert worker.run_once() == 4
    assert permanent.status is Status.FAILED and qm.failed.get(permanent.id).attempts == 1
    assert custom.fetch().run_at == clock() + 7
    assert asked.fetch().run_at == clock() + 42
    clock.advance(5)
    assert worker.run_once() == 1
    assert recovers.result(timeout=1) == 2
    clock.advance(2)
    assert worker.run_once() == 1
    assert custom.fetch().run_at == clock() + 14


def test_failed_store_list_retry_forget_flush(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock, max_retries=0)
    first = qm.dispatch("a", jobs.Flaky(attempts=1))
    worker = qm.worker(["a", "b"], 1)
    worker.run_once()
    clock.advance(1)
    second = qm.dispatch("b", jobs.Flaky(succeed_on=2, attempts=1))
    third = qm.dispatch("b", jobs.Permanent())
    worker.run_once()
    clock.advance(1)
    worker.run_once()
    listed = qm.failed.list()
    assert [f.id for f in listed] == [third.id, second.id, first.id]  # newest first
    assert [f.id for f in qm.failed.list(limit=1, offset=1)] == [second.id]
    assert listed[1].arguments == {"succeed_on": 2, "attempts": 1}

    retried = qm.failed.retry(second.id)
    assert retried.id == second.id
    record = retried.fetch()
    assert (record.status, record.attempts, record.payload) == (Status.QUEUED, 0, '{"succeed_on":2,"attempts":1}')
    worker.run_once()
    assert retried.status is Status.FAILED  # attempts reset: attempt 1 again, so it fails again
    assert qm.failed.retry_all(queue="a") == 1
    assert first.status is Status.QUEUED
    assert qm.failed.forget(third.id) is True
    assert qm.failed.forget(third.id) is False
    assert qm.failed.flush() == 1
    assert qm.failed.list() == []


def test_graceful_stop_releases_unfinished_and_unstarted_jobs(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    quick = qm.dispatch("q", jobs.SlowAsync(0.05))
    slow = qm.dispatch("q", jobs.SlowAsync(60))
    blocking = qm.dispatch("q", jobs.BlockingSync())
    waiting = qm.dispatch_batch("q", [jobs.Note(f"w{i}") for i in range(3)])
    worker = qm.worker("q", 3).start()
    wait_until(lambda: set(worker.running_jobs) >= {slow.id, blocking.id}, what="both long jobs running")
    worker.stop(grace=0.2)
    assert not worker.is_running
    for handle in (slow, blocking):
        record = handle.fetch()
        assert (record.status, record.attempts, record.worker_id) == (Status.QUEUED, 0, None)
    assert quick.status is Status.SUCCEEDED
    assert qm.size("q") == 2 + sum(h.status is Status.QUEUED for h in waiting)


def test_stop_lets_jobs_finish_within_the_grace_period(make_manager: MakeManager) -> None:
    qm = make_manager()
    handle = qm.dispatch("q", jobs.SlowAsync(0.3))
    worker = qm.worker("q", 1).start()
    wait_until(lambda: handle.status is Status.RUNNING)
    worker.stop(grace=10)
    assert handle.status is Status.SUCCEEDED


def test_expired_lease_is_recovered_with_its_attempt_counted(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock, lease_timeout=30, max_retries=1)
    handle = qm.dispatch("q", jobs.Note("survivor"))
    doomed = qm.dispatch("q", jobs.Note("doomed"))
    # A worker "dead" reserves both jobs and dies: nobody extends its leases.
    reserved = loop.run_sync(qm.driver.reserve(["q"], 2, "dead", clock(), clock() + 30))
    assert {r.id for r in reserved} == {handle.id, doomed.id}
    worker = qm.worker("q", 1)
    clock.advance(29)
    assert worker.run_once() == 0, "a live lease was taken over"
    clock.advance(2)
    # Recovery happens on the worker's housekeeping step, then both run again as attempt 2.
    # `doomed` is killed again: reserve it as the dead worker once more.
    loop.run_sync(qm.driver.recover_expired(clock()))
    again = loop.run_sync(qm.driver.reserve(["q"], 1, "dead", clock(), clock() + 30))
    assert [r.attempts for r in again] == [2]
    killed_twice = again[0].id
    survivor = handle.id if killed_twice == doomed.id else doomed.id
    assert worker.run_once() == 1
    assert qm.handle(survivor).fetch().attempts == 2
    assert qm.handle(survivor).status is Status.SUCCEEDED
    clock.advance(31)
    assert worker.run_once() == 0  # housekeeping moves the job that died max_attempts times to the failed store
    failed = qm.failed.get(killed_twice)
    assert (failed.error_type, failed.attempts) == ("LeaseExpired", 2)


def test_a_worker_takes_back_jobs_that_went_back_to_the_queue_only_if_nobody_claimed_them(
    make_manager: MakeManager, clock: FakeClock
) -> None:
    """After the store was away: a lease recovered meanwhile, or a claim the store lost in a
    crash, leaves the job queued; its worker takes it back (same attempt) unless another
    worker claimed it since. Then its acknowledgement counts: the job runs once."""
    qm = make_manager(clock=clock, lease_timeout=30)
    recovered, lost, taken = (qm.dispatch("q", jobs.Note(tag)) for tag in ("recovered", "lost", "taken"))
    held = loop.run_sync(qm.driver.reserve(["q"], 3, "w1", clock(), clock() + 30))
    by_id = {r.id: r for r in held}
    loop.run_sync(qm.driver.release([by_id[lost.id]], "w1", clock()))  # as if the claim never happened
    clock.advance(31)
    loop.run_sync(qm.driver.recover_expired(clock()))  # "recovered" and "taken" go back, attempt counted
    [other] = loop.run_sync(qm.driver.reserve(["q"], 1, "w2", clock(), clock() + 30))  # one of them
    back = set(loop.run_sync(qm.driver.reacquire(held, "w1", clock() + 30)))
    assert back == {lost.id, recovered.id, taken.id} - {other.id}
    for job_id in back:
        record = qm.handle(job_id).fetch()
        assert (record.status, record.worker_id, record.attempts) == (Status.RUNNING, "w1", 1)
    assert qm.handle(other.id).fetch().worker_id == "w2", "a job another worker claimed stays its"
    assert set(loop.run_sync(qm.driver.complete([(by_id[i], None) for i in back], "w1", clock()))) == back
    assert qm.size("q") == 0


def test_a_cancel_reaches_a_running_job_within_a_second(make_manager: MakeManager) -> None:
    """Long before the next heartbeat (10 s with a 30 s lease), from another process: a sync
    handler sees ctx.cancelled, an async one is cancelled; both end CANCELLED."""
    qm = make_manager(lease_timeout=30, poll_interval=0.05)
    other = qm if qm.config.driver == "memory" else make_manager()  # another process's connection
    sync, async_ = qm.dispatch("q", jobs.BlockingSync()), qm.dispatch("q", jobs.SlowAsync(30))
    worker = qm.worker("q", 2).start()
    try:
        wait_until(lambda: set(worker.running_jobs) == {sync.id, async_.id}, what="both jobs running")
        time.sleep(1.0)
        asked = time.monotonic()
        for handle in (sync, async_):
            assert other.cancel(handle.id) is Status.RUNNING
        wait_until(lambda: {sync.status, async_.status} == {Status.CANCELLED}, timeout=5, what="both cancelled")
        took = time.monotonic() - asked
        assert took < 3, f"the cancel took {took:.1f}s to land (a heartbeat is 10 s)"
    finally:
        worker.stop(grace=0)


def test_a_worker_on_several_queues_takes_them_in_order_or_by_weight(make_manager: MakeManager) -> None:
    qm = make_manager()
    for i in range(5):  # the second queue's jobs are older: order of preference still wins
        qm.dispatch("qb", jobs.Note(f"b{i}"))
    for i in range(5):
        qm.dispatch("qa", jobs.Note(f"a{i}"))
    strict = qm.worker(["qa", "qb"], 1)
    while strict.run_once():
        pass
    assert "".join(tag[0] for tag in jobs.RECORD.order) == "aaaaabbbbb"
    jobs.RECORD.__init__()  # type: ignore[misc]
    for i in range(8):
        qm.dispatch("wa", jobs.Note(f"a{i}"))
        qm.dispatch("wb", jobs.Note(f"b{i}"))
    weighted = qm.worker({"wa": 3, "wb": 1}, 4)
    assert weighted.run_once() == 4
    assert sorted(tag[0] for tag in jobs.RECORD.order) == ["a", "a", "a", "b"], "4 slots shared 3 to 1"
    while weighted.run_once():
        pass
    assert len(jobs.RECORD.order) == 16, "the other queue's jobs take the slots the first leaves"


def test_a_paused_queue_keeps_its_jobs_until_resumed_on_every_worker(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.1)
    other = qm if qm.config.driver == "memory" else make_manager()  # another process's manager
    worker = qm.worker(["held", "free"], 2).start()
    try:
        other.pause("held")
        time.sleep(1.2)  # the workers' look at the paused queues comes within a second
        held = [other.dispatch("held", jobs.Note(f"h{i}")) for i in range(5)]  # still accepted
        free = other.dispatch("free", jobs.Note("free"))
        assert free.result(timeout=10) == "free", "another queue of the same worker goes on"
        time.sleep(1.0)
        assert {h.status for h in held} == {Status.QUEUED}, "a paused queue's job started"
        stats = other.stats()
        assert stats["held"].paused and not stats["free"].paused and stats["held"].size == 5
        other.resume("held")
        assert [h.result(timeout=10) for h in held] == [f"h{i}" for i in range(5)]
        assert not qm.stats()["held"].paused
    finally:
        worker.stop()


def test_a_job_not_started_before_its_expiry_never_runs_and_ends_expired(
    make_manager: MakeManager, clock: FakeClock
) -> None:
    qm = make_manager(clock=clock)
    late = qm.dispatch("q", jobs.Note("too late"), expires="1s")
    batch = qm.dispatch_batch("q", [jobs.Note("late batch")], expires_at=clock() + 1)
    on_time = qm.dispatch("q", jobs.Note("in time"), expires=3600)
    plain = qm.dispatch("q", jobs.Note("no expiry"))
    clock.advance(2)  # no worker for 2 s
    worker = qm.worker("q", 4)
    while worker.run_once():
        pass
    assert sorted(jobs.RECORD.order) == ["in time", "no expiry"], "an expired job ran"
    assert (on_time.result(timeout=5), plain.result(timeout=5)) == ("in time", "no expiry")
    for handle in (late, batch[0]):
        assert handle.status is Status.EXPIRED
        with pytest.raises(JobExpired, match="expired before it started"):
            handle.result(timeout=5)
    assert qm.failed.list() == [], "an expired job is not a failure"
    assert qm.stats()["q"].expired == 2
    assert {r.id for r in qm.jobs(Status.EXPIRED)} == {late.id, batch[0].id}
    with pytest.raises(ConfigError, match="not both"):
        qm.dispatch("q", jobs.Note("x"), expires=1, expires_at=clock() + 5)
    with pytest.raises(ConfigError, match="expire before it is due"):
        qm.dispatch_after("q", jobs.Note("x"), 60, expires=30)


def _most_in_a_window(starts: list[float], window: float) -> int:
    return max((sum(1 for t in starts if first <= t < first + window) for first in starts), default=0)


def test_a_rate_limit_holds_across_workers_without_charging_attempts(make_manager: MakeManager) -> None:
    """rate_limit="10/s" over 30 jobs on three workers: the starts span at least two seconds
    and no half second holds more than 10 (measured where the handlers start, which on a
    loaded machine lags their permits by up to ~0.3 s: a limit not kept shows as 30 starts at
    once, one kept per fixed second as 20), no attempt charged for waiting, and jobs that are
    not limited are not held up."""
    qm = make_manager(poll_interval=0.05)
    other = qm if qm.config.driver == "memory" else make_manager()
    jobs.STARTS.clear()
    limited = qm.dispatch_batch("q", [jobs.Limited(n) for n in range(30)])
    free = qm.dispatch_batch("q", [jobs.Note(f"free-{i}") for i in range(10)])
    began = time.monotonic()
    workers = [qm.worker("q", 4).start(), other.worker("q", 4).start(), other.worker("q", 4).start()]
    try:
        assert [h.result(timeout=20) for h in free] == [f"free-{i}" for i in range(10)]
        free_done = time.monotonic() - began
        assert [h.result(timeout=30) for h in limited] == list(range(30))
        took = time.monotonic() - began
    finally:
        for worker in workers:
            worker.stop()
    starts = [t for t, _ in jobs.STARTS]
    assert len(starts) == 30 and _most_in_a_window(starts, 0.5) <= 10, "over the limit"
    assert max(starts) - min(starts) >= 1.8, "30 starts at 10/s spread over less than two seconds"
    assert 1.9 <= took < 8, f"30 jobs at 10/s took {took:.1f}s"
    assert free_done < took, "the jobs without a limit waited behind the limited ones"
    assert {h.fetch().attempts for h in limited} == {1}, "waiting for the limit charged attempts"


def test_a_rate_limit_per_key_counts_each_key_apart(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    jobs.STARTS.clear()
    handles = qm.dispatch_batch("q", [jobs.LimitedPerCustomer(c, n) for n in range(10) for c in ("acme", "globex")])
    worker = qm.worker("q", 8).start()
    try:
        assert sorted(h.result(timeout=30) for h in handles) == sorted(list(range(10)) * 2)
    finally:
        worker.stop()
    for customer in ("acme", "globex"):
        starts = [t for t, key in jobs.STARTS if key == customer]
        assert len(starts) == 10 and _most_in_a_window(starts, 0.5) <= 5, customer
        assert max(starts) - min(starts) >= 0.8, f"{customer}: 10 starts at 5/s within a second"
    first_second = [key for t, key in jobs.STARTS if t < jobs.STARTS[0][0] + 0.9]
    assert sorted(set(first_second)) == ["acme", "globex"], "one key's limit held up the other"


def test_concurrency_per_key_never_runs_more_at_once_across_workers(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    other = qm if qm.config.driver == "memory" else make_manager()
    jobs.RUNS.clear()
    handles = qm.dispatch_batch("q", [jobs.Crowded(c, n) for n in range(6) for c in ("acme", "globex")])
    workers = [qm.worker("q", 4).start(), other.worker("q", 4).start(), other.worker("q", 4).start()]
    try:
        assert sorted(h.result(timeout=30) for h in handles) == sorted(list(range(6)) * 2)
    finally:
        for worker in workers:
            worker.stop()
    for customer in ("acme", "globex"):
        runs = [(start, end) for start, end, key in jobs.RUNS if key == customer]
        most = max(sum(1 for s, e in runs if s <= start < e) for start, _ in runs)
        assert len(runs) == 6 and most <= 2, f"{customer}: {most} ran at once"
    assert max(sum(1 for s, e, _ in jobs.RUNS if s <= start < e) for start, _, _ in jobs.RUNS) >= 3, (
        "the keys held each other up")
    assert {h.fetch().attempts for h in handles} == {1}, "waiting for a place charged attempts"


def test_a_queue_rate_limit_holds_for_the_queue_as_a_whole(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    other = qm if qm.config.driver == "memory" else make_manager()
    other.limit_queue("lq", "4/s")  # set in another process: the workers read it from the store
    assert qm.stats()["lq"].rate == "4/s"
    jobs.RECORD.__init__()  # type: ignore[misc]
    handles = qm.dispatch_batch("lq", [jobs.Note(f"n{i}") for i in range(8)])
    began = time.monotonic()
    worker = qm.worker("lq", 8).start()
    try:
        assert sorted(h.result(timeout=20) for h in handles) == sorted(f"n{i}" for i in range(8))
        took = time.monotonic() - began
    finally:
        worker.stop()
    assert took >= 0.9, f"8 jobs at 4/s all ran within {took:.2f}s"
    assert {h.fetch().attempts for h in handles} == {1}
    with pytest.raises(ConfigError, match="count over a time"):
        qm.limit_queue("lq", "fast")
    qm.limit_queue("lq", None)
    assert qm.stats()["lq"].rate is None


def test_a_queue_concurrency_limit_holds_for_the_queue_as_a_whole(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    other = qm if qm.config.driver == "memory" else make_manager()
    other.limit_queue("cq", concurrency=2)
    assert qm.stats()["cq"].concurrency == 2
    jobs.RUNS.clear()
    handles = qm.dispatch_batch("cq", [jobs.Crowded(f"c{n}", n) for n in range(6)])  # each its own key
    workers = [qm.worker("cq", 4).start(), other.worker("cq", 4).start()]
    try:
        assert sorted(h.result(timeout=30) for h in handles) == list(range(6))
    finally:
        for worker in workers:
            worker.stop()
    most = max(sum(1 for s, e, _ in jobs.RUNS if s <= start < e) for start, _, _ in jobs.RUNS)
    assert most <= 2, f"{most} of the queue's jobs ran at once"
    qm.limit_queue("cq", concurrency=None)
    assert qm.stats()["cq"].concurrency is None
    with pytest.raises(ConfigError, match="rate= or concurrency="):
        qm.limit_queue("cq")


def test_what_a_job_prints_and_logs_is_kept_with_it_not_printed(
    make_manager: MakeManager, capsys: pytest.CaptureFixture[str]
) -> None:
    qm = make_manager()
    sync = [qm.dispatch("q", jobs.Chatty(f"sync-{i}")) for i in range(3)]
    concurrent = [qm.dispatch("q", jobs.ChattyAsync(f"async-{i}")) for i in range(3)]
    worker = qm.worker("q", 6)
    while worker.run_once():
        pass
    for i, handle in enumerate(sync):
        output = handle.output or ""
        assert f"stdout: sync-{i}\n" in output and f"stderr: sync-{i}\n" in output and f"log: sync-{i}" in output
        assert "sync-" not in output.replace(f"sync-{i}", ""), "another job's lines leaked in"
    for i, handle in enumerate(concurrent):
        assert f"async stdout: async-{i}" in (handle.output or "") and f"async log: async-{i}" in (handle.output or "")
    printed = capsys.readouterr()
    assert "sync-" not in printed.out + printed.err
    assert qm.dispatch("q", jobs.Note("quiet")).output is None


def drain(qm: QueueManager, queue: str = "q") -> None:
    worker = qm.worker(queue, 4)
    while worker.run_once():
        pass


def test_a_chain_runs_its_steps_in_order_passing_results(make_manager: MakeManager) -> None:
    qm = make_manager()
    chain = qm.chain("q", [jobs.AddToPrevious(1), jobs.AddToPrevious(10), jobs.AddToPrevious(100)])
    assert qm.size("q") == 1  # only the first step is queued
    assert chain.status().steps == ["queued", "pending", "pending"]
    drain(qm)
    assert jobs.RECORD.order == [("add", 1, None), ("add", 10, 1), ("add", 100, 11)]
    assert chain.result(timeout=5) == 111
    assert chain.status().state == "succeeded"


def test_a_failed_step_stops_the_chain_and_retrying_it_resumes(make_manager: MakeManager) -> None:
    jobs.GATE.clear()
    qm = make_manager()
    chain = qm.chain("q", [jobs.AddToPrevious(4), jobs.Gated(), jobs.AddToPrevious(2)])
    drain(qm)
    status = chain.status()
    assert (status.state, status.failed_step, status.steps) == ("failed", 1, ["succeeded", "failed", "pending"])
    assert str(status) == "failed at step 2 of 3: 1 succeeded, 2 failed, 3 pending"  # counted as people count
    with pytest.raises(JobFailed, match="the gate is closed"):
        chain.result(timeout=5)
    jobs.GATE.set()  # the fix
    qm.failed.retry(chain.step(1).id)
    drain(qm)
    assert chain.result(timeout=5) == 42
    assert chain.status().steps == ["succeeded"] * 3


def test_a_chain_with_a_step_that_cant_be_stored_enqueues_nothing(make_manager: MakeManager) -> None:
    qm = make_manager()
    with pytest.raises(SerializationError, match="conn"):
        qm.chain("q", [jobs.Note("fine"), jobs.HoldsObject("x", jobs.Unstorable()), jobs.Note("never")])
    assert qm.size("q") == 0


def test_a_unique_job_is_enqueued_once_while_queued_or_running(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    first = qm.dispatch("q", jobs.DailyReport("2026-11-29"))
    assert qm.dispatch("q", jobs.DailyReport("2026-11-29")).id == first.id
    other_day = qm.dispatch("q", jobs.DailyReport("2026-11-30"))
    assert other_day.id != first.id and qm.size("q") == 2

    [running] = loop.run_sync(qm.driver.reserve(["q"], 1, "w", clock(), clock() + 30))
    assert running.id == first.id
    assert qm.dispatch("q", jobs.DailyReport("2026-11-29")).id == first.id  # still running
    loop.run_sync(qm.driver.complete([(running, None)], "w", clock()))
    again = qm.dispatch("q", jobs.DailyReport("2026-11-29"))  # the first finished: a new one
    assert again.id != first.id and qm.size("q") == 2

    @qm.job(queue="q", unique=True)
    def refresh(table: str) -> str:
        return table

    assert refresh.dispatch("prices").id == refresh.dispatch(table="prices").id
    assert refresh.dispatch("prices").id != refresh.dispatch("orders").id


def test_unique_dispatches_racing_from_many_connections_store_one_job(make_manager: MakeManager) -> None:
    first = make_manager()
    managers = [first] + [
        QueueManager(first.config, driver=first.driver) if first.config.driver == "memory" else make_manager()
        for _ in range(5)
    ]
    with ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(lambda qm: qm.dispatch("q", jobs.DailyReport("race")).id, managers * 4))
    assert len(ids) == 1 and first.size("q") == 1


def test_a_sync_dispatch_stores_the_job_without_waiting_for_neonnbs_loop(make_manager: MakeManager) -> None:
    qm = make_manager()
    qm.dispatch("q", jobs.Note("first"))  # on Redis a queue's first dispatch registers it, through the loop
    holding, release = threading.Event(), threading.Event()

    async def hold_the_loop() -> None:
        holding.set()
        release.wait(30)  # blocks neonnb's loop thread, as a long synchronous call on it would

    loop.submit(hold_the_loop())
    assert holding.wait(10)
    sent: list[JobHandle] = []
    try:
        dispatcher = threading.Thread(target=lambda: sent.append(qm.dispatch("q", jobs.Note("straight"))))
        dispatcher.start()
        dispatcher.join(10)
        assert sent, "the sync dispatch waited for neonnb's loop"
    finally:
        release.set()
    assert sent[0].fetch().status is Status.QUEUED


def test_sync_dispatches_from_many_threads_each_store_their_job(make_manager: MakeManager) -> None:
    qm = make_manager()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda n: qm.dispatch("q", jobs.Note(str(n))).id, range(400)))
    assert len(set(ids)) == 400 and qm.size("q") == 400
    assert sorted(int(decode_job(r).tag) for r in qm.jobs(queue="q", limit=400)) == list(range(400))


def test_an_app_on_uvloop_dispatches_and_runs_jobs_on_its_own_loop(make_manager: MakeManager) -> None:
    """uvicorn runs a FastAPI app on uvloop: the async API must work there as on asyncio's
    loop (uvloop's transports are not asyncio.Transport subclasses)."""
    uvloop = pytest.importorskip("uvloop")
    qm = make_manager(poll_interval=0.05)

    async def app() -> None:
        worker = qm.worker("q", 2)
        running = asyncio.create_task(worker.arun())
        try:
            handles = [await qm.adispatch("q", jobs.Note(f"uv-{i}")) for i in range(3)]
            assert [await h.aresult(timeout=10) for h in handles] == ["uv-0", "uv-1", "uv-2"]
        finally:
            await worker.astop()
            await running
        await qm.aclose()

    uvloop.run(app())


def test_cancel_a_queued_or_delayed_job_and_it_never_runs(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    now = qm.dispatch("q", jobs.Note("now"))
    later = qm.dispatch_after("q", jobs.Note("later"), 60)
    kept = qm.dispatch("q", jobs.Note("kept"))
    assert now.cancel() is Status.QUEUED and later.cancel() is Status.QUEUED
    assert qm.cancel("no-such-job") is None
    clock.advance(61)
    drain(qm)
    assert jobs.RECORD.order == ["kept"]
    assert now.status is Status.CANCELLED and later.status is Status.CANCELLED
    with pytest.raises(JobCancelled):
        now.result(timeout=1)
    assert kept.cancel() is Status.SUCCEEDED and kept.result(timeout=1) == "kept"  # too late: nothing changes
    counts = qm.stats()["q"]
    assert (counts.cancelled, counts.succeeded, counts.size) == (2, 1, 0)


@pytest.mark.parametrize("job", [jobs.SlowAsync(60), jobs.BlockingSync()], ids=["async", "sync"])
def test_cancel_a_running_job_stops_it(make_manager: MakeManager, job: object) -> None:
    jobs.RELEASE.clear()
    qm = make_manager(lease_timeout=0.3)  # the heartbeat, which brings the request, every 0.1 s
    worker = qm.worker("q", 1).start()
    try:
        handle = qm.dispatch("q", job)
        wait_until(lambda: handle.status is Status.RUNNING, what="the job to start")
        assert handle.cancel() is Status.RUNNING
        assert handle.wait(timeout=10) is Status.CANCELLED
        with pytest.raises(JobCancelled, match="was cancelled"):
            handle.result(timeout=1)
        after = qm.dispatch("q", jobs.Note("the worker goes on"))
        assert after.result(timeout=10) == "the worker goes on"
    finally:
        jobs.RELEASE.set()
        worker.stop()


def test_a_batch_handle_counts_its_jobs(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    batch = qm.dispatch_batch("q", [jobs.Note("a"), jobs.Permanent(), jobs.Note("c")], then=jobs.Note("all done"))
    assert len(batch) == 3 and [type(h).__name__ for h in batch] == ["JobHandle"] * 3  # still a list of handles
    assert batch.counts() == {"pending": 3, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
    assert batch.progress == 0.0
    batch[2].cancel()
    drain(qm)
    assert batch.counts() == {"pending": 0, "running": 0, "done": 1, "failed": 1, "cancelled": 1}
    assert batch.progress == 1.0
    assert batch[0].result(timeout=1) == "a"
    # Every job ended (one succeeded, one failed, one was cancelled): the callback ran, once.
    assert batch.then is not None and batch.then.result(timeout=1) == "all done"
    assert jobs.RECORD.counts["all done"] == 1
    drain(qm)
    assert jobs.RECORD.counts["all done"] == 1
    assert qm.dispatch_batch("q", [], then=jobs.Note("empty")).then is not None  # nothing to wait for


def test_every_batch_callback_runs_once_when_members_end_together(make_manager: MakeManager) -> None:
    # Two managers (two connections, as two processes) with eight slots each, on 60 batches
    # of 4: the last members of a batch often end at the same moment.
    managers = [make_manager(poll_interval=0.05) for _ in range(2)]
    batches = [managers[0].dispatch_batch("q", [jobs.Note(f"b{b}-{m}") for m in range(4)], then=jobs.Collect())
               for b in range(60)]
    workers = [qm.worker("q", 8).start() for qm in managers]
    try:
        wait_until(lambda: managers[0].stats()["q"].succeeded >= 300, timeout=90,
                   what="every member and every callback to succeed")
    finally:
        for worker in workers:
            worker.stop()
    assert jobs.RECORD.counts["collected"] == 60
    assert batches[7].then is not None
    assert batches[7].then.result(timeout=1) == [f"b7-{m}" for m in range(4)]


def test_a_batch_member_whose_worker_died_on_its_last_attempt_still_counts(
    make_manager: MakeManager, clock: FakeClock
) -> None:
    qm = make_manager(clock=clock, lease_timeout=30)
    batch = qm.dispatch_batch("q", [jobs.Last("doomed"), jobs.Last("fine")], then=jobs.Collect())
    [doomed] = loop.run_sync(qm.driver.reserve(["q"], 1, "dead-worker", clock(), clock() + 30))
    assert doomed.id == batch[0].id
    drain(qm)
    assert jobs.RECORD.counts["collected"] == 0, "the callback ran before every member ended"
    clock.advance(31)  # the dead worker's lease ends; housekeeping fails the job for good
    drain(qm)
    failed = qm.failed.get(batch[0].id)
    assert (failed.error_type, failed.attempts) == ("LeaseExpired", 1)
    assert batch.then is not None and batch.then.result(timeout=5) == [None, "fine"]
    assert jobs.RECORD.counts["collected"] == 1


def test_a_batch_callbacks_result_can_be_awaited_before_it_exists(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    batch = qm.dispatch_batch("q", [jobs.Note(f"n{i}") for i in range(3)], then=jobs.Collect())
    assert batch.then is not None
    waiting: list[object] = []
    waiter = threading.Thread(target=lambda: waiting.append(batch.then.result(timeout=30)))  # type: ignore[union-attr]
    waiter.start()
    worker = qm.worker("q", 2).start()
    try:
        waiter.join(30)
    finally:
        worker.stop()
    assert waiting == [["n0", "n1", "n2"]]


def test_a_worker_on_queue_high_runs_only_that_band(make_manager: MakeManager, clock: FakeClock) -> None:
    # The spec: DispatchWithPriority("emails", job, High); qm.Worker("emails:high", 5).
    qm = make_manager(clock=clock)
    for priority in (Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.HIGH):
        qm.dispatch_with_priority("emails", jobs.Note(priority.value), priority)
        clock.advance(0.001)
    qm.dispatch("reports", jobs.Note("report"))
    high = qm.worker("emails:high", 5)
    assert high.run_once() == 2 and jobs.RECORD.order == ["high", "high"]
    assert high.run_once() == 0, "the high-band worker took a job of another band"
    both = qm.worker(["emails:normal", "emails:low", "reports"], 5)
    while both.run_once():
        pass
    assert jobs.RECORD.order[2:] == ["normal", "low", "report"]


def test_a_started_band_worker_is_woken_for_its_band(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    worker = qm.worker("emails:high", 2).start()
    try:
        low = qm.dispatch_with_priority("emails", jobs.Note("low"), Priority.LOW)
        high = qm.dispatch_with_priority("emails", jobs.Note("high"), Priority.HIGH)
        assert high.result(timeout=10) == "high"
        assert low.status is Status.QUEUED
    finally:
        worker.stop()


def test_names_past_what_a_store_holds_are_refused_at_dispatch(make_manager: MakeManager) -> None:
    from neonnb import ConfigError, WorkerOptions

    qm = make_manager()
    for queue, message in [("q" * 201, "is 201 characters long; at most 200 fit"),
                           ("a\x00b", "a NUL byte"), ("}", "contains '{', '}'"),
                           ("emails:high", "names a worker's priority band: dispatch to 'emails' with priority 'high'"),
                           ("", "non-empty string")]:
        with pytest.raises(ConfigError, match=message):
            qm.dispatch(queue, jobs.Note("x"))
    with pytest.raises(ConfigError, match=r"unique key 'report:kkkk.* must be at most 300 characters"):
        qm.dispatch("q", jobs.DailyReport("k" * 400))
    with pytest.raises(ConfigError, match=r"WorkerOptions.worker_id .* at most 100 characters"):
        qm.worker("q", 1, WorkerOptions(worker_id="w" * 101))
    with pytest.raises(ConfigError, match=r"job name .* at most 300 characters"):
        qm.job(name="n" * 301)(lambda: None)
    assert qm.stats() == {}
    longest = qm.dispatch("q" * 200, jobs.DailyReport("k" * 292))  # the key is "report:" + 292 characters
    qm.worker("q" * 200, 1).run_once()
    assert longest.result(timeout=10) == "k" * 292


def test_progress_takes_numbers_and_old_bad_values_never_break_a_view(make_manager: MakeManager) -> None:
    qm = make_manager(max_retries=0)
    wrong = qm.dispatch("q", jobs.ProgressWrong())
    qm.worker("q", 1).run_once()
    assert "ctx.progress(done, total, message): done and total must be finite numbers" in qm.failed.get(wrong.id).error
    # A value stored before ctx.progress checked (or by hand) still renders everywhere.
    held = qm.dispatch("q", jobs.Note("held"))
    [record] = loop.run_sync(qm.driver.reserve(["q"], 1, "w", qm.clock(), qm.clock() + 60))
    for bad in ({"done": "abc", "total": "x", "message": 5}, {"done": 1, "total": 0}, {"done": None, "total": 2}):
        loop.run_sync(qm.driver.set_progress(record, "w", bad))
        frame = qm.jobs_df()
        assert frame.loc[frame["id"] == held.id, "progress"].isna().all()
        assert "job " + held.id in held._repr_html_()


DEEP = "[" * 20_000 + "]" * 20_000  # JSON nested deeper than Python's reader recurses; fits a TEXT column
NOT_UTF8 = object()  # _corrupt: bytes that aren't UTF-8, stored as text


def _corrupt(qm: QueueManager, job_id: str, queue: str, **fields: object) -> None:
    """Write fields of a stored job by hand, as another program (or a bit flip) might."""
    if qm.config.driver == "memory":
        pytest.skip("the memory store holds Python objects: nothing to corrupt")
    if qm.config.driver == "redis":
        import redis

        key = f"{qm.config.key_prefix}{{{queue}}}:job:{job_id}"
        client: Any = redis.Redis.from_url(qm.config.connection)
        try:
            client.hset(key, mapping=fields)
        except redis.exceptions.MovedError:  # a cluster
            client.close()
            client = redis.RedisCluster.from_url(qm.config.connection)
            client.hset(key, mapping=fields)
        client.close()
        return
    from sqlalchemy import text

    # Untyped SQL: SQLAlchemy's column types would refuse text for a number (SQLite takes it).
    with qm.driver.engine.begin() as conn:  # type: ignore[attr-defined]
        for column, value in fields.items():
            if value is NOT_UTF8:  # text (not a blob) whose bytes aren't UTF-8: SQLite stores what it is given
                conn.execute(text(f"UPDATE neonnb_jobs SET {column} = CAST(X'fffe7b' AS TEXT) WHERE id = :id"),
                             {"id": job_id})
                continue
            statement = text(f"UPDATE neonnb_jobs SET {column} = :value WHERE id = :id")
            conn.execute(statement, {"value": value, "id": job_id})


def test_an_unreadable_record_fails_alone_and_never_blocks_its_queue(make_manager: MakeManager) -> None:
    qm = make_manager(max_retries=0)
    sqlite, redis_store = str(qm.config.connection).startswith("sqlite"), qm.config.driver == "redis"
    corruptions: list[dict[str, object]] = [{"flow": "{bad json"}, {"flow": "[1, 2]"}, {"flow": DEEP}]
    if redis_store:  # (attempts a claim repairs: it counts from 0)
        corruptions += [{"payload": b"\xff\xfe{"}, {"max_attempts": "many"}, {"run_at": "soon"}]
    else:
        corruptions += [{"priority": 7}]
    if sqlite:  # (text in attempts or run_at a claim repairs or never finds due)
        corruptions += [{"max_attempts": "many"}, {"timeout": "long"}, {"payload": NOT_UTF8}]
    corruptions += [{"payload": '{"rows": ' + DEEP + "}"}]  # listings decode the arguments
    poisoned = [qm.dispatch("q", jobs.Note(f"poison-{i}")) for i in range(len(corruptions))]
    for handle, fields in zip(poisoned, corruptions, strict=True):
        _corrupt(qm, handle.id, "q", **fields)
    zombie = qm.dispatch("listed", jobs.Note("zombie"))
    _corrupt(qm, zombie.id, "listed", status="zombie", progress="{")
    good = [qm.dispatch("q", jobs.Note(f"good-{i}")) for i in range(20)]
    # Every view still works, and shows the broken records for what they are.
    listed = {r.id: r for r in qm.jobs(limit=1000)}
    assert listed[zombie.id].broken and "status" in listed[zombie.id].broken
    assert sum(c.size + c.failed for c in qm.stats().values()) >= len(good)
    worker = qm.worker("q", 8)
    while worker.run_once():
        pass
    assert [h.result(timeout=5) for h in good] == [f"good-{i}" for i in range(20)]
    assert {h.fetch().attempts for h in good} == {1}, "a good job was charged an attempt"
    failed = {f.id: f for f in qm.failed.list(limit=100)}
    for handle, fields in zip(poisoned, corruptions, strict=True):
        assert handle.id in failed, f"{fields} was not sent to the failed store"
        assert "PayloadError" in failed[handle.id].error_type
        if "payload" in fields:  # its arguments are asked for whole: a clear error, not a crash
            with pytest.raises(PayloadError, match="stored arguments can't be read"):
                qm.failed.arguments(handle.id)
    assert qm.failed_df() is not None and len(qm.jobs_df(limit=1000)) >= 21


def test_jobs_claimed_for_a_worker_that_never_got_them_go_back_uncharged(
    make_manager: MakeManager, clock: FakeClock
) -> None:
    qm = make_manager(clock=clock)
    handles = [qm.dispatch("q", jobs.Note(f"n{i}")) for i in range(3)]
    other = qm.dispatch("other", jobs.Note("elsewhere"))
    claimed = loop.run_sync(qm.driver.reserve(["q", "other"], 4, "w", clock(), clock() + 30))
    assert len(claimed) == 4
    held = [handles[0].id]
    assert loop.run_sync(qm.driver.release_unheld(["q"], "w", held, clock())) == 2
    assert handles[0].status is Status.RUNNING and other.status is Status.RUNNING  # held, or not on these queues
    assert [(h.status, h.fetch().attempts) for h in handles[1:]] == [(Status.QUEUED, 0)] * 2
    assert loop.run_sync(qm.driver.release_unheld(["q"], "somebody-else", [], clock())) == 0


def test_progress_is_seen_from_another_connection_as_the_job_reports_it(make_manager: MakeManager) -> None:
    # lease_timeout 30: the heartbeat runs every 10 s, so only a prompt progress write shows.
    qm = make_manager(poll_interval=0.05, lease_timeout=30)
    observer = qm if qm.config.driver == "memory" else make_manager()
    for step in jobs.STEPS:
        step.clear()
    handle = qm.dispatch("q", jobs.Stepwise())
    worker = qm.worker("q", 1).start()
    try:
        seen = observer.handle(handle.id)
        for i, step in enumerate(jobs.STEPS, start=1):
            wait_until(lambda i=i: (seen.progress or {}).get("done") == i, timeout=3,  # type: ignore[misc]
                       what=f"step {i} to be visible in the store")
            assert (seen.progress or {}).get("message") == f"step {i}"
            step.set()
        assert handle.result(timeout=10) == "stepped"
    finally:
        for step in jobs.STEPS:
            step.set()
        worker.stop()


def test_pages_of_jobs_walk_every_job_once_newest_first_by_cursor(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock)
    dispatched = []
    for i in range(12):
        dispatched.append(qm.dispatch("pa" if i % 3 else "pb", jobs.Note(f"n{i}")))
        clock.advance(0.5)
    dispatched += qm.dispatch_batch("pa", [jobs.Note(f"b{i}") for i in range(5)])  # one timestamp
    clock.advance(1)
    failing = [qm.dispatch("pf", jobs.Permanent()) for _ in range(4)]
    worker, failer = qm.worker("pa", 1), qm.worker("pf", 1)
    for _ in range(6):  # the oldest six jobs of pa succeed and four of pf fail, one a second
        worker.run_once()
        failer.run_once()
        clock.advance(1)
    claimed = loop.run_sync(qm.driver.reserve(["pb"], 2, "w", clock(), clock() + 30))  # two of pb run
    newest_first = [h.id for h in reversed(dispatched + failing)]

    def walk(size: int, **where: Any) -> list[str]:
        ids: list[str] = []
        page = qm.jobs(limit=size, **where)
        while True:
            ids += [r.id for r in page]
            if page.cursor is None:
                return ids
            assert len(page) == size
            page = qm.jobs(limit=size, cursor=page.cursor, **where)

    everything = [r.id for r in qm.jobs(limit=100)]
    assert everything == newest_first
    assert walk(4) == everything and walk(1) == everything and walk(100) == everything
    assert walk(3, queue="pb") == [i for i in newest_first if qm.handle(i).fetch().queue == "pb"]
    states = {r.id: r for r in qm.jobs(limit=100)}
    for status in (Status.QUEUED, Status.RUNNING):
        assert walk(2, status=status) == [i for i in newest_first if states[i].status is status]
    assert set(walk(2, status=Status.RUNNING)) == {r.id for r in claimed}
    succeeded = walk(2, status=Status.SUCCEEDED)  # finished jobs: by when they finished
    assert len(succeeded) == 6 and [states[i].finished_at for i in succeeded] == sorted(
        (states[i].finished_at for i in succeeded), reverse=True)
    assert succeeded == [h.id for h in dispatched if h.id in set(succeeded)][::-1]
    assert walk(3, status=Status.FAILED) == [h.id for h in reversed(failing)]
    assert walk(3, status=Status.FAILED, queue="pa") == []
    with pytest.raises(ConfigError, match="cursor 'x/y' is not one a page of jobs gave"):
        qm.jobs(cursor="x/y")


def test_stats_of_a_store_too_big_to_count_often_are_served_from_the_last_count(
    make_manager: MakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    qm = make_manager()
    qm.dispatch_batch("big", [jobs.Note(str(i)) for i in range(12)])
    assert qm.stats()["big"].size == 12, "a cheap count is made on every call"
    # Say any count is costly, for a store of ten jobs or more, and may be made rarely.
    monkeypatch.setattr(Counting, "CHEAP", 0.0)
    monkeypatch.setattr(Counting, "SMALL", 10)
    monkeypatch.setattr(Counting, "SHARE", 1e-9)
    assert qm.stats()["big"].size == 12
    qm.dispatch_batch("big", [jobs.Note("more") for _ in range(3)])
    served = qm.stats()
    assert served["big"].size == 12, "served from the last count"
    served["big"].delayed = 99  # a copy: changing it changes nothing served later
    assert qm.stats()["big"].delayed == 0
    monkeypatch.setattr(Counting, "SHARE", 1e9)  # the last count is stale at once
    assert qm.stats()["big"].size == 12, "the call that finds it stale does not wait for the new count"
    wait_until(lambda: qm.stats()["big"].size == 15, what="the count made again in the background")
    monkeypatch.setattr(Counting, "SMALL", 10_000)
    qm.dispatch("big", jobs.Note("one more"))
    assert qm.stats()["big"].size == 16, "a small store is counted on every call again"


# --- values: arguments and results are data ---------------------------------------------------

def _values() -> dict[str, Any]:
    import datetime as dt
    import uuid
    import zoneinfo
    from decimal import Decimal

    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(
        {"region": pd.Categorical(["eu", "us", "eu"]),
         "when": pd.date_range("2026-03-29", periods=3, tz="Europe/Berlin"),
         "count": pd.array([1, None, 3], dtype="Int64"), "name": pd.array(["a", None, "c"], dtype="string"),
         "price": [1.5, float("nan"), -0.0]},
        index=pd.MultiIndex.from_tuples([("x", 1), ("x", 2), ("y", 1)], names=["group", "n"]))
    return {
        "json": {"a": [1, 2.5, "x", None, True], "nested": {"b": []}},
        "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
        "dict with nan": {"price": float("nan"), "qty": 2},
        "a dict with a $type key": {"$type": "datetime", "value": "not a tag"},
        "frame": frame, "frame with int columns": pd.DataFrame(np.arange(6).reshape(2, 3)),
        "series": pd.Series([1.0, 2.0], index=pd.Index(["a", "b"], name="k"), name="price"),
        "unnamed series": pd.Series(pd.Categorical(["lo", "hi"])),
        "array": np.arange(12, dtype="float32").reshape(3, 4), "datetime array": np.array(["2026-01-01"], "M8[s]"),
        "int64": np.int64(7), "float64": np.float64(0.25), "bool_": np.bool_(True),
        "datetime": dt.datetime(2026, 3, 29, 1, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin")),
        "naive datetime": dt.datetime(2026, 1, 2, 3, 4, 5, 6), "date": dt.date(2026, 2, 28),
        "time": dt.time(23, 59, 1), "timedelta": dt.timedelta(days=-1, microseconds=3),
        "decimal": Decimal("10.250"), "uuid": uuid.UUID(int=7), "bytes": b"\x00\xffneonnb",
        "timestamp": pd.Timestamp("2026-05-01 12:00", tz="UTC"),
    }


def assert_same(got: Any, want: Any, what: str) -> None:
    import math

    import numpy as np
    import pandas as pd

    assert type(got) is type(want), (what, type(got), type(want))
    if isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
    elif isinstance(want, pd.Series):
        pd.testing.assert_series_equal(got, want)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for key in want:
            assert_same(got[key], want[key], f"{what}[{key!r}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), what
    else:
        assert got == want, what
        if hasattr(want, "tzinfo"):
            assert str(got.tzinfo) == str(want.tzinfo), what


def _run_elsewhere(qm: QueueManager, queue: str, tmp_path: Any) -> None:
    """Drain ``queue`` with a `neonnb worker` in another process (in this one for the memory
    store, which no other process can reach)."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import write_config

    if qm.config.driver == "memory":
        worker = qm.worker(queue, 2)
        while worker.run_once():
            pass
        return
    config = write_config(qm, tmp_path)
    done = subprocess.run([sys.executable, "-m", "neonnb", "worker", config, "-q", queue, "--burst", "-c", "2",
                           "--import", "tests.data_jobs"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_kind_of_value_comes_back_equal_and_of_its_type_from_a_worker_elsewhere(
        make_manager: MakeManager, tmp_path: Any) -> None:
    import numpy as np

    from tests import data_jobs

    qm = make_manager()
    values = _values()
    handles = {name: qm.dispatch("values", data_jobs.Echo(value)) for name, value in values.items()}
    part = data_jobs.frame_of(9)
    typed = qm.dispatch("values", data_jobs.Summarise(part, np.float64(2.0), np.ones(3)))  # type: ignore[arg-type]
    nothing = qm.dispatch("values", data_jobs.ReturnsAnObject())
    _run_elsewhere(qm, "values", tmp_path)
    for name, value in values.items():
        assert_same(handles[name].result(timeout=60), value, name)
    expected = data_jobs.Summarise(part, 2.0, np.ones(3)).handle(None)  # type: ignore[arg-type]
    assert_same(typed.result(timeout=60), expected, "a typed job's frame")
    with pytest.raises(JobFailed, match=r"ResultError.*builtins\.object"):
        nothing.result(timeout=60)
    record = nothing.fetch()
    assert (record.status, record.attempts) == (Status.FAILED, 1), "never stored as None, never retried"


def test_typed_data_fields_are_checked_at_dispatch(make_manager: MakeManager) -> None:
    import numpy as np

    from tests import data_jobs

    qm = make_manager()
    with pytest.raises(SerializationError, match=r"Summarise\.part: expected DataFrame, got list"):
        qm.dispatch("values", data_jobs.Summarise([1, 2], 1.0, np.ones(1)))  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=r"dtype object"):
        qm.dispatch("values", data_jobs.Echo(np.array([object()])))
    assert qm.stats() == {}


@pytest.mark.parametrize("make_manager", ["sqlite", "postgres", "redis"], indirect=True)
def test_a_million_row_frame_comes_back_from_a_worker_elsewhere(make_manager: MakeManager, tmp_path: Any) -> None:
    from tests import data_jobs

    qm = make_manager()
    handle = qm.dispatch("big", data_jobs.BigFrame(1_000_000))
    _run_elsewhere(qm, "big", tmp_path)
    assert_same(handle.result(timeout=120), data_jobs.frame_of(1_000_000), "a million rows")


def test_a_batch_of_50_with_3_failures_gives_its_results_as_data(make_manager: MakeManager) -> None:
    import pandas as pd

    qm = make_manager()

    @qm.job(queue="parts", max_attempts=1)
    def load(index: int, region: str = "eu"):  # type: ignore[no-untyped-def]
        if index in (7, 21, 42):
            raise ValueError(f"partition {index} is corrupt")
        return pd.DataFrame({"index": [index], "region": [region]})

    batch = load.starmap([(i, "us") if i % 2 else {"index": i} for i in range(50)])
    qm.worker("parts", 4).start()
    finished = [handle.id for handle in batch.as_completed(timeout=60)]
    assert sorted(finished) == sorted(h.id for h in batch)
    with pytest.raises(JobFailed, match="partition 7 is corrupt"):
        batch.results(timeout=30)
    returned = batch.results(timeout=30, errors="return")
    assert [i for i, r in enumerate(returned) if isinstance(r, JobFailed)] == [7, 21, 42]
    assert len(batch.results(timeout=30, errors="skip")) == 47
    frame = batch.results_df(timeout=30)
    assert list(frame["index"]) == [i for i in range(50) if i not in (7, 21, 42)]
    assert list(frame["region"][:3]) == ["eu", "us", "eu"]
    with pytest.raises(TypeError, match="give a tuple of positional arguments or a dict"):
        load.starmap([3])
