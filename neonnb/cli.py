"""The ``neonnb`` command: ``neonnb worker`` runs a standalone worker; ``stats``, ``jobs``,
``show``, ``failed``, ``retry``, ``forget``, ``cancel``, ``purge``, ``pause``, ``resume``,
``workers`` and ``schedules`` look at
and steer a store from outside a kernel (tables for people, ``--json`` for scripts);
``neonnb demo`` shows the queue at work on the embedded SQLite default.

Exit codes: 0 done; 1 a job named is not there (not found, not failed, already finished),
or a purge was declined; 2 a bad argument, a target that can't be loaded or a store that can't be reached."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .config import WorkerOptions, printable
from .errors import JobNotFound, MissingExtra, NeonnbError
from .manager import QueueManager, connect
from .records import MAX_OFFSET, MAX_PAGE, JobRecord, QueueCounts, Status, record_data, schedules_data
from .render import queue_state


def load_manager(target: str) -> QueueManager:
    """A URL, a YAML config file, or ``module:attribute`` naming a QueueManager."""
    if "://" not in target and ":" in target and not target.endswith((".yaml", ".yml")):
        module_name, _, attribute = target.partition(":")
        manager = getattr(_import(module_name), attribute, None)
        if not isinstance(manager, QueueManager):
            raise NeonnbError(f"{target}: {module_name}.{attribute} is not a neonnb QueueManager")
        return manager
    return connect(target)


def _import(module: str) -> object:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NeonnbError(
            f"can't import {module}: {exc} (run from the folder that holds it, or add it to PYTHONPATH)"
        ) from exc
    except Exception as exc:  # the module itself failed: one line says where, not a traceback
        raise NeonnbError(f"importing {module} raised {type(exc).__name__}: {exc}") from exc


def _at_least_one(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _page_size(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_PAGE}, got {value}")
    return value


def _not_negative(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= MAX_OFFSET:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_OFFSET}, got {value}")
    return value


def _port(text: str) -> int:
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, got {value}")
    return value


def _integer(text: str) -> int:
    if not text.strip().lstrip("-").isdigit() or len(text) > 20:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
    return int(text)


def _queues(given: list[str]) -> list[str] | dict[str, float]:
    """``-q a -q b``: in that order of preference; ``-q a=3 -q b=1``: slots shared by weight."""
    weighted = [text.rpartition("=") for text in given]
    if not any(sep for _, sep, _ in weighted):
        return given
    weights: dict[str, float] = {}
    for name, sep, weight in weighted:
        try:
            weights[name] = float(weight) if sep else float("nan")
        except ValueError:
            weights[name] = float("nan")
        if not (sep and name and 0 < weights[name] < float("inf")):
            raise NeonnbError(f"-q {name}{sep}{weight}: give every queue a weight above 0 (-q emails=3 -q reports=1) "
                              "or none (-q emails -q reports: in that order of preference)")
    return weights


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line on stderr and exit code 2, pointing at --help, not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {printable(message)} (see {self.prog} --help)\n")


def _worker(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.getcwd())  # so --import finds the project's own modules
    for module in args.imports:
        _import(module)
    manager = load_manager(args.target)
    options = WorkerOptions(max_jobs=args.max_jobs, burst=args.burst)
    worker = manager.worker(_queues(args.queues) or None, args.concurrency, options)
    # The worker runs on neonnb's background loop, where the drivers' clients live; this
    # thread only waits, and turns SIGTERM/SIGINT into a graceful stop.
    signals = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            worker.request_stop(args.grace)
            return
        # A second signal while sync jobs ignore ctx.cancelled: their threads can't be stopped,
        # so the process ends without them; their leases run out and they run again elsewhere.
        logging.getLogger("neonnb.worker").warning("%s again: exiting now", signal.Signals(signum).name)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    worker.run()
    manager.close()
    return 0


def _admin(command: Callable[[QueueManager, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command`` on the manager that ``args.target`` names, closed afterwards."""
    def run(args: argparse.Namespace) -> int:
        manager = load_manager(args.target)
        try:
            return command(manager, args)
        finally:
            manager.close()

    return run


