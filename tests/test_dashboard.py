"""The dashboard, reprs and DataFrames without a kernel: trait values after a refresh."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

import neonnb._loop as loop
from neonnb import Config, QueueManager, Status, render
from tests import jobs
from tests.conftest import FakeClock, wait_until


@pytest.fixture
def qm(clock: FakeClock) -> Iterator[QueueManager]:
    manager = QueueManager(Config(driver="memory"), clock=clock)
    yield manager
    manager.close()


def test_refresh_shows_queues_running_progress_and_failed_jobs(qm: QueueManager) -> None:
    jobs.RELEASE.clear()
    qm.dispatch("q", jobs.Note("waiting-1"))
    qm.dispatch_with_priority("q", jobs.Note("urgent"), "high")
    qm.dispatch("q", jobs.Permanent())
    qm.dispatch("q", jobs.Halfway())  # reports 1 of 2, then waits for RELEASE
    worker = qm.worker("q", 4).start()
    try:
        wait_until(lambda: qm.stats()["q"].failed == 1 and qm.stats()["q"].running == 1, what="one failed, one running")
        wait_until(lambda: (qm.jobs(Status.RUNNING)[0].progress or {}).get("done") == 1, what="progress saved")
        dashboard = qm.dashboard(interval=None)
        loop.run_sync(dashboard.refresh())

        assert "neonnb-queues" in dashboard.queues.value
        assert "<td style" in dashboard.queues.value and ">1</td>" in dashboard.queues.value  # one failed
        [running] = dashboard.running.children
        bar = running.children[0]
        assert bar.value == 0.5 and "neonnb-progress" in bar._dom_classes
        assert running.children[1].value == "half way"
        [failed_row] = dashboard.failed.children
        assert "ValueError" in failed_row.children[2].value and "<details" in failed_row.children[2].value
        assert "Note" in dashboard.recent.value

        shown = dashboard.queues.value
        loop.run_sync(dashboard.refresh())
        assert dashboard.queues.value is shown, "an unchanged refresh must not set the trait again"

        jobs.RELEASE.set()
        worker.stop()  # so the retried job stays in the queue for us to see
        loop.run_sync(dashboard.refresh())
        assert dashboard.running.children == ()

        failed_row.children[0].click()  # retry: back to the queue, attempts reset
        wait_until(lambda: not dashboard.failed.children, what="the failed row to go after retry")
        counts = qm.stats()["q"]
        assert counts.failed == 0 and counts.waiting["normal"] == 1
        dashboard.close()
    finally:
        jobs.RELEASE.set()
        worker.stop()


def test_worker_controls_start_and_stop_a_worker(qm: QueueManager) -> None:
    dashboard = qm.dashboard(interval=None)
    dashboard.queue_name.value = "controls"
    dashboard.concurrency.value = 3
    dashboard.start_button.click()
    [worker] = qm.workers
    assert worker.queues == ["controls"] and worker.concurrency == 3
    handle = qm.dispatch("controls", jobs.Note("via the button"))
    assert handle.result(timeout=10) == "via the button"
    dashboard.stop_button.click()
    wait_until(lambda: not worker.is_running, what="the worker to stop")
    dashboard.close()


def test_the_queue_controls_pause_and_resume_a_queue(qm: QueueManager) -> None:
    qm.dispatch("mail", jobs.Note("held"))
    qm.dispatch("other", jobs.Note("free"))
    dashboard = qm.dashboard(interval=None)
    loop.run_sync(dashboard.refresh())
    assert dashboard.queue_pick.options == ("mail", "other")
    dashboard.queue_pick.value = "mail"
    dashboard.pause_button.click()
    wait_until(lambda: qm.stats()["mail"].paused, what="the queue to pause")
    wait_until(lambda: "mail (paused)" in dashboard.queues.value, what="the panel to say so")
    assert qm.worker(["mail", "other"], 2).run_once() == 1, "only the other queue's job ran"
    dashboard.resume_button.click()
    wait_until(lambda: not qm.stats()["mail"].paused, what="the queue to resume")
    assert qm.worker("mail", 1).run_once() == 1
    dashboard.close()


def test_the_controls_propose_the_stores_only_queue_not_the_default(qm: QueueManager) -> None:
    qm.dispatch("etl", jobs.Note("waiting"))
    dashboard = qm.dashboard(interval=None)
    loop.run_sync(dashboard.refresh())
    assert dashboard.queue_name.value == "etl"
    dashboard.queue_name.value = "mine"  # what the user typed stays
    loop.run_sync(dashboard.refresh())
    assert dashboard.queue_name.value == "mine"
    dashboard.close()


def test_dataframes_have_typed_columns(qm: QueueManager, clock: FakeClock) -> None:
    qm.dispatch("q", jobs.Note("a"))
    qm.dispatch_after("q", jobs.Note("later"), 60)
    qm.dispatch("q", jobs.Permanent())
    worker = qm.worker("q", 1)
    while worker.run_once():
        pass

    queues = qm.queues_df()
    assert queues.loc["q", "delayed"] == 1 and queues.loc["q", "succeeded"] == 1 and queues.loc["q", "failed"] == 1
    assert str(queues.dtypes["waiting"]) == "int64"

    frame = qm.jobs_df()
    assert len(frame) == 3
    assert str(frame.dtypes["created_at"]) == "datetime64[ns, UTC]"
    assert str(frame.dtypes["status"]) == "category"
    assert set(frame["status"]) == {"queued", "succeeded", "failed"}
    assert list(qm.jobs_df(status="succeeded")["name"]) == [jobs.Note.job_name]

    failed = qm.failed_df()
    assert list(failed["error_type"]) == ["ValueError"]
    assert str(failed.dtypes["failed_at"]) == "datetime64[ns, UTC]"

    with pytest.raises(Exception, match="unknown status 'done'"):
        qm.jobs_df(status="done")

    qm.worker("q", 2).start()
    wait_until(lambda: len(qm.known_workers()) == 1, what="the worker to register")
    workers = qm.workers_df()
    assert list(workers["concurrency"]) == [2] and list(workers["state"]) == ["running"]


def test_reprs_are_short_text_and_themed_html(qm: QueueManager) -> None:
    handle = qm.dispatch("q", jobs.Permanent())
    qm.worker("q", 1).run_once()
    assert repr(handle) == f"<JobHandle {handle.id}>"
    assert "neonnb-job" in handle._repr_html_() and "failed" in handle._repr_html_()
    failed = qm.failed.get(handle.id)
    assert repr(failed) == f"<FailedJob {handle.id} {jobs.Permanent.job_name}: ValueError>"
    assert "--jp-" in failed._repr_html_() and "traceback" in failed._repr_html_()
    assert "neonnb-manager" in qm._repr_html_()
    assert "neonnb-worker" in qm.worker("q", 2)._repr_html_()


def test_dashboard_shows_schedules_chains_and_batches(qm: QueueManager) -> None:
    scheduler = qm.scheduler()
    scheduler.every("nightly", "1d", jobs.Note("nightly"))
    chain = qm.chain("flows", [jobs.AddToPrevious(1), jobs.AddToPrevious(2)])
    qm.dispatch_batch("flows", [jobs.Note("a"), jobs.Note("b")])
    dashboard = qm.dashboard(interval=None)
    loop.run_sync(dashboard.refresh())
    assert "nightly" in dashboard.schedules.value and "every 86400s" in dashboard.schedules.value
    chain_row, batch_row = dashboard.workflows.children
    assert chain_row.children[0].description == "chain of 2" and chain_row.children[0].value == 0.0
    assert "running: 1 queued, 2 pending" in chain_row.children[1].value  # steps counted from 1
    worker = qm.worker("flows", 2)
    while worker.run_once():
        pass
    loop.run_sync(dashboard.refresh())
    assert chain_row.children[0].value == 1.0 and "succeeded" in chain_row.children[1].value
    assert batch_row.children[0].value == 1.0 and "2 done" in batch_row.children[1].value
    assert chain.result(timeout=1) == 3
    dashboard.close()


def test_a_running_job_handle_displays_a_live_progress_bar(qm: QueueManager) -> None:
    import ipywidgets

    from neonnb.notebook import live

    jobs.RELEASE.clear()
    handle = qm.dispatch("q", jobs.Halfway())
    worker = qm.worker("q", 1).start()
    try:
        wait_until(lambda: (handle.progress or {}).get("done") == 1, what="progress saved")
        bundle = handle._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        bar, label = ipywidgets.FloatProgress(min=0.0, max=1.0), ipywidgets.HTML()
        following = loop.submit(live._follow(handle, bar, label, interval=0.05))
        wait_until(lambda: bar.value == 0.5 and "half way" in label.value, what="the bar to follow the job")
        jobs.RELEASE.set()
        following.result(timeout=10)  # it stops by itself when the job ends
        assert bar.value == 1.0 and "succeeded" in label.value
        assert "text/html" in handle._repr_mimebundle_()  # finished: plain HTML again
    finally:
        jobs.RELEASE.set()
        worker.stop()


def test_re_running_the_dashboard_cell_keeps_one_refresher(qm: QueueManager) -> None:
    from neonnb.notebook import dashboard as panel

    shown = [qm.dashboard(interval=0.05) for _ in range(10)]  # a cell re-run ten times
    assert all(d is shown[0] for d in shown)
    assert len([d for d in panel._open if d.manager is qm]) == 1
    shown[0].close()
    again = qm.dashboard(interval=0.05)  # closed: the next call makes a new one
    assert again is not shown[0] and not again.closed
    assert len([d for d in panel._open if d.manager is qm]) == 1
    again.close()


def _visible(dashboard: Any) -> set[str]:
    return {name for name, box in dashboard.sections.items() if box.layout.display != "none"}


def test_the_panel_reads_like_a_product(qm: QueueManager) -> None:
    """A summary card; only sections with something in them; running means started; failed
    rows keep their buttons' size and fold their tracebacks; the kernel's workers in words."""
    dashboard = qm.dashboard(interval=None)
    loop.run_sync(dashboard.refresh())
    assert _visible(dashboard) == set(), "an empty store shows no empty sections"
    assert "in memory" in dashboard.header.value and "None" not in dashboard.header.value
    assert "0 queued" in dashboard.header.value and dashboard.retry_all.layout.display == "none"

    jobs.RELEASE.clear()
    for i in range(3):
        qm.dispatch("q", jobs.Note(f"n{i}"))
    qm.dispatch("q", jobs.Permanent())
    qm.dispatch("q", jobs.Halfway())
    worker = qm.worker("q", 4).start()
    idle = qm.worker("elsewhere", 1).start()
    try:
        wait_until(lambda: (qm.jobs(Status.RUNNING)[0].progress or {}).get("done") == 1, what="progress saved")
        wait_until(lambda: qm.stats()["q"].succeeded == 3 and qm.stats()["q"].failed == 1, what="the quick ones")
        # A job claimed under a kernel worker's id that its handler doesn't run (as one that
        # ended and waits for its ack): not shown as running.
        held = qm.dispatch("q2", jobs.Note("finished, waiting for its ack"))
        [claimed] = loop.run_sync(qm.driver.reserve(["q2"], 1, idle.id, qm.clock(), 60.0))
        assert claimed.id == held.id
        loop.run_sync(dashboard.refresh())

        header = dashboard.header.value
        assert "2 workers in this kernel" in header and "3 done" in header and "1 failed" in header
        assert _visible(dashboard) == {"queues", "running", "recent", "failed"}
        [row] = dashboard.running.children
        bar, message, elapsed = row.children
        assert (bar.value, message.value, bar.description) == (0.5, "half way", "Halfway")
        # As tqdm puts it: share, elapsed < left, steps a second (1 of 2 steps done).
        assert re.fullmatch(r"50% · \d+\.\d s < \d+\.\d s( · \d+\.\d/s)?", elapsed.value), elapsed.value
        assert render.progress_times(0.25, 3.0, 5) == "25% · 3.0 s < 9.0 s · 1.7/s"
        assert render.progress_times(None, 75.0) == "75 s" and render.progress_times(1.0, 2.0) == "100% · 2.0 s"
        assert "neonnb-status-succeeded" in dashboard.recent.value and "neonnb-status-failed" in dashboard.recent.value
        assert "took" in dashboard.recent.value and "neonnb-id" in dashboard.recent.value

        [failed_row] = dashboard.failed.children
        retry, _forget, detail = failed_row.children
        assert retry.layout.min_width == "70px" and retry.layout.flex == "0 0 auto"
        assert "<details" in detail.value and "Traceback" in detail.value and detail.layout.min_width == "0"
        assert "tests/jobs.py" in detail.value and "neonnb/worker.py" not in detail.value  # the job's frames only

        state = dashboard.worker_state.value
        assert "q" in state and "elsewhere" in state and "neonnb-status-running" in state and "busy" in state
        assert "neonnb.Worker" not in state
        assert (dashboard.queue_name.value, dashboard.concurrency.value) == ("q", 4)  # from the running one

        bundle = dashboard._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert "neonnb-snapshot" in bundle["text/html"] and "bad input" in bundle["text/html"]
        assert "VBox" not in bundle["text/plain"]
    finally:
        jobs.RELEASE.set()
    dashboard.stop_button.click()  # stops every worker of the kernel, however it was started
    wait_until(lambda: not worker.is_running and not idle.is_running, what="all the kernel's workers to stop")
    dashboard.close()


def test_a_failed_chain_shows_a_red_bar_and_the_step_counted_from_one(qm: QueueManager) -> None:
    jobs.GATE.clear()
    chain = qm.chain("flows", [jobs.AddToPrevious(1), jobs.Gated()])
    worker = qm.worker("flows", 1)
    while worker.run_once():
        pass
    assert chain.status().state == "failed"
    dashboard = qm.dashboard(interval=None)
    loop.run_sync(dashboard.refresh())
    [row] = dashboard.workflows.children
    assert row.children[0].bar_style == "danger"
    assert "failed at step 2 of 2" in row.children[1].value
    dashboard.close()


def test_a_batch_followed_by_the_panel_reads_only_its_unfinished_jobs(qm: QueueManager) -> None:
    batch = qm.dispatch_batch("q", [jobs.Note(f"n{i}") for i in range(50)])
    asked: list[int] = []
    get_many = qm.driver.get_many

    async def counting(ids: list[str], queue: str | None = None) -> Any:
        asked.append(len(ids))
        return await get_many(ids, queue)

    qm.driver.get_many = counting  # type: ignore[method-assign]
    assert batch.counts()["pending"] == 50
    worker = qm.worker("q", 4)
    for _ in range(10):  # 40 of the 50 run
        worker.run_once()
    assert batch.counts() == {"pending": 10, "running": 0, "done": 40, "failed": 0, "cancelled": 0}
    assert batch.counts()["done"] == 40
    assert asked == [50, 50, 10], "a done job stays done: it need not be read again"


def test_jobs_df_with_results_decodes_small_ones_and_describes_big_ones(tmp_path: Any) -> None:
    from tests import data_jobs

    with QueueManager(Config.for_url(f"sqlite:///{tmp_path / 'jobs.db'}")) as qm:
        small = qm.dispatch("q", data_jobs.Echo({"rows": 3, "ok": True}))
        big = qm.dispatch("q", data_jobs.Echo(data_jobs.frame_of(50_000)))
        worker = qm.worker("q", 1)
        while worker.run_once():
            pass
        frame = qm.jobs_df(results=True).set_index("id")
        assert frame.loc[small.id, "result"] == {"rows": 3, "ok": True}
        assert "bytes kept apart at file:" in str(frame.loc[big.id, "result"]), "big: described, not read"
        assert "result" not in qm.jobs_df().columns


def test_a_batch_with_some_failures_is_yellow_with_its_parts_in_proportion(qm: QueueManager) -> None:
    batch = qm.dispatch_batch("q", [jobs.Note(f"n{i}") for i in range(8)] + [jobs.Permanent() for _ in range(2)])
    worker = qm.worker("q", 1)
    while worker.run_once():
        pass
    dashboard = qm.dashboard(interval=None)
    loop.run_sync(dashboard.refresh())
    [row] = dashboard.workflows.children
    bar, text = row.children
    assert (bar.value, bar.bar_style) == (1.0, "warning") and len(batch) == 10
    assert "width:64.0px;background:var(--jp-success-color1" in text.value  # 8 of 10 done
    assert "width:16.0px;background:var(--jp-error-color1" in text.value and "8 done, 2 failed" in text.value
    dashboard.close()


def test_a_batch_displays_as_one_live_bar_then_as_html(qm: QueueManager) -> None:
    jobs.RELEASE.clear()
    batch = qm.dispatch_batch("q", [jobs.Note("a"), jobs.Halfway(), jobs.Permanent()])
    worker = qm.worker("q", 3).start()
    try:
        wait_until(lambda: batch.counts()["running"] == 1 and batch.counts()["failed"] == 1, what="one running")
        live = batch._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in live
    finally:
        jobs.RELEASE.set()
    wait_until(lambda: batch.progress == 1.0, what="the batch to end")
    done = batch._repr_mimebundle_()
    assert "batch of 3: 2 done, 1 failed" in done["text/html"] and "neonnb-segments" in done["text/html"]
    worker.stop()


def test_recently_finished_jobs_of_one_kind_fold_into_one_line(qm: QueueManager) -> None:
    for i in range(6):
        qm.dispatch("q", jobs.Note(f"n{i}"))
    qm.dispatch("q", jobs.Permanent())
    worker = qm.worker("q", 1)
    while worker.run_once():
        pass
    dashboard = qm.dashboard(interval=None)
    loop.run_sync(dashboard.refresh())
    recent = dashboard.recent.value
    assert recent.count("<tr>") == 3  # the header, the failed one, the six notes in one line
    assert "Note x 6" in recent and "Permanent<" in recent
    dashboard.close()


def test_the_panel_links_to_the_web_dashboard_jupyter_serves_for_its_store(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jupyter_server_proxy")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    with QueueManager(Config.for_url(url)) as qm:
        monkeypatch.setenv("NEONNB_URL", url)
        served = qm.dashboard(interval=None)
        loop.run_sync(served.refresh())
        assert "href='/user/ada/neonnb/'" in served.header.value
        served.close()
        monkeypatch.setenv("NEONNB_URL", "sqlite:///another.db")
        other = qm.dashboard(interval=None)
        loop.run_sync(other.refresh())
        assert "web dashboard" not in other.header.value, "Jupyter serves another store there"
        other.close()
