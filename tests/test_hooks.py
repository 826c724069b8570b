"""Hooks: the extension point around every job (neonnb.hooks), on every store."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from neonnb import Config, Hook, JobRecord, Outcome, QueueManager, Status, _loop
from tests import jobs
from tests.conftest import FakeClock

MakeManager = Callable[..., QueueManager]


class Watching(Hook):
    """Writes down every call, and what the store holds when the outcome is about to be stored."""

    def __init__(self, qm: QueueManager) -> None:
        self.qm = qm
        self.calls: list[tuple[Any, ...]] = []

    def before_job(self, job: JobRecord) -> None:
        self.calls.append(("before", job.id, job.attempts))

    async def settle(self, job: JobRecord, outcome: Outcome) -> None:
        stored = await self.qm.driver.get(job.id, job.queue)
        assert stored is not None
        self.calls.append(("settle", job.id, outcome.status.value, stored.status.value))

    def on_success(self, job: JobRecord, result: str | None) -> None:
        self.calls.append(("success", job.id, result))

    def on_retry(self, job: JobRecord, error: dict[str, Any], delay: float) -> None:
        self.calls.append(("retry", job.id, error["message"], delay))

    def on_failure(self, job: JobRecord, error: dict[str, Any]) -> None:
        self.calls.append(("failure", job.id, error["type"], error["message"]))


def test_a_hook_sees_each_attempt_and_settles_before_the_outcome_is_stored(
    make_manager: MakeManager, clock: FakeClock
) -> None:
    qm = make_manager(clock=clock, retry_delay=1)
    hook = Watching(qm)
    remove = qm.add_hook(hook)
    ok = qm.dispatch("q", jobs.Note("fine"))
    flaky = qm.dispatch("q", jobs.Flaky(attempts=2))
    worker = qm.worker("q", 1)
    assert worker.run_once() == 1
    assert worker.run_once() == 1
    clock.advance(1)
    assert worker.run_once() == 1
    assert [c for c in hook.calls if c[1] == ok.id] == [
        ("before", ok.id, 1), ("settle", ok.id, "succeeded", "running"), ("success", ok.id, '"fine"'),
    ]
    assert [c for c in hook.calls if c[1] == flaky.id] == [
        ("before", flaky.id, 1), ("settle", flaky.id, "queued", "running"),
        ("retry", flaky.id, "flaky attempt 1", 1.0),
        ("before", flaky.id, 2), ("settle", flaky.id, "failed", "running"),
        ("failure", flaky.id, "ConnectionError", "flaky attempt 2"),
    ]
    remove()
    qm.dispatch("q", jobs.Note("unwatched"))
    assert worker.run_once() == 1
    assert len(hook.calls) == 9, "a removed hook is called no more"


class Raises(Hook):
    def before_job(self, job: JobRecord) -> None:
        raise RuntimeError("before_job broke")

    def on_progress(self, job: JobRecord, progress: dict[str, Any]) -> None:
        raise RuntimeError("on_progress broke")

    def after_job(self, job: JobRecord, outcome: Outcome) -> None:
        raise RuntimeError("after_job broke")


def test_a_failing_hook_never_stops_a_job_or_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    with QueueManager(Config(driver="memory")) as qm:
        qm.add_hook(Raises())
        first = qm.dispatch("q", jobs.Progressing(2))
        second = qm.dispatch("q", jobs.Note("after"))
        with caplog.at_level(logging.ERROR, "neonnb.hooks"):
            assert qm.worker("q", 1).run_once() == 1
            assert qm.worker("q", 1).run_once() == 1
        assert first.result(timeout=5) == 2
        assert second.result(timeout=5) == "after"
        broken = {r.getMessage().split(" failed")[0] for r in caplog.records}
        assert broken == {"hook Raises.before_job", "hook Raises.on_progress", "hook Raises.after_job"}


class SettlesOnSecondTry(Hook):
    def __init__(self) -> None:
        self.tries = 0

    async def settle(self, job: JobRecord, outcome: Outcome) -> None:
        self.tries += 1
        if self.tries == 1:
            raise ConnectionError("the hook's own store is away")


def test_a_settle_that_fails_is_tried_again_before_the_outcome_is_stored() -> None:
    with QueueManager(Config(driver="memory")) as qm:
        hook = SettlesOnSecondTry()
        qm.add_hook(hook)
        handle = qm.dispatch("q", jobs.Note("settled"))
        assert qm.worker("q", 1).run_once() == 1
        assert handle.result(timeout=5) == "settled"
        assert hook.tries == 2


def test_jobs_ended_outside_a_worker_reach_the_hooks(clock: FakeClock) -> None:
    """A queued job cancelled, and a job whose worker died on its last attempt."""
    with QueueManager(Config(driver="memory", lease_timeout=30, max_retries=0), clock=clock) as qm:
        hook = Watching(qm)
        qm.add_hook(hook)
        seen = []
        qm.events.subscribe(lambda event: seen.append((event.kind, event.job_id)))
        waiting = qm.dispatch("q", jobs.Note("never runs"))
        assert qm.cancel(waiting.id) is Status.QUEUED
        dying = qm.dispatch("q", jobs.Note("its worker dies"))
        _loop.run_sync(qm.driver.reserve(["q"], 1, "dead", clock(), clock() + 30))
        clock.advance(31)
        assert qm.worker("q", 1).run_once() == 0  # housekeeping ends the job
        assert ("failure", waiting.id, "neonnb.errors.JobCancelled", "cancelled before it ran") in hook.calls
        assert ("settle", dying.id, "failed", "running") in hook.calls
        assert ("failure", dying.id, "LeaseExpired", hook.calls[-1][3]) == hook.calls[-1]
        assert seen == [("cancelled", waiting.id), ("failed", dying.id)]


def test_only_hooks_are_hooks() -> None:
    with QueueManager(Config(driver="memory")) as qm, pytest.raises(TypeError, match=r"neonnb\.Hook subclass"):
        qm.add_hook(print)  # type: ignore[arg-type]
