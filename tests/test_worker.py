"""Worker and manager behaviour beyond the storage contract, on every driver."""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

import neonnb._loop as loop
from neonnb import (
    Config,
    Context,
    Job,
    JobEvent,
    JobFailed,
    JobRecord,
    QueueManager,
    SerializationError,
    Status,
    WorkerOptions,
)
from neonnb.capture import _Router
from tests import jobs
from tests.conftest import FakeClock, wait_until

MakeManager = Callable[..., QueueManager]


@pytest.fixture(autouse=True)
def fresh_recorder() -> None:
    jobs.RECORD.__init__()  # type: ignore[misc]


def test_unserialisable_field_is_refused_and_nothing_is_enqueued(make_manager: MakeManager) -> None:
    qm = make_manager()
    with pytest.raises(SerializationError, match=r"HoldsObject\.conn is a tests\.jobs\.Unstorable"):
        qm.dispatch("q", jobs.HoldsObject("a", jobs.Unstorable()))
    with pytest.raises(SerializationError, match=r"HoldsObject\.conn"):
        qm.dispatch_batch("q", [jobs.Note("fine"), jobs.HoldsObject("b", jobs.Unstorable())])
    assert qm.stats() == {}


def test_an_argument_of_the_wrong_type_fails_the_dispatch_not_the_job(make_manager: MakeManager) -> None:
    qm = make_manager()

    @qm.job(queue="q")
    def double(n: int, scale: float = 1.0) -> float:
        return 2 * n * scale

    with pytest.raises(SerializationError, match=r"can't dispatch: tests\.jobs\.Note\.tag: expected str, got int 7"):
        qm.dispatch("q", jobs.Note(7))  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=r"double\(n=\.\.\.\): expected int, got 'three'"):
        double.dispatch("three")
    with pytest.raises(SerializationError, match=r"Note\.tag"):
        qm.dispatch_batch("q", [jobs.Note("fine"), jobs.Note(None)])  # type: ignore[arg-type]
    assert qm.stats() == {}
    handle = double.dispatch(3, scale=2)  # an int where a float goes fits
    qm.worker("q", 1).run_once()
    assert handle.result(timeout=10) == 12.0