def _show_result(args: argparse.Namespace, data: Any, text: str) -> None:
    # What jobs and stores hold is shown, never obeyed: a name or an error with ESC or RLO in it
    # can't colour, move or reorder the terminal (JSON escapes them itself).
    print(json.dumps(data, default=str) if args.json else printable(text, lines=True))


def _stats(qm: QueueManager, args: argparse.Namespace) -> int:
    counts = qm.stats()
    data = {queue: c.as_data() for queue, c in counts.items()}
    headers = ["QUEUE", "HIGH", "NORMAL", "LOW", "DELAYED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED",
               "STATE"]
    rows = [[queue, *map(str, [c.waiting["high"], c.waiting["normal"], c.waiting["low"], c.delayed, c.running,
                                c.succeeded, c.failed, c.cancelled, c.expired]), queue_state(c)]
            for queue, c in counts.items()]
    _show_result(args, data, _table(headers, rows) if rows else "no jobs on this store")
    return 0


def _jobs(qm: QueueManager, args: argparse.Namespace) -> int:
    page = qm.jobs(args.status, args.queue, args.limit, args.cursor)
    text = _jobs_table(page, qm.clock())
    if page.cursor is not None:
        text += f"\nmore: add --cursor {page.cursor}"
    _show_result(args, {"jobs": [record_data(r) for r in page], "cursor": page.cursor}, text)
    return 0


def _jobs_table(records: Sequence[JobRecord], now: float) -> str:
    rows = [[r.id, r.queue, r.name, r.status.value, f"{r.attempts}/{r.max_attempts}", _ago(now, r.created_at),
             str((r.error or {}).get("type") or "")] for r in records]
    headers = ["ID", "QUEUE", "NAME", "STATUS", "ATTEMPTS", "CREATED", "ERROR"]
    return _table(headers, rows) if rows else "no such jobs"


def _show(qm: QueueManager, args: argparse.Namespace) -> int:
    try:
        record = qm.handle(args.job_id).fetch()
    except JobNotFound as exc:
        return _not_there(exc)
    data = record_data(record)
    lines = [f"{name:13} {value}" for name, value in data.items()
             if value not in (None, "", {}) and name not in ("error", "output")]
    if record.error:
        lines += [f"{'error':13} {record.error.get('type')}: {record.error.get('message')}",
                  str(record.error.get("traceback") or "").rstrip()]
    if record.output:
        lines += ["output:", record.output.rstrip()]
    _show_result(args, data, "\n".join(line for line in lines if line))
    return 0


def _failed(qm: QueueManager, args: argparse.Namespace) -> int:
    """The seed's failed-jobs listing: ``{"jobs": [...], "total": N}``."""
    failed = qm.failed.list(args.limit, args.offset, args.queue)
    total = qm.failed.total(args.queue)
    rows = [[f.id, f.queue, f.name, str(f.attempts), f.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
             _cut(json.dumps(f.arguments, ensure_ascii=False), 50), _cut(f"{f.error_type}: {f.error}", 80)]
            for f in failed]
    headers = ["ID", "QUEUE", "NAME", "ATTEMPTS", "FAILED AT (UTC)", "ARGUMENTS", "ERROR"]
    text = _table(headers, rows) if rows else "no failed jobs"
    _show_result(args, {"jobs": [dataclasses.asdict(f) for f in failed], "total": total},
                 f"{text}\n{len(failed)} of {total} failed job(s)" if rows else text)
    return 0


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _retry(qm: QueueManager, args: argparse.Namespace) -> int:
    if args.all == bool(args.job_ids):
        raise NeonnbError("retry takes job ids or --all (with --queue to retry one queue's), not both or neither")
    if args.all:
        moved = qm.failed.retry_all(args.queue)
        _show_result(args, {"retried": moved}, f"queued {moved} failed job(s) for retry")
        return 0
    missing = []
    for job_id in args.job_ids:
        try:
            qm.failed.retry(job_id)
        except JobNotFound:
            missing.append(job_id)
    retried = len(args.job_ids) - len(missing)
    _show_result(args, {"retried": retried, "not_failed": missing},
                 f"queued {retried} job(s) for retry" + "".join(f"\nnot in the failed store: {m}" for m in missing))
    return 1 if missing else 0


