"""The admin commands (`neonnb stats`, `jobs`, `show`, `failed`, `retry`, `forget`, `cancel`,
`purge`, `workers`) on every store another process can reach, through the real parser, on a YAML
config as users give it; their errors too (unknown ids, bad arguments, a store that is down)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import neonnb._loop as loop
from neonnb import Config, NeonnbError, QueueManager, Status
from neonnb.cli import build_parser
from tests import jobs
from tests.conftest import DRIVERS, wait_until, write_config

# Every store another process can reach (an in-memory one lives in its process alone).
REACHABLE = pytest.mark.parametrize("make_manager", [d for d in DRIVERS if d != "memory"], indirect=True)

MakeManager = Callable[..., QueueManager]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def target(make_manager: MakeManager, tmp_path: Path) -> tuple[QueueManager, str]:
    """A manager, and a config file naming its store, as a user outside the kernel has."""
    qm = make_manager(max_retries=0)
    return qm, write_config(qm, tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """One command through the CLI's own parser, in this process (as `neonnb` runs it)."""
    args = build_parser().parse_args(list(argv))
    code = int(args.run(args))
    out, err = capsys.readouterr()
    return code, out, err


@REACHABLE
def test_stats_jobs_show_and_the_failed_store(target: tuple[QueueManager, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    qm, config = target
    ok = qm.dispatch("adm", jobs.Chatty("hello"))
    bad = qm.dispatch("adm", jobs.Permanent())
    waiting = qm.dispatch("adm", jobs.Note("later"))
    qm.worker("adm", 1).run_once()
    qm.worker("adm", 1).run_once()

    code, out, _ = run(capsys, "stats", config, "--json")
    assert code == 0 and json.loads(out)["adm"]["succeeded"] == 1 and json.loads(out)["adm"]["failed"] == 1
    code, out, _ = run(capsys, "stats", config)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["QUEUE", "HIGH", "NORMAL"] and "adm" in out

    code, out, _ = run(capsys, "jobs", config, "--status", "failed", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)["jobs"]] == [bad.id]
    code, out, _ = run(capsys, "jobs", config, "--queue", "adm", "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4  # a header, two rows newest first, where the next page starts
    assert waiting.id in lines[1] and bad.id in lines[2] and lines[3].startswith("more: add --cursor ")
    code, out, _ = run(capsys, "jobs", config, "--queue", "adm", "--limit", "2", "--cursor", lines[3].split()[-1],
                       "--json")
    assert code == 0 and json.loads(out) == {"jobs": [json.loads(out)["jobs"][0]], "cursor": None}
    assert json.loads(out)["jobs"][0]["id"] == ok.id

    code, out, _ = run(capsys, "show", config, ok.id)
    assert code == 0 and "succeeded" in out and "hello" in out  # what the job printed
    code, out, _ = run(capsys, "show", config, bad.id, "--json")
    assert code == 0 and json.loads(out)["error"]["type"] == "ValueError"

    code, out, _ = run(capsys, "failed", config, "--json", "--limit", "50", "--offset", "0")
    listed = json.loads(out)
    assert code == 0 and listed["total"] == 1 and [j["id"] for j in listed["jobs"]] == [bad.id]
    assert listed["jobs"][0]["error"] == "bad input, don't retry"
    code, out, _ = run(capsys, "failed", config)
    assert code == 0 and bad.id in out and "1 of 1 failed job(s)" in out


@REACHABLE
def test_retry_forget_and_cancel(target: tuple[QueueManager, str], capsys: pytest.CaptureFixture[str]) -> None:
    qm, config = target
    failed = [qm.dispatch("adm", jobs.Permanent()) for _ in range(3)]
    other = qm.dispatch("other", jobs.Permanent())
    qm.worker(["adm", "other"], 4).run_once()
    assert all(h.status is Status.FAILED for h in [*failed, other])

    code, out, _ = run(capsys, "retry", config, failed[0].id, "no-such-id")
    assert code == 1 and "queued 1 job(s) for retry" in out and "not in the failed store: no-such-id" in out
    assert failed[0].status is Status.QUEUED
    code, out, _ = run(capsys, "retry", config, "--all", "--queue", "adm", "--json")
    assert code == 0 and json.loads(out) == {"retried": 2}
    assert other.status is Status.FAILED, "--queue retried only that queue's"

    code, out, _ = run(capsys, "forget", config, other.id)
    assert code == 0 and "forgot 1 failed job(s)" in out
    code, _, _ = run(capsys, "forget", config, other.id)
    assert code == 1, "a job no longer in the failed store"

    code, out, _ = run(capsys, "cancel", config, failed[1].id)
    assert code == 0 and "cancelled: it never runs" in out and failed[1].status is Status.CANCELLED
    code, out, _ = run(capsys, "cancel", config, failed[1].id, "--json")
    assert code == 1 and json.loads(out) == {"was": "cancelled"}
    code, _, err = run(capsys, "cancel", config, "no-such-id")
    assert code == 1 and "job no-such-id not found" in err
    code, _, err = run(capsys, "show", config, "no-such-id")
    assert code == 1 and "job no-such-id not found" in err


@REACHABLE
def test_purge_deletes_a_queues_jobs_not_yet_started_after_asking(
    target: tuple[QueueManager, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    qm, config = target
    qm.dispatch_batch("full", [jobs.Note(str(i)) for i in range(5)])
    qm.dispatch_after("full", jobs.Note("later"), 3600)
    [claimed] = loop.run_sync(qm.driver.reserve(["full"], 1, "w", qm.clock(), qm.clock() + 60))
    kept = qm.dispatch("other", jobs.Note("elsewhere"))
    with pytest.raises(NeonnbError, match="add --yes"):  # no terminal to ask on: it won't guess
        run(capsys, "purge", config, "--queue", "full")
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    code, out, _ = run(capsys, "purge", config, "--queue", "full")
    assert code == 1 and "nothing deleted" in out and qm.size("full") == 5
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "y")
    code, out, _ = run(capsys, "purge", config, "--queue", "full")
    assert code == 0 and "deleted 5 queued job(s) of 'full'" in out and asked == [
        "delete the 5 queued job(s) of 'full'? [y/N] "]
    assert qm.size("full") == 0 and qm.stats()["full"].running == 1, "the running job stays"
    assert qm.handle(claimed.id).status is Status.RUNNING and kept.status is Status.QUEUED
    code, out, _ = run(capsys, "purge", config, "--queue", "full", "--yes", "--json")
    assert code == 0 and json.loads(out) == {"purged": 0}


def test_admin_errors_say_what_is_wrong_with_exit_code_2(tmp_path: Path) -> None:
    def neonnb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "neonnb", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)

    down = neonnb("stats", "redis://127.0.0.1:1/0")
    assert down.returncode == 2 and "neonnb: " in down.stderr and "Traceback" not in down.stderr
    both = neonnb("retry", f"sqlite:///{tmp_path / 'x.db'}", "some-id", "--all")
    assert both.returncode == 2 and "retry takes job ids or --all" in both.stderr
    bad_status = neonnb("jobs", f"sqlite:///{tmp_path / 'x.db'}", "--status", "done")
    assert bad_status.returncode == 2 and "invalid choice: 'done'" in bad_status.stderr
    bad_cursor = neonnb("jobs", f"sqlite:///{tmp_path / 'x.db'}", "--cursor", "nonsense")
    assert bad_cursor.returncode == 2 and "cursor 'nonsense' is not one a page of jobs gave" in bad_cursor.stderr


def test_every_bad_argument_or_target_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "raises.py").write_text("raise RuntimeError('the module broke')\n")
    db = f"sqlite:///{tmp_path / 'x.db'}"
    cases = [
        ("stats", "missing.yaml"), ("stats", "empty.yaml"), ("jobs", db, "--limit", "1e23"),
        ("jobs", db, "--limit", "100000000000000000000000"), ("failed", db, "--offset", "1e23"),
        ("failed", db, "--offset", "-1"), ("failed", db, "--limit", "0"), ("dashboard", db, "--port", "99999"),
        ("dashboard", db, "--port", "0"), ("worker", db, "-i", "raises", "--burst"), ("show", db, "a\x1bb"),
        ("jobs", db, "--cursor", "nan/1"), ("bogus-command",),
    ]
    for argv in cases:
        done = subprocess.run([sys.executable, "-m", "neonnb", *argv], cwd=tmp_path, capture_output=True, text=True,
                              timeout=10, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 2, (argv, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, (argv, done.stderr)
        assert "\x1b" not in done.stderr, argv
    assert not (tmp_path / "neonnb.db").exists(), "an empty config file made no store"


def test_the_cli_and_the_workers_log_show_control_characters_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    nasty = "red \x1b[31mALERT\x1b[0m\u202eevil\nINFO neonnb.worker: job 1 succeeded"
    with QueueManager(Config.for_url(db, max_retries=0)) as qm:
        handle = qm.dispatch(f"q{nasty[:5]}", jobs.FailsSaying(nasty))
        qm.worker(f"q{nasty[:5]}", 1).run_once()
        assert handle.status is Status.FAILED
    for argv in (("failed", db), ("jobs", db), ("show", db, handle.id), ("stats", db)):
        code, out, err = run(capsys, *argv)
        assert code == 0 and "\x1b" not in out + err and "\u202e" not in out + err, argv
    assert "\\x1b[31mALERT" in run(capsys, "failed", db)[1]
    logged = [r.getMessage() for r in caplog.records if "failed after" in r.getMessage()]
    assert logged and all("\n" not in line and "\x1b" not in line for line in logged), logged


@REACHABLE
def test_pause_and_resume_a_queue_from_the_command_line(target: tuple[QueueManager, str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    qm, config = target
    qm.dispatch("mail", jobs.Note("held"))
    assert run(capsys, "pause", config, "--queue", "mail")[0] == 0
    code, out, _ = run(capsys, "stats", config)
    assert code == 0 and "paused" in out
    assert qm.stats()["mail"].paused and qm.worker("mail", 1).run_once() == 0
    code, out, _ = run(capsys, "resume", config, "--queue", "mail", "--json")
    assert code == 0 and json.loads(out) == {"queue": "mail", "paused": False}
    worker = qm.worker("mail", 1)
    wait_until(lambda: worker.run_once() == 1, timeout=5, what="the resumed queue's job to run (within a second)")
    assert run(capsys, "limit", config, "--queue", "mail", "--rate", "100/m")[0] == 0
    assert qm.stats()["mail"].rate == "100/m" and "at most 100/m" in run(capsys, "stats", config)[1]
    assert run(capsys, "limit", config, "--queue", "mail", "--rate", "none", "--concurrency", "3")[0] == 0
    assert (qm.stats()["mail"].rate, qm.stats()["mail"].concurrency) == (None, 3)
    assert run(capsys, "limit", config, "--queue", "mail", "--concurrency", "none")[0] == 0
    assert qm.stats().get("mail") is None or qm.stats()["mail"].rate is None
    with pytest.raises(NeonnbError, match="count over a time"):  # (main() prints it, exit code 2)
        run(capsys, "limit", config, "--queue", "mail", "--rate", "often")
