"""Every error neonnb raises, in one tree.

    NeonnbError
    ├── ConfigError            a configuration value is wrong (names the field)
    ├── SerializationError     a job argument can't be stored (names the field)
    │   └── ResultError        a job returned a value that can't be stored (the job fails, not retried)
    ├── PayloadError           a stored payload can't be decoded into the job's fields
    ├── UnknownJobError        a stored job names a type this process hasn't registered
    ├── JobNotFound            no job with that id
    ├── JobFailed              waited on a job that ended in the failed store
    ├── JobCancelled           waited on a job that was cancelled
    ├── JobTimeout             a job ran past its timeout
    ├── StoreError             the queue's store refused or failed a command (says what it said)
    │   └── StoreUnavailable   the queue's store (Redis, the database) can't be reached
    ├── ClockSkew              this machine's clock and the store's disagree by more than leases allow
    ├── MissingDependency      a job asked ctx.deps for something nobody provided
    ├── MissingExtra           a part of neonnb needs a package that isn't installed (names the extra)
    └── Retry                  raised by a handler to ask for a retry after a delay

Each error's docstring is its default message.
"""

from __future__ import annotations

import traceback
from types import TracebackType
from typing import Any


class NeonnbError(Exception):
    """neonnb failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class ConfigError(NeonnbError, ValueError):
    """A configuration value is invalid."""


class SerializationError(NeonnbError, TypeError):
    """A job argument can't be serialised to JSON."""


class ResultError(SerializationError):
    """A job returned a value that can't be stored."""


class PayloadError(NeonnbError, ValueError):
    """A stored job payload can't be decoded."""


class UnknownJobError(NeonnbError, LookupError):
    """The stored job names a job type that is not registered in this process."""


class JobNotFound(NeonnbError, LookupError):
    """No job with that id."""


class JobCancelled(NeonnbError):
    """The job was cancelled before it finished."""


class JobExpired(JobCancelled):
    """The job was not started before its expiry (``dispatch(..., expires=)``): it never ran."""


class JobFailed(NeonnbError):
    """The job ended in the failed store."""

    def __init__(self, message: str | None = None, *, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error or {}


class JobTimeout(NeonnbError, TimeoutError):
    """The job ran longer than its timeout."""


class StoreError(NeonnbError):
    """The queue's store refused or failed a command (no permission, out of memory, a
    read-only database): the message says what the store said. Drivers raise this tree, not
    their libraries' errors."""


class StoreUnavailable(StoreError, ConnectionError):
    """The queue's store can't be reached; nothing was enqueued."""


class ClockSkew(NeonnbError):
    """This machine's clock and the store's disagree by more than a quarter of the lease."""


class MissingExtra(NeonnbError, ImportError):
    """A part of neonnb needs an optional package that isn't installed; the message says
    which extra to install (``pip install 'neonnb[notebook]'``)."""


class MissingDependency(NeonnbError, KeyError):
    """The job asked for a dependency that was never provided."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Retry(NeonnbError):
    """The job asked to be retried."""

    def __init__(self, message: str | None = None, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


# Where a job's traceback runs through neonnb's machinery before it reaches the job's code.
_PLUMBING = ("neonnb.worker", "neonnb.capture", "neonnb.job", "neonnb.notebook", "asyncio", "concurrent", "threading")


def error_info(exc: BaseException) -> dict[str, Any]:
    """How a job's error is stored: its type, message and the traceback from the job's code."""
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, user_traceback(exc.__traceback__))),
    }


def user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from the first frame of the job's own code on: the frames of the worker, its
    threads and its loop above that say nothing about what went wrong. An error raised in
    neonnb itself (a timeout, a payload it can't decode) keeps every frame."""
    start = tb
    while start is not None and start.tb_frame.f_globals.get("__name__", "").startswith(_PLUMBING):
        start = start.tb_next
    return start or tb
