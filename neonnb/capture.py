"""Jobs never print into cells: while a job runs, what it writes to ``sys.stdout`` and
``sys.stderr`` and what it logs through ``ctx.logger`` goes into its own ``Output``, which
the worker saves in the job's record (``handle.output``, ``%neonnb output ID``). Other
loggers' records reach it only where a handler writes them to the (routed) streams: the
user's logging set-up is theirs, and neonnb adds nothing to it.

While jobs run, the streams are routed, not replaced per job: each write goes to the
``Output`` of the job whose context it happens in (a context variable, so jobs running at
once on the loop or in threads keep their lines apart); writes outside any job pass through
untouched. After the last job the process has its own streams back.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

MAX_OUTPUT = 64_000  # characters kept per job: the last ones, where the error usually is

_current: contextvars.ContextVar[Output | None] = contextvars.ContextVar("neonnb_job_output", default=None)
_passing_through: contextvars.ContextVar[bool] = contextvars.ContextVar("neonnb_passing_through", default=False)
_install_lock = threading.Lock()
_capturing = 0  # jobs (and handler threads) capturing now: the streams are routed while there are any
JOB_LOG_LEVEL = logging.INFO  # what ctx.logger keeps in a job's output unless the neonnb.jobs logger says otherwise


class Output:
    """One job's captured text, bounded to its last ``MAX_OUTPUT`` characters."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._size = 0
        self._dropped = False
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)
            self._size += len(text)
            if self._size > 2 * MAX_OUTPUT:  # trim now and then, not on every write
                self._trim()

    def _trim(self) -> None:
        joined = "".join(self._parts)
        if len(joined) > MAX_OUTPUT:
            self._dropped = True
            cut = len(joined) - MAX_OUTPUT
            line_start = joined.find("\n", cut - 1, cut + MAX_OUTPUT // 2)  # keep whole lines only
            joined = joined[line_start + 1 if line_start >= 0 else cut:]
        self._parts = [joined]
        self._size = len(self._parts[0])

    def text(self) -> str:
        with self._lock:
            self._trim()
            head = f"[... earlier output dropped: only the last {MAX_OUTPUT:,} characters are kept]\n"
            return (head if self._dropped else "") + self._parts[0]

    def __bool__(self) -> bool:
        return self._size > 0


@contextlib.contextmanager
def capturing(output: Output) -> Iterator[None]:
    """Capture into ``output`` in the current context (the job's own task, or a sync
    handler's thread), with the streams routed while it lasts."""
    _route()
    token = _current.set(output)
    try:
        yield
    finally:
        _current.reset(token)
        _unroute()


def calling(output: Output, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` capturing into ``output``, for a sync handler's thread (its own context); the
    streams stay routed until the thread returns, even when its job timed out before."""
    def run(*args: Any) -> T:
        with capturing(output):
            return fn(*args)

    return run


class _Router(io.TextIOBase):
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        output = _current.get()
        if output is None or _passing_through.get():
            return self.stream.write(text)
        output.write(text)
        return len(text)

    def flush(self) -> None:
        # Also called when the router is collected (IOBase's finalizer), maybe after the real
        # stream was closed: Python 3.13 reports a failure there as an unraisable exception.
        if not self.stream.closed:
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, ... of the real stream
        return getattr(self.stream, name)


def job_logger(job_id: str) -> logging.Logger:
    """``ctx.logger``: a logger of the job's own, child of ``neonnb.jobs``, whose records at
    the job's level (``JOB_LOG_LEVEL``, or ``neonnb.jobs``'s own level where one is set) go
    into the job's output with their ``extra=`` fields, whatever the root logger's level.
    Each record also goes on to the handlers the user configured, for the levels they asked
    for. Nothing is added to the user's logging set-up: a ``basicConfig()`` after a job works.
    (Not registered with ``logging.getLogger``, which keeps every logger forever.)"""
    parent = logging.getLogger("neonnb.jobs")
    capture_level = parent.level or JOB_LOG_LEVEL
    logger = logging.Logger("neonnb.jobs", min(capture_level, parent.getEffectiveLevel()))
    logger.parent, logger.propagate = parent, False
    logger.addHandler(_JobHandler(job_id, capture_level, parent))
    return logger


class _JobHandler(logging.Handler):
    def __init__(self, job_id: str, capture_level: int, parent: logging.Logger) -> None:
        super().__init__()
        self.job_id, self.capture_level, self.parent = job_id, capture_level, parent

    def handle(self, record: logging.LogRecord) -> bool:  # no lock: nothing here is shared
        record.job_id = self.job_id
        output = _current.get()
        if output is not None and record.levelno >= self.capture_level:
            output.write(_format(record))
        if self.parent.isEnabledFor(record.levelno):
            token = _passing_through.set(True)  # a console handler of the user's prints it: captured already
            try:
                self.parent.handle(record)
            finally:
                _passing_through.reset(token)
        return True


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
_PLAIN_FIELDS = {*logging.makeLogRecord({}).__dict__, "message", "asctime", "job_id", "taskName"}


def _format(record: logging.LogRecord) -> str:
    text = _FORMAT.format(record)
    extra = "".join(f" {key}={value!r}" for key, value in record.__dict__.items() if key not in _PLAIN_FIELDS)
    if extra:  # after the message's first line, not after a traceback
        head, newline, rest = text.partition("\n")
        text = head + extra + newline + rest
    return text + "\n"


# The router last put over each stream, put back over the same stream next time: a busy worker
# routes and unroutes around every short job, and a new router each time (with its finalizer's
# flush) was a tenth of a no-op job's cost.
_routers: dict[str, _Router] = {}


def _route() -> None:
    """Route the streams while any job runs (again, if someone replaced them since): the
    one way to keep concurrent jobs' ``print`` apart."""
    global _capturing
    with _install_lock:
        _capturing += 1
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _Router):
                router = _routers.get(name)
                if router is None or router.stream is not stream:
                    router = _routers[name] = _Router(stream)
                setattr(sys, name, router)


def _unroute() -> None:
    """After the last job, give the streams back, unless someone replaced them since."""
    global _capturing
    with _install_lock:
        _capturing -= 1
        if _capturing == 0:
            if isinstance(sys.stdout, _Router):
                sys.stdout = sys.stdout.stream
            if isinstance(sys.stderr, _Router):
                sys.stderr = sys.stderr.stream
