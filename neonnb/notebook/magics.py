"""``%neonnb``: connect, start and stop in-kernel workers, status, failed jobs, a job's
captured output, and ``%neonnb debug ID`` to re-run a failed job and debug it post-mortem.

    %neonnb connect sqlite:///jobs.db      # binds `qm` in the notebook (--as NAME to rename)
    %neonnb start -q etl -c 4              # a worker on the background loop
    %neonnb status                         # the live dashboard
    %neonnb failed                         # the failed store as a DataFrame
    %neonnb retry ID | --all               # back to the queue
    %neonnb output ID                      # what the job printed and logged
    %neonnb debug ID                       # run it again here; the debugger opens where it fails
    %neonnb stop [--grace 10]              # every worker on this store in the kernel, old managers' too
    %neonnb pause etl / resume etl         # no worker anywhere starts etl's jobs / they may again
    %neonnb -m other status                # which manager, when the notebook holds several
    %neonnb help                           # this text

Without -m, the magics use the notebook's QueueManager (``qm = neonnb.connect(...)`` works as
well as ``%neonnb connect``).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .. import _loop
from ..errors import user_traceback
from ..job import Context, FunctionCall, decode_job, is_async_job
from ..manager import QueueManager, connect


@magics_class
class NeonnbMagics(Magics):
    manager: QueueManager | None = None

    chosen: str | None = None  # the notebook variable named with -m for the current command

    @line_magic
    def neonnb(self, line: str) -> Any:
        words = line.strip()  # the docstring, for %neonnb?, is the module's (set below)
        self.chosen = None
        if words.startswith(("-m ", "--manager ")):  # %neonnb -m NAME COMMAND ...
            _, self.chosen, words = [*words.split(None, 2), ""][:3]
        command, _, rest = words.partition(" ")
        handler = COMMANDS.get(command or "status")
        if handler is None:
            raise UsageError(f"unknown %neonnb command {command!r}; use one of: {', '.join(COMMANDS)}")
        return handler(self, rest)

    def _manager(self) -> QueueManager:
        """The manager the notebook uses: the one named with ``-m NAME``, else the only
        QueueManager among the notebook's variables (``qm = neonnb.connect(...)``), else the
        one ``%neonnb connect`` made."""
        assert self.shell is not None
        namespace = self.shell.user_ns
        if self.chosen is not None:
            manager = namespace.get(self.chosen)
            if not isinstance(manager, QueueManager):
                raise UsageError(f"-m {self.chosen}: the notebook has no QueueManager named {self.chosen!r}")
            return manager
        names: dict[int, list[str]] = {}
        for name, value in namespace.items():
            if isinstance(value, QueueManager) and not name.startswith("_"):
                names.setdefault(id(value), []).append(name)
        if len(names) > 1:
            listed = ", ".join(sorted(group[0] for group in names.values()))
            raise UsageError(f"the notebook has several queue managers ({listed}): say which, as in "
                             f"`%neonnb -m {min(group[0] for group in names.values())} status`")
        if names:
            return namespace[next(iter(names.values()))[0]]  # type: ignore[no-any-return]
        if self.manager is None:
            raise UsageError("no queue yet: run `qm = neonnb.connect(URL)` or `%neonnb connect URL` first "
                             "(e.g. sqlite:///jobs.db or memory://)")
        return self.manager

    def help(self, rest: str) -> None:
        print(__doc__)

    @magic_arguments(name="%neonnb connect")
    @argument("target", help="a URL (memory://, sqlite:///jobs.db, postgresql://..., redis://...) or a YAML file")
    @argument("--as", dest="name", default="qm", help="the notebook variable to bind the QueueManager to")
    def connect(self, rest: str) -> QueueManager:
        args = parse_argstring(self.connect, rest)
        if self.manager is not None:
            self.manager.close()
        manager = connect(args.target)
        try:
            manager.size()  # reach the store now: a wrong URL says so here, not later in the panel
        except Exception:
            manager.close()
            raise
        self.manager = manager
        assert self.shell is not None
        self.shell.push({args.name: self.manager})
        return self.manager

    @magic_arguments(name="%neonnb start")
    @argument("-q", "--queue", action="append", help="a queue to work (repeat for several)")
    @argument("-c", "--concurrency", type=int, default=None, help="jobs at a time")
    def start(self, rest: str) -> Any:
        """A worker on the background loop; the same queues and slots again (a re-run cell)
        give back the worker already running, not a second one."""
        args = parse_argstring(self.start, rest)
        if args.concurrency is not None and args.concurrency < 1:
            raise UsageError(f"-c is how many jobs run at a time: 1 or more, got {args.concurrency}")
        manager = self._manager()
        queues = args.queue or [manager.config.default_queue]
        concurrency = manager.config.workers if args.concurrency is None else args.concurrency
        for worker in manager.workers:
            if worker.queues == queues and worker.concurrency == concurrency and worker.is_running:
                print(f"already running: {worker!r}")
                return worker
        return manager.worker(queues, concurrency).start()

    @magic_arguments(name="%neonnb stop")
    @argument("--grace", type=float, default=10.0, help="seconds running jobs may take to finish")
    def stop(self, rest: str) -> None:
        """Stop every worker this kernel runs on the notebook's store, also those of managers
        made for it before (``qm = neonnb.connect(...)`` run again)."""
        args = parse_argstring(self.stop, rest)
        manager = self._manager()
        same_store = [m for m in _loop.open_resources() if m is manager or (
            isinstance(m, QueueManager) and manager.config.driver != "memory"  # each memory store is its own
            and (m.config.driver, m.config.connection) == (manager.config.driver, manager.config.connection))]
        stopped = [worker for m in same_store for worker in m.workers]
        for worker in stopped:
            worker.stop(args.grace)
        print(f"stopped {len(stopped)} worker(s)" if stopped else "no worker was running")

    def status(self, rest: str) -> Any:
        return self._manager().dashboard()

    @magic_arguments(name="%neonnb failed")
    @argument("-q", "--queue", default=None)
    @argument("-n", "--limit", type=int, default=50)
    def failed(self, rest: str) -> Any:
        args = parse_argstring(self.failed, rest)
        return self._manager().failed_df(queue=args.queue, limit=args.limit)

    @magic_arguments(name="%neonnb retry")
    @argument("job_id", nargs="?", help="the failed job to retry")
    @argument("--all", action="store_true", help="retry every failed job")
    def retry(self, rest: str) -> Any:
        args = parse_argstring(self.retry, rest)
        failed = self._manager().failed
        if args.all:
            return failed.retry_all()
        if not args.job_id:
            raise UsageError("say which job: `%neonnb retry ID`, or `%neonnb retry --all`")
        return failed.retry(args.job_id)

    @magic_arguments(name="%neonnb pause")
    @argument("queue", help="the queue no worker should start jobs of (dispatches still go in)")
    def pause(self, rest: str) -> None:
        queue = parse_argstring(self.pause, rest).queue
        self._manager().pause(queue)
        print(f"paused {queue!r}: no worker on this store starts its jobs until `%neonnb resume {queue}`")

    @magic_arguments(name="%neonnb resume")
    @argument("queue")
    def resume(self, rest: str) -> None:
        queue = parse_argstring(self.resume, rest).queue
        self._manager().resume(queue)
        print(f"resumed {queue!r}")

    @magic_arguments(name="%neonnb output")
    @argument("job_id")
    def output(self, rest: str) -> None:
        args = parse_argstring(self.output, rest)
        text = self._manager().handle(args.job_id).output
        print(text if text else f"job {args.job_id} printed and logged nothing")

    @magic_arguments(name="%neonnb debug")
    @argument("job_id", help="a (usually failed) job to run again here, stopping where it fails")
    def debug(self, rest: str) -> Any:
        """Run the job again in the kernel with its stored arguments and, where it fails,
        open the IPython debugger post-mortem at the failing frame with its locals, as
        ``%debug`` does; async handlers too (run to the end on a loop of their own)."""
        args = parse_argstring(self.debug, rest)
        manager = self._manager()
        record = manager.handle(args.job_id).fetch()
        job = decode_job(record)
        ctx = Context(record, manager.core.dependencies, lambda _record, _progress: None)
        fn, call_args, kwargs = job.target(ctx) if isinstance(job, FunctionCall) else (job.handle, (ctx,), {})
        try:
            value = _run_async(fn, call_args, kwargs) if is_async_job(job) else fn(*call_args, **kwargs)
        except Exception as exc:
            print(f"job {record.id} ({record.name}) failed again: {type(exc).__name__}: {exc}")
            _post_mortem(exc)
            return None
        print(f"job {record.id} ({record.name}) ran without an error this time")
        return value


def _run_async(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An async handler, to the end, on a loop of its own (the kernel's is busy running
    this cell): its frames stay in the traceback for the debugger."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(fn(*args, **kwargs))
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="neonnb-debug")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _post_mortem(exc: BaseException) -> None:
    from IPython.core.debugger import Pdb

    interrupt = signal.getsignal(signal.SIGINT)
    try:
        debugger = Pdb()
        debugger.reset()
        debugger.interaction(None, user_traceback(exc.__traceback__))  # the stack starts at the job's code
    finally:
        # After `continue` pdb may keep its own SIGINT handler, which would turn the next
        # Interrupt of any cell into a debugger stop instead of a KeyboardInterrupt.
        signal.signal(signal.SIGINT, interrupt)


COMMANDS = {
    "connect": NeonnbMagics.connect, "start": NeonnbMagics.start, "stop": NeonnbMagics.stop,
    "status": NeonnbMagics.status, "failed": NeonnbMagics.failed, "retry": NeonnbMagics.retry,
    "output": NeonnbMagics.output, "debug": NeonnbMagics.debug, "help": NeonnbMagics.help,
    "pause": NeonnbMagics.pause, "resume": NeonnbMagics.resume,
}
NeonnbMagics.neonnb.__doc__ = __doc__  # %neonnb? shows every subcommand
