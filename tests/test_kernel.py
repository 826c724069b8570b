"""neonnb inside a real IPython kernel (nbclient) and an in-process IPython shell."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

import neonnb._loop as loop


@pytest.fixture
def kernel() -> Iterator[Any]:
    """Run cells one at a time in a fresh kernel: `run(source)` returns (outputs, seconds)."""
    notebook = new_notebook()
    client = NotebookClient(notebook, timeout=60, kernel_name="python3")

    def run(source: str) -> tuple[list[Any], float]:
        cell = new_code_cell(source)
        notebook.cells.append(cell)
        started = time.perf_counter()
        client.execute_cell(cell, len(notebook.cells) - 1)
        return cell.outputs, time.perf_counter() - started

    run.notebook = notebook  # type: ignore[attr-defined]
    with client.setup_kernel():
        yield run


def text(outputs: list[Any]) -> str:
    return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)


def test_the_kernel_stays_responsive_while_jobs_run_and_top_level_await_works(kernel: Any) -> None:
    kernel("%load_ext neonnb\n%load_ext neonnb\n%neonnb connect memory://")  # loading twice is harmless
    kernel("import time\n@qm.job\ndef nap(i: int) -> int:\n    time.sleep(1)\n    return i")
    kernel("handles = nap.map(range(20))\n%neonnb start -c 20")
    kernel("import threading\nassert sum(t.name.startswith('neonnb-job') for t in threading.enumerate()) > 0")
    outputs, seconds = kernel("sum(range(10))")
    assert text(outputs) == "45"
    assert seconds < 0.5, f"a trivial cell took {seconds:.2f}s while jobs ran"
    outputs, _ = kernel("still_running = qm.stats()['default'].running\nstill_running")
    assert int(text(outputs)) > 0, "the jobs had finished before the responsiveness check meant anything"
    outputs, _ = kernel("await handles[7].aresult(timeout=30)")
    assert text(outputs) == "7"
    outputs, _ = kernel("sum(h.result(timeout=30) for h in handles)")
    assert text(outputs) == "190"
    kernel("%unload_ext neonnb")
    outputs, _ = kernel("import neonnb._loop\nneonnb._loop._thread is None")
    assert text(outputs) == "True"


def test_a_job_defined_in_a_cell_is_replaced_by_re_running_the_cell(kernel: Any) -> None:
    kernel("%load_ext neonnb\n%neonnb connect memory://\n%neonnb start")
    kernel("@qm.job\ndef greet(name: str) -> str:\n    return f'hello {name}'")
    kernel("@qm.job\ndef greet(name: str) -> str:\n    return f'goodbye {name}'")
    outputs, _ = kernel("greet.dispatch('you').result(timeout=10)")
    assert text(outputs) == "'goodbye you'"


WIDGET = "application/vnd.jupyter.widget-view+json"


def test_a_shown_panel_carries_a_picture_and_a_closed_one_leaves_it(kernel: Any) -> None:
    """What GitHub, nbviewer or a notebook opened without its kernel show: a static HTML
    snapshot of the panel's last state, never `VBox(children=...`."""
    kernel("import neonnb\nfrom tests import jobs\nqm = neonnb.connect('memory://')\n"
           "qm.dispatch('q', jobs.Permanent())\nqm.worker('q', 1).run_once()")
    shown, _ = kernel("panel = qm.dashboard()\npanel")
    [bundle] = [o["data"] for o in shown if o.get("output_type") == "display_data"]
    assert WIDGET in bundle and "neonnb-snapshot" in bundle["text/html"]
    assert "bad input" in bundle["text/html"] and "1 failed" in bundle["text/html"]
    assert "VBox" not in bundle["text/plain"]
    kernel("panel.close()")
    [closed] = [o["data"] for o in shown]  # nbclient applies the display update to the earlier cell
    assert WIDGET not in closed and "neonnb-snapshot" in closed["text/html"] and "(closed)" in closed["text/plain"]


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "neonnb")
    yield ip
    ip.run_line_magic("unload_ext", "neonnb")
    InteractiveShell.clear_instance()
    assert loop._thread is None