def _forget(qm: QueueManager, args: argparse.Namespace) -> int:
    missing = [job_id for job_id in args.job_ids if not qm.failed.forget(job_id)]
    forgotten = len(args.job_ids) - len(missing)
    _show_result(args, {"forgotten": forgotten, "not_failed": missing},
                 f"forgot {forgotten} failed job(s)" + "".join(f"\nnot in the failed store: {m}" for m in missing))
    return 1 if missing else 0


def _cancel(qm: QueueManager, args: argparse.Namespace) -> int:
    was = qm.cancel(args.job_id)
    if was is None:
        return _not_there(JobNotFound(f"job {args.job_id} not found"))
    if was in (Status.QUEUED, Status.RUNNING):
        said = "cancelled: it never runs" if was is Status.QUEUED else "asked to stop: its worker stops it in a second"
        _show_result(args, {"was": was.value}, f"job {args.job_id} {said}")
        return 0
    _show_result(args, {"was": was.value}, f"job {args.job_id} had already ended ({was.value}): nothing to cancel")
    return 1


def _purge(qm: QueueManager, args: argparse.Namespace) -> int:
    waiting = qm.size(args.queue)
    if not args.yes:
        if not sys.stdin.isatty():
            raise NeonnbError(f"purge deletes the {waiting} queued job(s) of {args.queue!r} for good: add --yes "
                              "to do it without being asked")
        if input(f"delete the {waiting} queued job(s) of {args.queue!r}? [y/N] ").strip().lower() not in ("y", "yes"):
            _show_result(args, {"purged": 0}, "nothing deleted")
            return 1
    purged = qm.purge(args.queue)
    _show_result(args, {"purged": purged}, f"deleted {purged} queued job(s) of {args.queue!r}")
    return 0


def _pause(qm: QueueManager, args: argparse.Namespace) -> int:
    qm.pause(args.queue)
    _show_result(args, {"queue": args.queue, "paused": True},
                 f"paused {args.queue!r}: no worker starts its jobs until `neonnb resume`")
    return 0


def _limit(qm: QueueManager, args: argparse.Namespace) -> int:
    given: dict[str, Any] = {}
    if args.rate is not None:
        given["rate"] = None if args.rate.lower() == "none" else args.rate
    if args.concurrency is not None:
        text = args.concurrency.strip()
        given["concurrency"] = None if text.lower() == "none" else int(text) if text.isdigit() else text
    qm.limit_queue(args.queue, **given)
    state = queue_state(qm.stats().get(args.queue, QueueCounts()))
    _show_result(args, {"queue": args.queue, **given}, f"{args.queue}: {state}")
    return 0


def _resume(qm: QueueManager, args: argparse.Namespace) -> int:
    qm.resume(args.queue)
    _show_result(args, {"queue": args.queue, "paused": False}, f"resumed {args.queue!r}")
    return 0


def _not_there(exc: Exception) -> int:
    print(f"neonnb: {printable(exc)}", file=sys.stderr)
    return 1


def _workers(qm: QueueManager, args: argparse.Namespace) -> int:
    infos, now = qm.known_workers(), qm.clock()
    rows = [[info.id, info.host, str(info.pid), ",".join(info.queues), info.state(now),
             f"{len(info.running)}/{info.concurrency}", str(info.jobs_done), str(info.jobs_failed),
             _ago(now, info.last_seen)] for info in infos]
    _show_result(args, [info.as_data(now) for info in infos],
                 _table(["ID", "HOST", "PID", "QUEUES", "STATE", "RUNNING", "DONE", "FAILED", "SEEN"], rows)
                 if rows else "no workers on this store")
    return 0