def test_a_job_not_defined_yet_in_this_kernel_waits_uncharged_then_fails(
        make_manager: MakeManager, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """A kernel restarted: its worker starts before the cell defining the job has run again."""
    qm = make_manager(clock=clock)
    name = f"__main__.Resize{uuid.uuid4().hex[:8]}"  # each store's run defines its own
    later = _store_raw(qm, name, "{}")
    never = _store_raw(qm, "__main__.Crop", "{}")
    worker = qm.worker("q", 1)
    assert worker.run_once() + worker.run_once() == 2
    for job_id in (later, never):
        record = qm.handle(job_id).fetch()
        assert (record.status, record.attempts, record.run_at) == (Status.QUEUED, 0, clock() + 5), "back, uncharged"
    assert worker.run_once() == 0, "not before it is due again"
    assert sum("not defined in this process yet" in r.getMessage() for r in caplog.records) == 2, "once per type"

    class Resize(Job, job_name=name):
        def handle(self, ctx: Context) -> str:
            return "resized"

    clock.advance(5)
    while worker.run_once():
        pass
    assert qm.handle(later).result(timeout=10) == "resized"
    clock.advance(600)
    while worker.run_once():
        pass
    failed = qm.handle(never).fetch()
    assert (failed.status, failed.attempts) == (Status.FAILED, 1)
    assert "defined in a notebook" in (failed.error or {})["message"]


def _store_raw(qm: QueueManager, name: str, payload: str) -> str:
    record = JobRecord(id=f"raw-{name}-{len(payload)}", queue="q", name=name, payload=payload, run_at=qm.clock(),
                       created_at=qm.clock())
    loop.run_sync(qm.driver.enqueue([record]))
    return record.id


def test_unknown_type_and_corrupt_payload_go_to_the_failed_store(make_manager: MakeManager) -> None:
    qm = make_manager()
    missing = _store_raw(qm, "billing.jobs.SendInvoice", "{}")
    not_json = _store_raw(qm, "tests.jobs.Note", "{not json")
    wrong_type = _store_raw(qm, "tests.jobs.Note", '{"tag": 5}')
    after = qm.dispatch("q", jobs.Note("still working"))
    worker = qm.worker("q", 2)
    while worker.run_once():
        pass
    assert after.result(timeout=1) == "still working"
    errors = {f.id: f for f in qm.failed.list()}
    assert errors[missing].error_type == "neonnb.errors.UnknownJobError"
    assert "neonnb worker --import billing.jobs" in errors[missing].error
    assert "not valid JSON" in errors[not_json].error
    assert errors[wrong_type].error.startswith("tests.jobs.Note.tag: expected str, got int 5 (the stored arguments")
    assert all(f.attempts == 1 for f in errors.values()), "retrying can't fix these"


def test_progress_is_stored_and_events_are_emitted(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock, retry_delay=1, max_retries=1)
    seen: list[JobEvent] = []
    unsubscribe = qm.events.subscribe(seen.append)
    handle = qm.dispatch("q", jobs.Progressing(4))
    flaky = qm.dispatch("q", jobs.Flaky(attempts=2))
    worker = qm.worker("q", 1)
    worker.run_once()
    worker.run_once()
    clock.advance(1)
    worker.run_once()
    unsubscribe()
    assert handle.result(timeout=1) == 4
    assert handle.progress == {"done": 4, "total": 4, "message": "step 4"}
    kinds = [(e.kind, e.job_id) for e in seen]
    assert kinds[:6] == [("started", handle.id)] + [("progress", handle.id)] * 4 + [("succeeded", handle.id)]
    assert [k for k, j in kinds if j == flaky.id] == ["started", "retrying", "started", "failed"]
    assert seen[-1].error is not None and seen[-1].error["message"] == "flaky attempt 2"


def test_dependencies_are_injected_and_a_missing_one_says_how(make_manager: MakeManager) -> None:
    qm = make_manager(max_retries=0)
    qm.provide(db="engine://demo")
    ok = qm.dispatch("q", jobs.UsesDependency("db"))
    missing = qm.dispatch("q", jobs.UsesDependency("storage"))
    qm.worker("q", 2).run_once()
    assert ok.result(timeout=1) == "engine://demo"
    with pytest.raises(JobFailed, match=r"call qm.provide\(storage=...\)"):
        missing.result(timeout=1)


def test_timeouts_fail_async_and_sync_handlers(make_manager: MakeManager) -> None:
    qm = make_manager()
    slow_async = qm.dispatch("q", jobs.TimesOutAsync())
    slow_sync = qm.dispatch("q", jobs.TimesOutSync())
    qm.worker("q", 2).run_once()
    for handle in (slow_async, slow_sync):
        failed = qm.failed.get(handle.id)
        assert failed.error_type == "neonnb.errors.JobTimeout"
        assert failed.error == "job ran longer than its timeout of 0.1s"
    wait_until(lambda: "noticed-cancel" in jobs.RECORD.counts, what="the sync job to see ctx.cancelled")


def test_max_jobs_stops_the_worker(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    qm.dispatch_batch("q", [jobs.Note(str(i)) for i in range(5)])
    worker = qm.worker("q", 2, WorkerOptions(max_jobs=3))
    worker.run()
    assert worker.jobs_started == 3 and not worker.is_running
    assert qm.size("q") == 2


def test_burst_worker_exits_when_nothing_is_due(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    qm.dispatch_batch("q", [jobs.Note(str(i)) for i in range(5)])
    qm.dispatch_after("q", jobs.Note("later"), 3600)
    qm.worker("q", 2, WorkerOptions(burst=True)).run()
    assert qm.stats()["q"].succeeded == 5


def test_function_jobs_dispatch_map_and_redefinition(make_manager: MakeManager) -> None:
    qm = make_manager()

    @qm.job(queue="fn", max_attempts=2)
    def scale(x: int, factor: float = 2.0, ctx: object = None) -> float:
        jobs.RECORD.add(type(ctx).__name__)
        return x * factor

    assert scale(3) == 6.0  # still a plain function
    first = qm.dispatch("fn", scale.call(10))
    qm.worker("fn", 1).run_once()
    assert first.result(timeout=1) == 20.0
    assert jobs.RECORD.order == ["NoneType", "Context"]  # direct call, then a worker's call
    one = scale.dispatch(3, factor=1.5)
    many = scale.map([1, 2, 3])
    assert one.fetch().max_attempts == 2

    @qm.job(queue="fn")
    def scale(x: int, factor: float = 2.0, ctx: object = None) -> float:
        return -x

    qm.worker("fn", 4).run_once()
    assert one.result(timeout=1) == -3
    assert [h.result(timeout=1) for h in many] == [-1, -2, -3]
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        scale.dispatch(factor=3)

    @qm.job(queue="fn")
    def ctx_first(ctx: Context, x: int) -> int:  # callers pass x only, positionally or not
        ctx.progress(1, 1)
        return x + 1

    handles = [ctx_first.dispatch(1), ctx_first.dispatch(x=2)]
    qm.worker("fn", 2).run_once()
    assert [h.result(timeout=1) for h in handles] == [2, 3]


def test_results_expire_after_their_ttl(make_manager: MakeManager, clock: FakeClock) -> None:
    qm = make_manager(clock=clock, result_ttl=60, lease_timeout=4)  # housekeeping every second
    handle = qm.dispatch("q", jobs.Note("kept"))
    worker = qm.worker("q", 1)
    worker.run_once()
    clock.advance(59)
    worker.run_once()
    assert handle.result(timeout=1) == "kept"
    clock.advance(2)
    worker.run_once()
    with pytest.raises(LookupError, match="finished more than result_ttl"):
        handle.status  # noqa: B018


def test_async_api_works_from_another_event_loop(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)

    async def main() -> str:
        worker = qm.worker("q", 1)
        runner = asyncio.create_task(worker.arun())
        handle = await qm.adispatch("q", jobs.AsyncNote("from my loop"))
        result = await handle.aresult(timeout=10)
        await worker.astop()
        await runner
        await qm.aclose()  # this loop's connections end with it
        return str(result)

    assert asyncio.run(main()) == "from my loop"


def test_sync_calls_on_the_background_loop_are_refused(make_manager: MakeManager) -> None:
    qm = make_manager()

    async def misuse() -> None:
        qm.size("q")

    with pytest.raises(RuntimeError, match=r"use the async twin"):
        loop.run_sync(misuse())


def test_a_stopped_manager_worker_can_restart(make_manager: MakeManager) -> None:
    qm = make_manager(poll_interval=0.05)
    worker = qm.worker("q", 1).start()
    worker.stop()
    worker.start()
    handle = qm.dispatch("q", jobs.Note("again"))
    assert handle.result(timeout=10) == "again"
    assert worker.is_running
    worker.stop()
    assert threading.current_thread() is threading.main_thread()
    assert handle.status is Status.SUCCEEDED


def test_a_job_class_can_choose_its_stored_name(make_manager: MakeManager) -> None:
    qm = make_manager()
    handle = qm.dispatch("q", jobs.Renamed())
    assert handle.fetch().name == "reports.renamed"
    qm.worker("q", 1).run_once()
    assert handle.result(timeout=1) == "reports.renamed"


def test_a_stream_router_outliving_its_stream_flushes_nothing() -> None:
    """Jobs' output is routed by wrappers around sys.stdout/stderr; one collected (or flushed)
    after the real stream closed, as at a kernel's shutdown, must not raise (Python 3.13
    reports it as an unraisable exception)."""
    real = io.TextIOWrapper(io.BytesIO())
    router = _Router(real)
    router.write("before\n")
    real.close()
    router.flush()


@pytest.mark.parametrize("ending", ["close", "exit without close"])
def test_a_script_on_sqlite_prints_nothing_and_unregisters_its_worker_at_exit(tmp_path: Path, ending: str) -> None:
    """At exit the open manager closes before the interpreter stops its thread pools and
    closes the lock file's descriptor: no warning, and its worker unregistered."""
    import subprocess
    import sys

    from tests.test_redis import _QUIET_SCRIPT

    script = tmp_path / "quiet.py"
    script.write_text(_QUIET_SCRIPT)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    done = subprocess.run([sys.executable, "-W", "error", str(script), url, ending], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    with QueueManager(Config.for_url(url)) as qm:
        assert qm.known_workers() == []
