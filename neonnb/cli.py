"""The ``neonnb`` command: ``neonnb worker`` runs a standalone worker, ``neonnb workers``
lists the workers on a store, ``neonnb demo`` shows the queue at work on the embedded SQLite
default."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .config import WorkerOptions
from .errors import NeonnbError
from .manager import QueueManager, connect


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


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _worker(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.getcwd())  # so --import finds the project's own modules
    for module in args.imports:
        _import(module)
    manager = load_manager(args.target)
    options = WorkerOptions(max_jobs=args.max_jobs, burst=args.burst)
    worker = manager.worker(args.queues or None, args.concurrency, options)
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


def _workers(args: argparse.Namespace) -> int:
    manager = load_manager(args.target)
    try:
        infos, now = manager.known_workers(), manager.clock()
    finally:
        manager.close()
    if args.json:
        print(json.dumps([{**dataclasses.asdict(info), "state": info.state(now)} for info in infos]))
        return 0
    rows = [[info.id, info.host, str(info.pid), ",".join(info.queues), info.state(now),
             f"{len(info.running)}/{info.concurrency}", str(info.jobs_done), str(info.jobs_failed),
             f"{max(now - info.last_seen, 0):.0f}s ago"] for info in infos]
    print(_table(["ID", "HOST", "PID", "QUEUES", "STATE", "RUNNING", "DONE", "FAILED", "SEEN"], rows)
          if rows else "no workers on this store")
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in [headers, *rows])


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.url, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neonnb", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a standalone worker until SIGTERM/SIGINT")
    worker.add_argument("target", help="connection URL (sqlite:///jobs.db), config file (queue.yaml) or module:manager")
    worker.add_argument("-q", "--queue", dest="queues", action="append", default=[],
                        help="queue to work on; repeat for several (default: the config's default_queue)")
    worker.add_argument("-c", "--concurrency", type=_at_least_one, default=None,
                        help="jobs at a time (default: config workers)")
    worker.add_argument("-i", "--import", dest="imports", action="append", default=[],
                        help="module that defines jobs; repeat for several")
    worker.add_argument("--max-jobs", type=int, default=None, help="stop after this many jobs")
    worker.add_argument("--burst", action="store_true", help="stop when nothing is left to run")
    worker.add_argument("--grace", type=float, default=10.0,
                        help="seconds running jobs get to finish on SIGTERM before they are released (default 10)")
    worker.set_defaults(run=_worker)

    workers = commands.add_parser("workers", help="the workers on a store, in every process and machine")
    workers.add_argument("target", help="connection URL, config file or module:manager (as for worker)")
    workers.add_argument("--json", action="store_true", help="a JSON list, for scripts")
    workers.set_defaults(run=_workers)

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
        print(f"neonnb: {exc}", file=sys.stderr)
        return 2
