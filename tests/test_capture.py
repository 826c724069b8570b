"""What a job prints and logs is kept with the job, and the user's own logging set-up is
left as they made it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from neonnb import capture

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent('''
    import logging, sys
    import neonnb

    qm = neonnb.connect("memory://")

    @qm.job(queue="q")
    def load(table: str, ctx=None):
        ctx.logger.debug("not kept: below the job's level")
        ctx.logger.info("loading %s", table, extra={"rows": 3})
        try:
            1 / 0
        except ZeroDivisionError:
            ctx.logger.exception("division went wrong")
        print("printed", table)
        return table

    handle = load.dispatch("users")
    qm.worker("q", 1).run_once()
    print("JOB OUTPUT BEGIN")
    print(handle.output)
    print("JOB OUTPUT END")
    print("root handlers after a job:", logging.getLogger().handlers)
    print("streams given back:", sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="USER %(levelname)s %(message)s")
    logging.getLogger("user").info("basicConfig works")

    # With the user's console handler at INFO, a job's record is kept once, and printed once.
    second = load.dispatch("orders")
    qm.worker("q", 1).run_once()
    print("SECOND OUTPUT BEGIN")
    print(second.output)
    print("SECOND OUTPUT END")
    qm.close()
''')


def _between(text: str, begin: str, end: str) -> str:
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_ctx_logger_info_is_kept_with_extras_and_the_users_basic_config_still_works() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    output = _between(run.stdout, "JOB OUTPUT BEGIN", "JOB OUTPUT END")
    assert "INFO neonnb.jobs: loading users rows=3" in output  # the root logger is at WARNING
    assert "ERROR neonnb.jobs: division went wrong" in output and "ZeroDivisionError" in output
    assert "printed users" in output and "not kept" not in output
    assert "root handlers after a job: []" in run.stdout
    assert "streams given back: True" in run.stdout
    assert "USER INFO basicConfig works" in run.stdout
    second = _between(run.stdout, "SECOND OUTPUT BEGIN", "SECOND OUTPUT END")
    assert second.count("loading orders") == 1, second
    assert run.stdout.count("USER INFO loading orders") == 1  # the user's handler printed it, as they asked


def test_a_long_output_is_cut_at_a_line_boundary() -> None:
    output = capture.Output()
    line = "0123456789" * 7 + "\n"
    for i in range(3 * capture.MAX_OUTPUT // len(line)):
        output.write(f"{i:06d} {line}")
    head, kept = output.text().split("\n", 1)
    assert "earlier output dropped" in head
    assert len(kept) <= capture.MAX_OUTPUT
    assert all(len(row) == len(line) + 7 for row in kept.splitlines(keepends=True)), "a line was cut in half"


def test_a_job_routes_the_stream_it_finds_and_gives_it_back() -> None:
    """A job's print goes into its output through a router over the stream in place when
    it starts; after it the stream is given back. A stream replaced between jobs (a new
    cell's, pytest's) is the one routed the next time, never the one routed before."""
    import contextlib
    import io

    for stream in (io.StringIO(), io.StringIO()):
        with contextlib.redirect_stdout(stream):
            output = capture.Output()
            with capture.capturing(output):
                print("in the job")
            assert sys.stdout is stream
            print("outside it")
        assert output.text() == "in the job\n"
        assert stream.getvalue() == "outside it\n"