def _schedules(qm: QueueManager, args: argparse.Namespace) -> int:
    now = qm.clock()
    listed = schedules_data(qm.known_schedulers(), now)
    rows = [[s["name"], s["rule"], s["tz"], s["queue"], s["job"], _when(s["last_tick"]), _when(s["next_tick"]),
             f"{s['scheduler']} ({s['state']})"] for s in listed]
    _show_result(args, listed, _table(["NAME", "RULE", "TZ", "QUEUE", "JOB", "LAST TICK (UTC)", "NEXT TICK (UTC)",
                                       "SCHEDULER"], rows) if rows else "no scheduler runs on this store")
    return 0


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard's API with uvicorn until SIGTERM/SIGINT."""
    from .web import create_app, is_loopback

    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtra("neonnb dashboard needs uvicorn: pip install 'neonnb[web]'") from exc
    manager = load_manager(args.target)
    try:
        if args.unix_socket:  # behind Jupyter's proxy: the socket's permissions are the login
            app = create_app(manager, read_only=args.read_only, proxied=True)
            print(f"neonnb dashboard: serving {manager.config.describe_store()} on {args.unix_socket}", flush=True)
            uvicorn.run(app, uds=args.unix_socket, log_level="warning")
            return 0
        given = args.token or os.environ.get("NEONNB_DASHBOARD_TOKEN")
        token = given or secrets.token_urlsafe(24)
        hosts = tuple(args.allowed_hosts) + (() if is_loopback(args.host) else (args.host,))
        app = create_app(manager, token=token, read_only=args.read_only, allowed_hosts=hosts)
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        shown = f"[{shown}]" if ":" in shown else shown
        # As Jupyter does: the URL to open, with a token made here (the page moves it out of the
        # address bar); a token the user gave stays out of the output, which may land in a log.
        query = "" if given else f"?token={token}"
        print(f"neonnb dashboard: serving {manager.config.describe_store()}\n"
              f"    open http://{shown}:{args.port}/{query}", flush=True)
        if not is_loopback(args.host):
            print(f"neonnb dashboard: listening on {args.host}, off loopback: every request needs the token",
                  flush=True)
        _check_port_free(args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        manager.close()
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A taken port is a bad argument (rc 2, one line), not uvicorn's log and exit."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise NeonnbError(f"can't listen on {host}:{port}: {exc.strerror or exc}") from None


def _ago(now: float, then: float) -> str:
    return f"{max(now - then, 0):.0f}s ago"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]  # one line a row, whatever a cell holds
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in [headers, *rows])


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.url, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neonnb", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a standalone worker until SIGTERM/SIGINT")
    worker.add_argument("target", help="connection URL (sqlite:///jobs.db), config file (queue.yaml) or module:manager")
    worker.add_argument("-q", "--queue", dest="queues", action="append", default=[],
                        help="queue to work on; repeat for several, in order of preference, or as NAME=WEIGHT to "
                             "share the slots by weight (default: the config's default_queue)")
    worker.add_argument("-c", "--concurrency", type=_at_least_one, default=None,
                        help="jobs at a time (default: config workers)")
    worker.add_argument("-i", "--import", dest="imports", action="append", default=[],
                        help="module that defines jobs; repeat for several")
    worker.add_argument("--max-jobs", type=int, default=None, help="stop after this many jobs")
    worker.add_argument("--burst", action="store_true", help="stop when nothing is left to run")
    worker.add_argument("--grace", type=float, default=10.0,
                        help="seconds running jobs get to finish on SIGTERM before they are released (default 10)")
    worker.set_defaults(run=_worker)

    def admin(name: str, help_text: str, run: Callable[[QueueManager, argparse.Namespace], int]) -> Any:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("target", help="connection URL, config file or module:manager (as for worker)")
        command.add_argument("--json", action="store_true", help="JSON, for scripts")
        command.set_defaults(run=_admin(run))
        return command

    admin("stats", "jobs per queue and state", _stats)
    jobs = admin("jobs", "jobs, newest first", _jobs)
    jobs.add_argument("--status", choices=[s.value for s in Status], help="only jobs in this state")
    jobs.add_argument("--queue", help="only this queue's jobs")
    jobs.add_argument("--limit", type=_page_size, default=50, help="at most this many (default 50)")
    jobs.add_argument("--cursor", help="the next page: the cursor the page before gave")
    admin("show", "one job: its fields, error, traceback and output", _show).add_argument("job_id")
    failed = admin("failed", "the failed store, newest first", _failed)
    failed.add_argument("--queue", help="only this queue's failed jobs")
    failed.add_argument("--limit", type=_page_size, default=50, help="at most this many (default 50)")
    failed.add_argument("--offset", type=_not_negative, default=0, help="skip this many first (default 0)")
    retry = admin("retry", "queue failed jobs again (same id and arguments, attempts reset)", _retry)
    retry.add_argument("job_ids", nargs="*", metavar="ID")
    retry.add_argument("--all", action="store_true", help="every failed job (of --queue, if given)")
    retry.add_argument("--queue", help="with --all: only this queue's")
    admin("forget", "delete failed jobs from the failed store", _forget).add_argument("job_ids", nargs="+",
                                                                                       metavar="ID")
    admin("cancel", "cancel a queued job, or ask a running one to stop", _cancel).add_argument("job_id")
    purge = admin("purge", "delete a queue's jobs that have not started (asks first)", _purge)
    purge.add_argument("--queue", required=True, help="the queue to empty")
    purge.add_argument("--yes", action="store_true", help="don't ask")
    admin("pause", "stop workers everywhere from starting a queue's jobs (dispatches still go in)",
          _pause).add_argument("--queue", required=True, help="the queue to pause")
    admin("resume", "let workers take a paused queue's jobs again", _resume).add_argument(
        "--queue", required=True, help="the queue to resume")
    limit = admin("limit", "limit how many of a queue's jobs start per time and run at once, everywhere", _limit)
    limit.add_argument("--queue", required=True, help="the queue to limit")
    limit.add_argument("--rate", help="a count over a time: 100/m, 10/s, 5/30s; none lifts it")
    limit.add_argument("--concurrency", help="at most this many running at once; none lifts it")
    admin("workers", "the workers on a store, in every process and machine", _workers)
    admin("schedules", "the schedules of every scheduler running on a store", _schedules)

    dashboard = commands.add_parser("dashboard", help="serve the dashboard's JSON API and /metrics (neonnb[web])")
    dashboard.add_argument("target", help="connection URL, config file or module:manager (as for worker)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    dashboard.add_argument("--port", type=_port, default=8765, help="port (default 8765)")
    dashboard.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                           help="a name the dashboard is reached by besides loopback's (repeat for several); "
                                "other Host headers get 400")
    dashboard.add_argument("--unix-socket", metavar="PATH",
                           help="serve on this unix socket instead, for Jupyter's proxy (no token: the socket's "
                                "permissions decide who may connect)")
    dashboard.add_argument("--token", help="the token writes need (default: $NEONNB_DASHBOARD_TOKEN, "
                                           "else a new one, printed)")
    dashboard.add_argument("--read-only", action="store_true", help="refuse every write")
    dashboard.set_defaults(run=_dashboard)

    demo = commands.add_parser("demo", help="a small data pipeline on the embedded SQLite default")
    demo.add_argument("--url", default=None, help="database URL (default: a throwaway SQLite file)")
    demo.add_argument("--jobs", type=int, default=24, help="partitions to load (default 24)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except NeonnbError as exc:
        print(f"neonnb: {printable(exc)}", file=sys.stderr)
        return 2