def test_magics_connect_start_status_failed_retry_output_and_debug(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_line_magic("neonnb", "connect memory://")
    qm = shell.user_ns["qm"]
    shell.run_cell("@qm.job(max_attempts=1)\ndef parse(text: str) -> int:\n"
                   "    print('parsing', text)\n    doubled = text * 2\n    return int(doubled)")
    parse = shell.user_ns["parse"]
    bad = parse.dispatch("forty-two")
    worker = shell.run_line_magic("neonnb", "start -c 2")
    assert worker.is_running
    bad.wait(timeout=10)

    failed = shell.run_line_magic("neonnb", "failed")
    assert list(failed["id"]) == [bad.id] and list(failed["error_type"]) == ["ValueError"]
    shell.run_line_magic("neonnb", f"output {bad.id}")
    assert "parsing forty-two" in capsys.readouterr().out

    # The job runs again with its stored argument and the debugger opens where it failed,
    # with that frame's locals, as %debug does.
    monkeypatch.setattr("sys.stdin", io.StringIO("p doubled\ncontinue\n"))
    interrupt = signal.getsignal(signal.SIGINT)
    shell.run_line_magic("neonnb", f"debug {bad.id}")
    printed = capsys.readouterr().out
    assert f"job {bad.id} (__main__.parse) failed again: ValueError" in printed
    assert "'forty-twoforty-two'" in printed
    assert signal.getsignal(signal.SIGINT) is interrupt, "the Interrupt button must interrupt again"

    dashboard = shell.run_line_magic("neonnb", "status")
    assert "neonnb-dashboard" in dashboard.widget._dom_classes
    shell.run_line_magic("neonnb", "stop")
    assert not worker.is_running
    shell.run_line_magic("neonnb", "pause default")
    assert qm.stats()["default"].paused and "paused 'default'" in capsys.readouterr().out
    handle = shell.run_line_magic("neonnb", f"retry {bad.id}")
    assert handle.id == bad.id and qm.size() == 1
    assert qm.worker("default", 1).run_once() == 0, "paused"
    shell.run_line_magic("neonnb", "resume default")
    assert not qm.stats()["default"].paused
    with pytest.raises(Exception, match="unknown %neonnb command 'frobnicate'"):
        shell.run_line_magic("neonnb", "frobnicate")


def test_debug_opens_an_async_job_post_mortem_at_its_failing_frame(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_line_magic("neonnb", "connect memory://")
    shell.run_cell("import asyncio\n"
                   "async def check(rows):\n    bad = [r for r in rows if r < 0]\n    assert not bad, 'negative rows'\n"
                   "@qm.job(max_attempts=1)\nasync def audit(rows: list) -> int:\n"
                   "    await asyncio.sleep(0)\n    total = sum(rows)\n    await check(rows)\n    return total")
    qm = shell.user_ns["qm"]
    bad = shell.user_ns["audit"].dispatch([3, -1, 4])
    qm.worker("default", 1).run_once()
    assert bad.fetch().status.value == "failed"
    # At the failing frame (check's), then one frame up (audit's), with their locals.
    monkeypatch.setattr("sys.stdin", io.StringIO("p bad\nup\np total\ncontinue\n"))
    assert shell.run_line_magic("neonnb", f"debug {bad.id}") is None
    printed = capsys.readouterr().out
    assert "failed again: AssertionError: negative rows" in printed
    assert "[-1]" in printed and "\n6\n" in printed.replace("ipdb> ", "\n")

    good = shell.user_ns["audit"].dispatch([1, 2])
    assert shell.run_line_magic("neonnb", f"debug {good.id}") == 3
    assert "ran without an error this time" in capsys.readouterr().out


def test_magics_use_the_notebooks_own_manager_and_ask_which_when_there_are_several(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    from IPython.core.error import UsageError

    shell.run_cell("import neonnb\nqm = neonnb.connect('memory://')")
    shell.run_cell("from tests import jobs\nqm.dispatch('q', jobs.Permanent())\nqm.worker('q', 1).run_once()")
    assert len(shell.run_line_magic("neonnb", "failed")) == 1  # the README's style: no %neonnb connect
    shell.run_cell("other = neonnb.connect('memory://')")
    with pytest.raises(UsageError, match=r"several queue managers \(other, qm\): say which, as in `%neonnb -m"):
        shell.run_line_magic("neonnb", "failed")
    assert len(shell.run_line_magic("neonnb", "-m qm failed")) == 1
    assert len(shell.run_line_magic("neonnb", "-m other failed")) == 0
    with pytest.raises(UsageError, match="no QueueManager named 'nope'"):
        shell.run_line_magic("neonnb", "-m nope failed")
    shell.run_cell("qm.close()\nother.close()\ndel qm, other")


def test_magics_help_rerun_start_reconnect_stop_and_bad_input(
    shell: InteractiveShell, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from IPython.core.error import UsageError

    from neonnb import StoreUnavailable

    shell.run_line_magic("neonnb", "help")
    assert "%neonnb start -q etl -c 4" in capsys.readouterr().out
    assert "%neonnb debug ID" in (shell.find_line_magic("neonnb").__doc__ or "")
    with pytest.raises(StoreUnavailable):
        shell.run_line_magic("neonnb", "connect redis://127.0.0.1:1/0")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    shell.run_line_magic("neonnb", f"connect {url}")
    first = shell.run_line_magic("neonnb", "start -q etl -c 2")
    assert shell.run_line_magic("neonnb", "start -q etl -c 2") is first, "a re-run cell: the same worker"
    assert len(shell.user_ns["qm"].workers) == 1
    with pytest.raises(UsageError, match="1 or more, got 0"):
        shell.run_line_magic("neonnb", "start -c 0")
    shell.run_cell(f"import neonnb\nqm = neonnb.connect({url!r})")  # connect again: a new manager, same store
    capsys.readouterr()
    shell.run_line_magic("neonnb", "stop --grace 1")
    assert "stopped 1 worker(s)" in capsys.readouterr().out
    assert not first.is_running, "the old manager's worker stopped too"
    shell.run_cell("qm.close()")


def test_worker_log_lines_stay_out_of_cells_and_show_in_the_panel(kernel: Any) -> None:
    """A job failing while another cell runs used to print its warning into that cell."""
    kernel("import neonnb, time\nqm = neonnb.connect('memory://', max_retries=0)\n"
           "@qm.job(queue='q')\ndef broken(n: int) -> None:\n    raise ValueError(f'bad row {n}')\n"
           "panel = qm.dashboard()\nworker = qm.worker('q', 2).start()")
    outputs, _ = kernel("handles = broken.map(range(3))\ntime.sleep(1.5)\n[h.status.value for h in handles]")
    assert "failed after" not in text(outputs) and "['failed', 'failed', 'failed']" in text(outputs)
    assert not [o for o in outputs if o.get("name") == "stderr"], outputs
    outputs, _ = kernel("_ = panel._refresh_now()\nprint(panel.log.value)")
    assert text(outputs).count("failed after 1 attempt(s): ValueError: bad row") == 3
    outputs, _ = kernel("import logging, io\nstream = io.StringIO()\nlogging.basicConfig(stream=stream)\n"
                        "broken.dispatch(9).wait(timeout=10)\nprint('user handler saw it:', 'bad row 9' in "
                        "stream.getvalue())")
    assert "user handler saw it: True" in text(outputs), "the user's own handlers still get the records"
    kernel("worker.stop()\npanel.close()\nqm.close()")


def test_interrupting_a_wait_says_the_jobs_go_on_without_a_threading_traceback() -> None:
    import threading as threads

    from nbclient.exceptions import CellExecutionError

    notebook = new_notebook()
    client = NotebookClient(notebook, timeout=60, kernel_name="python3", allow_errors=True)
    with client.setup_kernel():
        for source in ["import neonnb, time\nqm = neonnb.connect('memory://')\n"
                       "@qm.job(queue='q')\ndef slow() -> None:\n    time.sleep(30)\n"
                       "worker = qm.worker('q', 1).start()\nhandle = slow.dispatch()",
                       "handle.result()"]:
            cell = new_code_cell(source)
            notebook.cells.append(cell)
            if source == "handle.result()":
                pid = client.km.provisioner.pid  # the Interrupt button: SIGINT to the kernel
                threads.Timer(1.5, os.kill, (pid, signal.SIGINT)).start()
            with contextlib.suppress(CellExecutionError):
                client.execute_cell(cell, len(notebook.cells) - 1)
        [error] = [o for o in notebook.cells[-1].outputs if o["output_type"] == "error"]
        assert error["ename"] == "KeyboardInterrupt" and "jobs themselves go on" in error["evalue"]
        assert not any("concurrent/futures" in line or "threading.py" in line for line in error["traceback"])
        status = new_code_cell("print(handle.status.value)")
        notebook.cells.append(status)
        client.execute_cell(status, len(notebook.cells) - 1)
        assert "running" in text(status.outputs)


def test_a_restarted_kernels_workers_leave_the_store_at_once(tmp_path: Any) -> None:
    """The dead kernel's workers used to show as running for a minute (until their beats went stale)."""
    from jupyter_core.utils import run_sync

    from neonnb import Config, QueueManager

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    notebook = new_notebook()
    client = NotebookClient(notebook, timeout=60, kernel_name="python3")
    with client.setup_kernel(), QueueManager(Config.for_url(url)) as qm:
        cell = new_code_cell(f"import neonnb\nqm = neonnb.connect({url!r})\nworker = qm.worker('etl', 4).start()")
        notebook.cells.append(cell)
        client.execute_cell(cell, 0)
        assert [info.state(qm.clock()) for info in qm.known_workers()] == ["running"]
        run_sync(client.km.restart_kernel)(now=False)  # as the Restart button does: a graceful shutdown
        deadline = time.monotonic() + 5
        while qm.known_workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert qm.known_workers() == [], "gone from the store within 5 s of the restart"


def test_an_exported_notebook_shows_the_panels_final_state(kernel: Any) -> None:
    """nbconvert's HTML (like GitHub and nbviewer) can't run widgets: it shows the picture the
    panel leaves in its output, which must be the state the work ended in, not the panel's
    first refresh."""
    from nbconvert import HTMLExporter

    kernel("import time\nimport neonnb\nqm = neonnb.connect('memory://')\n"
           "@qm.job(queue='etl')\ndef step(i: int) -> int:\n    time.sleep(0.3)\n    return i\n"
           "handles = step.map(range(6))")
    shown, _ = kernel("qm.worker('etl', 2).start()\nqm.dashboard()")
    [first] = [o["data"] for o in shown if o.get("output_type") == "display_data"]
    assert "6 done" not in first["text/html"]  # the panel's first picture: the work has just begun
    kernel("[h.result(timeout=30) for h in handles]\ntime.sleep(1.5)  # the panel's refresher sees the end")
    [first] = [o["data"] for o in shown if o.get("output_type") == "display_data"]
    assert "6 done" in first["text/html"], "the picture follows the work to its end"
    kernel("qm.dashboard()")  # shown again (a re-run cell, %neonnb status): current at once
    pictures = [o["data"]["text/html"] for cell in kernel.notebook.cells for o in cell.outputs  # type: ignore[attr-defined]
                if "neonnb-snapshot" in o.get("data", {}).get("text/html", "")]
    assert len(pictures) == 2 and all("6 done" in p for p in pictures), "both pictures show how the work ended"
    exporter = HTMLExporter()
    exporter.exclude_input = True
    html = exporter.from_notebook_node(kernel.notebook)[0]  # type: ignore[attr-defined]
    exported = html.split("neonnb-snapshot")[1:]  # each picture, up to the next one
    assert len(exported) == 2 and all("6 done" in picture for picture in exported)
