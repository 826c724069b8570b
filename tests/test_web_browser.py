"""The web dashboard's page in a real browser (Playwright, headless Chromium): `neonnb
dashboard` on a SQLite store, a job failing in a `neonnb worker` of another process appears
within about a second, and retry from the page queues it again, where it runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neonnb import Config, QueueManager, Status
from tests import jobs
from tests.conftest import wait_until
from tests.services import answers, free_port, unavailable

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "artifacts"
TOKEN = "page-test-token"


def test_a_job_failing_elsewhere_shows_within_a_second_and_retry_from_the_page_runs_it(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    port = free_port()
    log = (tmp_path / "processes.log").open("w")
    env = {**os.environ, "NEONNB_DASHBOARD_TOKEN": TOKEN}
    dashboard = subprocess.Popen([sys.executable, "-m", "neonnb", "dashboard", url, "--port", str(port)], cwd=ROOT,
                                 stdout=log, stderr=log, env=env)
    with QueueManager(Config.for_url(url)) as qm:
        scheduler = qm.scheduler()
        scheduler.cron("nightly-report", "0 2 * * *", jobs.DailyReport("sales"), tz="Europe/Berlin", queue="reports")
        scheduler.start()
        try:
            page_url = f"http://127.0.0.1:{port}/?token={TOKEN}"
            wait_until(lambda: answers(f"http://127.0.0.1:{port}/api/queues"), what="neonnb dashboard to listen")
            with playwright.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1100, "height": 700})
                page.goto(page_url)
                page.wait_for_selector("text=no failed jobs")
                assert "token" not in page.url, "the token left the address bar (and so history)"
                assert "SQLite" in page.inner_text("h1")
                page.wait_for_selector("#schedules >> text=nightly-report")
                assert "0 2 * * *" in page.inner_text("#schedules") and "Europe/Berlin" in page.inner_text("#schedules")
                handle = qm.dispatch("far", jobs.FailsWhereTold())
                worker = subprocess.run(
                    [sys.executable, "-m", "neonnb", "worker", url, "-q", "far", "--import", "tests.jobs", "--burst"],
                    cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "NEONNB_TEST_FAIL": "1"})
                assert worker.returncode == 0, worker.stderr
                failed_at = time.monotonic()
                row = page.locator(f"#failed td[data-job-id='{handle.id}']")
                row.wait_for(timeout=5000)
                seen_after = time.monotonic() - failed_at
                assert seen_after < 2.5, f"the failed job showed {seen_after:.1f}s after it failed"
                assert "told to fail in this process" in page.inner_text("#failed")
                # The queue's last hour, from the events of that worker process: every attempt failed.
                page.wait_for_selector("#queues td.failure-rate >> text=100.0%", timeout=5000)
                page.locator("#queues button[data-action='pause']").first.click()  # the one queue, far
                page.wait_for_selector("#queues >> text=paused", timeout=5000)
                assert qm.stats()["far"].paused
                page.locator("#queues button[data-action='resume']").first.click()
                page.wait_for_selector("#queues button[data-action='pause']", timeout=5000)
                assert not qm.stats()["far"].paused
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "web-dashboard.png"), full_page=True)
                page.fill("#token", "wrong-token")
                page.dispatch_event("#token", "change")
                page.locator("#failed button[data-action='retry']").first.click()
                page.wait_for_selector("#problem >> text=needs the dashboard's token")
                page.wait_for_timeout(2500)  # two refreshes later the complaint still shows
                assert "needs the dashboard's token" in page.inner_text("#problem")
                assert handle.status is Status.FAILED
                page.fill("#token", TOKEN)
                page.dispatch_event("#token", "change")
                page.locator("#failed button[data-action='retry']").first.click()
                page.wait_for_selector("text=no failed jobs", timeout=5000)
                assert handle.status is Status.QUEUED

                # The jobs list, filtered, and one job's view: arguments, error, traceback.
                done = qm.dispatch("far", jobs.Note("shown in the job view"))
                assert qm.worker("far", 1).run_once() == 1  # the retried one runs first: done is still queued
                page.select_option("#f-status", "queued")
                page.locator(f"#jobs td[data-job-id='{done.id}']").wait_for(timeout=5000)
                assert "succeeded" not in page.inner_text("#jobs")
                page.fill("#f-id", handle.id)
                page.dispatch_event("#f-id", "change")
                page.wait_for_selector("#job >> text=told to fail in this process", timeout=5000)
                view = page.inner_text("#job")
                assert "traceback" in view and "FailsWhereTold" in view and "attempts" in view
                page.select_option("#f-status", "")
                page.locator(f"#jobs td[data-job-id='{done.id}']").click()
                page.wait_for_selector('#job >> text={"tag":"shown in the job view"}', timeout=5000)
                page.fill("#f-name", "nothing-like-this")
                page.dispatch_event("#f-name", "change")
                page.wait_for_selector("#jobs >> text=no such jobs", timeout=5000)
                browser.close()
            assert qm.worker("far", 1).run_once() == 1  # here NEONNB_TEST_FAIL is not set: it succeeds
            assert handle.result(timeout=10) == "ran"
        finally:
            scheduler.stop()
            dashboard.terminate()
            dashboard.wait(timeout=10)
            log.close()
