"""Jobs never print into cells: while a job runs, what it writes to ``sys.stdout`` and
``sys.stderr`` and what it logs goes into its own ``Output``, which the worker saves in the
job's record (``handle.output``, ``%neonnb output ID``).

The streams are routed, not replaced per job: ``install()`` wraps them, and each write
goes to the ``Output`` of the job whose context it happens in (a context variable, so jobs
running at once on the loop or in threads keep their lines apart); writes outside any job
pass through untouched.
"""

from __future__ import annotations

import contextvars
import io
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

MAX_OUTPUT = 64_000  # characters kept per job: the last ones, where the error usually is

_current: contextvars.ContextVar[Output | None] = contextvars.ContextVar("neonnb_job_output", default=None)
_install_lock = threading.Lock()
_installed = False


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
        self._dropped = self._dropped or len(joined) > MAX_OUTPUT
        self._parts = [joined[-MAX_OUTPUT:]]
        self._size = len(self._parts[0])

    def text(self) -> str:
        with self._lock:
            self._trim()
            head = f"[... earlier output dropped: only the last {MAX_OUTPUT:,} characters are kept]\n"
            return (head if self._dropped else "") + self._parts[0]

    def __bool__(self) -> bool:
        return self._size > 0


def activate(output: Output) -> None:
    """Capture into ``output`` for the rest of the current context (the job's own task)."""
    install()
    _current.set(output)


def calling(output: Output, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` capturing into ``output``, for a sync handler's thread (its own context)."""
    def run(*args: Any) -> T:
        _current.set(output)
        return fn(*args)

    return run


class _Router(io.TextIOBase):
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        output = _current.get()
        if output is None:
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


class _LogCapture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        output = _current.get()
        if output is not None:
            output.write(self.format(record) + "\n")


def install() -> None:
    """Route the streams (again, if someone replaced them since) and logging, once each."""
    global _installed
    with _install_lock:
        if not isinstance(sys.stdout, _Router):
            sys.stdout = _Router(sys.stdout)
        if not isinstance(sys.stderr, _Router):
            sys.stderr = _Router(sys.stderr)
        if not _installed:
            handler = _LogCapture()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(handler)
            _installed = True
