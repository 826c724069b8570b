"""The dashboard in a real browser: JupyterLab on loopback, a notebook run in headless
Chromium driven by Playwright. Skips where Chromium is missing (fails under
NEONNB_REQUIRE_SERVICES=1); `.ci/run` installs it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from tests.services import free_port, unavailable

CHROMIUM = "/usr/bin/chromium"
# The panel's screenshots, light and dark, kept after the run (docs/dashboard.png is made from one).
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "artifacts"

CELLS = [
    "import time\nimport neonnb\nqm = neonnb.connect('memory://')",
    # A 4 s job reporting every 0.1 s: its bar must be seen at several values while it runs.
    "@qm.job\ndef crunch(ctx, steps: int) -> int:\n    for i in range(steps):\n        time.sleep(0.1)\n"
    "        ctx.progress(i + 1, steps, f'step {i + 1}')\n    return steps",
    "@qm.job(queue='fragile', max_attempts=1)\ndef explode(n: int) -> None:\n"
    "    raise ValueError(f'boom {n} from the browser test ' + 'with a long explanation ' * 12)",
    "dashboard = qm.dashboard(interval=0.2)\ndashboard",
    # The 'fragile' worker stops after its two jobs, so a retried job stays queued.
    "qm.worker('default', 1).start()\nqm.worker('fragile', 1, neonnb.WorkerOptions(max_jobs=2)).start()\n"
    "crunch.dispatch(40)\nexplode.dispatch(1)\nexplode.dispatch(2)",
    # The kernel is busy in sync code while the jobs run: the panel must move anyway.
    "time.sleep(15)",
]


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    root = tmp_path / "lab"
    root.mkdir()
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook = new_notebook(cells=[new_code_cell(c) for c in CELLS], metadata={"kernelspec": kernelspec})
    nbformat.write(notebook, root / "dashboard.ipynb")
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = free_port(), os.urandom(8).hex()
    log = open(tmp_path / "jupyterlab.log", "w")  # noqa: SIM115 - closed in the finally below
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=subprocess.DEVNULL, stderr=log,
        # Settings of its own (no "Jupyter news?" pop-up) and a workspace of its own: a layout saved
        # by an earlier run (a sidebar left wide) must not narrow this one's notebook.
        env={**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
             "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or lab.poll() is not None:
                    raise RuntimeError(f"JupyterLab did not start; see {tmp_path / 'jupyterlab.log'}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/lab/tree/dashboard.ipynb?token={token}", tmp_path
    finally:
        lab.terminate()
        lab.wait(30)
        log.close()
        shutil.rmtree(root / ".ipynb_checkpoints", ignore_errors=True)


def test_dashboard_shows_progress_and_failed_job_and_retry_moves_it_back(jupyterlab: tuple[str, Path]) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    url, output = jupyterlab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            page.goto(url)
            page.locator(".jp-Notebook").wait_for(timeout=60_000)
            select_kernel = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
            with contextlib.suppress(PlaywrightTimeout):  # JupyterLab asks for a kernel on some runs
                select_kernel.click(timeout=10_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
            page.get_by_text("Run All Cells", exact=True).click()

            dashboard = page.locator(".neonnb-dashboard")
            dashboard.wait_for(timeout=60_000)
            bar = dashboard.locator(".neonnb-progress .progress-bar")
            bar.first.wait_for(timeout=30_000)
            widths: set[float] = set()
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and bar.count():
                with contextlib.suppress(PlaywrightTimeout):  # the bar goes as the job ends
                    style = bar.first.get_attribute("style", timeout=500) or ""
                    if found := re.search(r"\bwidth: ([\d.]+)%", style):
                        widths.add(float(found.group(1)))
                time.sleep(0.1)
            partial = sorted(w for w in widths if 0 < w < 100)
            assert len(partial) >= 3, f"the bar took only {sorted(widths)} while the job ran"
            busy = page.locator(".jp-Cell").last.locator(".jp-InputPrompt")
            expect(busy).to_have_text("[*]:")  # the bar moved while the kernel ran the sleeping cell
            failed = dashboard.locator(".neonnb-failed-job")
            expect(failed).to_have_count(2, timeout=30_000)
            expect(failed.first).to_contain_text("from the browser test")
            for button in ("retry", "forget"):  # a long error must not squeeze them
                box = failed.first.locator(f".neonnb-{button}").bounding_box()
                assert box is not None and box["width"] >= 69, f"the {button} button is {box}"
            failed.first.locator("summary").click()  # the folded error and traceback open
            expect(failed.first.locator("pre")).to_contain_text("Traceback")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            dashboard.screenshot(path=str(ARTIFACTS / "dashboard-light.png"))

            first = failed.first.inner_text()
            failed.first.locator(".neonnb-retry").click()
            expect(failed).to_have_count(1, timeout=30_000)
            assert failed.first.inner_text() != first
            failed.first.locator(".neonnb-forget").click()
            expect(failed).to_have_count(0, timeout=30_000)
            expect(dashboard.locator(".neonnb-section-failed")).to_be_hidden()  # no empty section
            fragile = dashboard.locator(".neonnb-queues tr", has_text="fragile")
            # queue, high, normal, low, delayed, running, succeeded, failed
            expect(fragile.locator("td").nth(2)).to_have_text("1", timeout=30_000)  # the retried one, queued
            expect(fragile.locator("td").nth(7)).to_have_text("0")  # the forgotten one, gone

            # Narrow (a side-by-side window, a phone): every control stays inside the panel.
            page.keyboard.press("Control+b")  # the file browser closed: the notebook gets the width
            page.set_viewport_size({"width": 400, "height": 1100})
            time.sleep(1)
            panel = dashboard.bounding_box()
            assert panel is not None
            controls = dashboard.locator("button, input")
            outside = []
            for i in range(controls.count()):
                box = controls.nth(i).bounding_box()
                if box is not None and box["width"] and box["x"] + box["width"] > panel["x"] + panel["width"] + 1:
                    outside.append((controls.nth(i).inner_text() or controls.nth(i).get_attribute("class"), box))
            dashboard.screenshot(path=str(ARTIFACTS / "dashboard-400px.png"))
            assert outside == [], f"controls outside the 400 px panel {panel}: {outside}"
            page.set_viewport_size({"width": 1400, "height": 1100})
            page.keyboard.press("Control+b")

            page.locator(".lm-MenuBar-itemLabel", has_text="Settings").click()
            page.locator(".lm-Menu-itemLabel").get_by_text("Theme", exact=True).hover()
            page.locator(".lm-Menu-itemLabel").get_by_text("JupyterLab Dark", exact=True).click()
            page.locator("body[data-jp-theme-light='false']").wait_for(state="attached", timeout=30_000)
            time.sleep(1)
            dashboard.screenshot(path=str(ARTIFACTS / "dashboard-dark.png"))
            page.keyboard.press("Control+b")
            page.set_viewport_size({"width": 400, "height": 1100})
            time.sleep(1)
            dashboard.screenshot(path=str(ARTIFACTS / "dashboard-dark-400px.png"))
        except Exception:
            page.screenshot(path=str(output / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
