"""Jobs: the ``Job`` base class, ``@qm.job`` functions, the registry and the context.

A stored job names a registered job type and carries its arguments as JSON. Only registered
types ever run, so a payload can't name an arbitrary callable. Re-defining a job (a re-run
notebook cell) replaces its registration.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import sys
import threading
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from . import artifacts
from .capture import job_logger
from .codec import decode, decode_fields, dumps, encode, encode_fields, loads
from .config import Rate, parse_rate, positive_int
from .errors import ConfigError, MissingDependency, PayloadError, SerializationError, UnknownJobError
from .records import MAX_JOB_NAME, JobRecord, Priority, check_queue_name, check_text

if TYPE_CHECKING:
    from .handles import JobHandle
    from .manager import QueueManager
    from .workflows import BatchHandle

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:
    from typing_extensions import dataclass_transform

logger = logging.getLogger("neonnb.job")


# --- the job types ---------------------------------------------------------------------


@dataclass_transform()
class Job(abc.ABC):
    """Base class of class jobs: ``class SendEmail(Job)`` with typed fields and ``handle``.

    Subclasses become dataclasses. ``handle(self, ctx)`` may be sync (runs in a thread) or
    async (runs on the loop). Optional methods, as in the spec: ``should_retry(err)``,
    ``max_attempts()``, ``delay()`` (seconds), ``priority()``, ``retry_delay(attempt, err)``
    (seconds) and ``timeout()`` (seconds); and ``unique_key()``: while a job with the same key
    is queued or running, dispatching another returns that one's handle instead.
    ``class X(Job, job_name="reports.build")`` sets the stored name; by default it is
    ``module.QualName``.
    """

    job_name: ClassVar[str]

    def __init_subclass__(cls, job_name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__dataclass_fields__" not in cls.__dict__:
            dataclasses.dataclass(cls)
        cls.job_name = check_text(job_name or f"{cls.__module__}.{cls.__qualname__}", MAX_JOB_NAME, "job name")
        _check_hooks(cls)
        if not inspect.isabstract(cls):
            register(cls.job_name, ClassJobType(cls))

    @abc.abstractmethod
    def handle(self, ctx: Context) -> Any:
        """Do the work; the return value, if JSON serialisable, is stored as the result."""


# The optional methods a job may define, and how many arguments (after self) each may take.
_HOOK_ARITIES = {
    "should_retry": ((1,), "should_retry(self, err)"),
    "retry_delay": ((0, 2), "retry_delay(self, attempt, err) or the spec's retry_delay(self)"),
    "max_attempts": ((0,), "max_attempts(self)"),
    "delay": ((0,), "delay(self)"),
    "priority": ((0,), "priority(self)"),
    "timeout": ((0,), "timeout(self)"),
    "unique_key": ((0,), "unique_key(self)"),
}


def _check_hooks(cls: type) -> None:
    """Refuse, at class definition, an optional method the worker could not call: it would
    fail every attempt of every such job instead."""
    for name, (arities, shape) in _HOOK_ARITIES.items():
        method = cls.__dict__.get(name)
        if method is None or not callable(method):
            continue
        params = list(inspect.signature(method).parameters.values())[1:]
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            continue
        required = [p for p in params if p.default is p.empty]
        if not any(len(required) <= n <= len(params) for n in arities):
            raise TypeError(f"{cls.__qualname__}.{name} takes {len(params)} argument(s) after self; "
                            f"neonnb calls it as {shape}")


def takes_no_arguments(method: Callable[..., Any]) -> bool:
    """Whether a bound method can be called without arguments (the spec's ``RetryDelay()``)."""
    return _no_arguments(getattr(method, "__func__", method))


@functools.cache
def _no_arguments(function: Callable[..., Any]) -> bool:
    params = list(inspect.signature(function).parameters.values())[1:]
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


class JobType(abc.ABC):
    """A registry entry: turns a stored payload back into something with ``handle(ctx)``.
    ``rate``: at most so many starts of this job per window, across every worker;
    ``concurrency``: at most so many running at once; with ``limit_key`` (an argument's
    name, or a callable of the arguments), each per value of it."""

    name: str
    rate: Rate | None = None
    concurrency: int | None = None
    limit_key: str | Callable[..., Any] | None = None

    @abc.abstractmethod
    def decode(self, payload: str) -> Any:
        """The runnable job for ``payload``; raises PayloadError."""

    def _set_limits(self, rate_limit: Any, limit_key: Any, concurrency: Any = None) -> None:
        self.rate = None if rate_limit is None else parse_rate(rate_limit, f"{self.name}: rate_limit")
        if concurrency is not None:
            self.concurrency = positive_int(concurrency, f"{self.name}: concurrency")
        if limit_key is not None and not (callable(limit_key) or isinstance(limit_key, str)):
            raise ConfigError(f"{self.name}: limit_key must name an argument or be a callable of the arguments, "
                              f"got {limit_key!r}")
        if limit_key is not None and self.rate is None and self.concurrency is None:
            raise ConfigError(f"{self.name}: limit_key applies rate_limit or concurrency per key; give one of them")
        self.limit_key = limit_key

    def permit_key(self, job: Any) -> str:
        """What the rate limit counts for this (decoded) job: its name, and its key's value."""
        if self.limit_key is None:
            return self.name
        arguments = job.arguments if isinstance(job, FunctionCall) else {
            f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
        value = self.limit_key(**arguments) if callable(self.limit_key) else arguments.get(self.limit_key)
        return f"{self.name}:{value}"


class ClassJobType(JobType):
    def __init__(self, cls: type[Job]) -> None:
        self.cls = cls
        self.name = cls.job_name
        self._set_limits(getattr(cls, "rate_limit", None), getattr(cls, "limit_key", None),
                         getattr(cls, "concurrency", None))

    def decode(self, payload: str) -> Any:
        return decode_fields(_loads(payload, self.name), self.cls, self.name)


def encode_job(job: Any) -> tuple[str, str]:
    """``(name, payload)`` of a job instance; raises SerializationError naming the field."""
    if isinstance(job, FunctionCall):
        return job.function.name, dumps(job.arguments)
    if not isinstance(job, Job):
        raise TypeError(
            f"can't dispatch {job!r}: expected a neonnb Job instance or a call made with "
            "my_function.call(...)/dispatch(...) on a @qm.job function"
        )
    data = encode_fields(job, type(job).__qualname__)
    _check_decodes(lambda: decode_fields(data, type(job), job.job_name))
    return job.job_name, dumps(data)


def _check_decodes(decode: Callable[[], Any]) -> None:
    """Decode what was just encoded, as the worker will: an argument that doesn't fit its
    declared type fails the dispatch, instead of the job once a worker takes it."""
    try:
        decode()
    except PayloadError as exc:
        raise SerializationError(f"can't dispatch: {exc}") from None


class FunctionJob(JobType):
    """A plain function registered with ``@qm.job``: ``f(x)`` still calls it directly,
    ``f.dispatch(x)`` enqueues it and ``f.map(xs)`` enqueues a batch.

    A parameter named ``ctx`` receives the job context and is not stored.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        manager: QueueManager,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        priority: Priority = Priority.NORMAL,
        unique: bool = False,
        rate_limit: str | None = None,
        limit_key: str | Callable[..., Any] | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.fn = fn
        self.unique = unique
        self.manager = manager
        self.name = check_text(name or f"{fn.__module__}.{fn.__qualname__}", MAX_JOB_NAME, "job name")
        self.queue = None if queue is None else check_queue_name(queue)
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.priority = priority
        self.signature = inspect.signature(fn)
        self.wants_ctx = "ctx" in self.signature.parameters
        # What callers pass: everything but ctx, which the worker supplies (first or not).
        self._caller_signature = self.signature.replace(
            parameters=[p for p in self.signature.parameters.values() if p.name != "ctx"]
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        self._set_limits(rate_limit, limit_key, concurrency)
        if isinstance(limit_key, str) and limit_key not in self._caller_signature.parameters:
            raise ConfigError(f"{self.name}: limit_key {limit_key!r} is not one of its arguments "
                              f"({', '.join(self._caller_signature.parameters) or 'it has none'})")
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        register(self.name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<neonnb job {self.name}>"

    def call(self, *args: Any, **kwargs: Any) -> FunctionCall:
        """A dispatchable call with these arguments (checked against the signature now)."""
        try:
            bound = self._caller_signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}") from None
        arguments = {k: encode(v, f"{self.name}({k}=...)") for k, v in bound.arguments.items()}
        _check_decodes(lambda: self._decode_arguments(arguments))
        return FunctionCall(self, arguments)

    def dispatch(self, *args: Any, **kwargs: Any) -> JobHandle:
        """Enqueue ``f(*args, **kwargs)`` on the job's queue."""
        return self.manager.dispatch(self.queue or self.manager.config.default_queue, self.call(*args, **kwargs))

    async def adispatch(self, *args: Any, **kwargs: Any) -> JobHandle:
        return await self.manager.adispatch(self.queue or self.manager.config.default_queue, self.call(*args, **kwargs))

    def map(self, items: typing.Iterable[Any]) -> BatchHandle:
        """Enqueue ``f(item)`` for every item in one batch."""
        calls = [self.call(item) for item in items]
        return self.manager.dispatch_batch(self.queue or self.manager.config.default_queue, calls)

    def starmap(self, items: typing.Iterable[Any]) -> BatchHandle:
        """Enqueue ``f(*item)`` for every tuple (or list) and ``f(**item)`` for every dict, in
        one batch: ``f.starmap([(part, "eu"), {"part": other, "region": "us"}])``."""
        calls = []
        for index, item in enumerate(items):
            if isinstance(item, dict):
                calls.append(self.call(**item))
            elif isinstance(item, tuple | list):
                calls.append(self.call(*item))
            else:
                raise TypeError(f"{self.name}.starmap: item {index} is a {type(item).__name__}; give a tuple of "
                                "positional arguments or a dict of keyword arguments (or use .map for one argument)")
        return self.manager.dispatch_batch(self.queue or self.manager.config.default_queue, calls)

    @functools.cache  # noqa: B019 - one FunctionJob per definition, kept for the process anyway
    def _hints(self) -> dict[str, Any]:
        return typing.get_type_hints(self.fn)

    def decode(self, payload: str) -> FunctionCall:
        return FunctionCall(self, self._decode_arguments(_loads(payload, self.name)), decoded=True)

    def _decode_arguments(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise PayloadError(f"{self.name}: expected a JSON object of arguments, got {data!r}")
        hints = self._hints()
        unknown = set(data) - set(self.signature.parameters)
        if unknown:
            raise PayloadError(f"{self.name}: unknown argument(s) {', '.join(sorted(unknown))}")
        arguments = {}
        for name, param in self.signature.parameters.items():
            hint = hints.get(name, Any)
            if name not in data:
                optional = param.default is not param.empty or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
                if not optional and name != "ctx":
                    raise PayloadError(f"{self.name}: missing argument {name!r}")
                continue
            if param.kind is param.VAR_POSITIONAL:
                hint = list[hint]  # type: ignore[valid-type]
            elif param.kind is param.VAR_KEYWORD:
                hint = dict[str, hint]  # type: ignore[valid-type]
            arguments[name] = decode(data[name], hint, f"{self.name}({name}=...)")
        return arguments


class FunctionCall:
    """One call of a ``FunctionJob``: what gets stored, and what a worker runs."""

    def __init__(self, function: FunctionJob, arguments: dict[str, Any], decoded: bool = False) -> None:
        self.function = function
        self.arguments = arguments
        self.decoded = decoded

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"{self.function.name}({args})"

    def handle(self, ctx: Context) -> Any:
        fn, args, kwargs = self.target(ctx)
        return fn(*args, **kwargs)

    def target(self, ctx: Context) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        """The user's function and what ``handle`` calls it with (``%neonnb debug`` steps into it)."""
        arguments = dict(self.arguments)
        if self.function.wants_ctx:
            arguments["ctx"] = ctx
        bound = inspect.BoundArguments(self.function.signature, arguments)
        return self.function.fn, bound.args, bound.kwargs

    def max_attempts(self) -> int | None:
        return self.function.max_attempts

    def timeout(self) -> float | None:
        return self.function.timeout

    def priority(self) -> Priority:
        return self.function.priority

    def unique_key(self) -> str | None:
        """With ``@qm.job(unique=True)``: the function and its arguments."""
        if not self.function.unique:
            return None
        arguments = json.dumps(self.arguments, sort_keys=True, separators=(",", ":"))
        return f"{self.function.name}:{hashlib.sha256(arguments.encode()).hexdigest()[:32]}"


def is_async_job(job: Any) -> bool:
    if isinstance(job, FunctionCall):
        return job.function.is_async
    cls = type(job)
    if cls not in _async_classes:
        _async_classes[cls] = inspect.iscoroutinefunction(cls.handle)
    return _async_classes[cls]


_async_classes: dict[type, bool] = {}  # iscoroutinefunction is slow enough to matter per job


def _loads(payload: str, name: str) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"{name}: the stored payload is not valid JSON ({exc}); it was {payload[:200]!r}") from None


# --- registry ----------------------------------------------------------------------------

_registry: dict[str, JobType] = {}
_registry_lock = threading.Lock()


def register(name: str, job_type: JobType) -> None:
    with _registry_lock:
        if name in _registry:
            logger.debug("job %s re-defined; the new definition replaces the old one", name)
        _registry[name] = job_type


def known_type(name: str) -> JobType | None:
    """The registered type of job ``name``, or None."""
    with _registry_lock:
        return _registry.get(name)


def lookup(name: str) -> JobType:
    with _registry_lock:
        job_type = _registry.get(name)
    if job_type is not None:
        return job_type
    module = name.rpartition(".")[0]
    if module == "__main__" or module.startswith("__main__."):
        hint = (
            "it was defined in a notebook or a script (module __main__), which other processes "
            "can't import; move it into a module and start the worker with "
            "`neonnb worker --import that_module`"
        )
    else:
        hint = f"import the module that defines it (`neonnb worker --import {module}`)"
    raise UnknownJobError(f"job type {name!r} is not registered in this process: {hint}")


def unreadable(record: JobRecord) -> PayloadError:
    """The error of a job whose stored record can't be read (``JobRecord.broken``)."""
    return PayloadError(f"the stored record of job {record.id} {record.broken}: fix it in the store and retry "
                        "the job, or forget it")


def decode_job(record: JobRecord) -> Any:
    """The runnable job a record stores; UnknownJobError or PayloadError say what to fix."""
    if record.broken:
        raise unreadable(record)
    job_type = lookup(record.name)
    payload = artifacts.resolve(record.payload)  # a big payload kept apart: read it first
    try:
        return job_type.decode(payload)
    except PayloadError as exc:
        raise PayloadError(
            f"{exc} (the stored arguments don't fit the current definition of {record.name}: "
            "change the job to accept them, or forget this job)"
        ) from None


# --- the context a handler receives -------------------------------------------------------


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Dependencies(dict[str, Any]):
    """What ``qm.provide(name=value)`` injected; a missing name says how to provide it."""

    def __missing__(self, key: str) -> Any:
        raise MissingDependency(
            f"the job asked for dependency {key!r}, which was never provided; "
            f"call qm.provide({key}=...) before starting the worker"
        )


class Context:
    """What ``handle(ctx)`` receives: the job's identity, a logger, progress and deps."""

    def __init__(
        self,
        record: JobRecord,
        deps: Mapping[str, Any],
        report_progress: Callable[[JobRecord, dict[str, Any]], None],
    ) -> None:
        self.job_id = record.id
        self.queue = record.queue
        self.name = record.name
        self.attempt = record.attempts
        self.max_attempts = record.max_attempts
        self.deps = Dependencies(deps)
        self._report_progress = report_progress
        self._record = record
        self._cancelled = False
        self.saw_cancel = False  # the handler read ``cancelled`` as True

    @property
    def previous(self) -> Any:
        """In a chain, the result of the step before this one (None for the first step); in a
        batch's ``then`` job, the list of the batch's results in order (None for a job that
        failed or was cancelled)."""
        flow = self._record.flow or {}
        previous = (flow.get("chain") or flow.get("after_batch") or {}).get("previous")
        return None if previous is None else loads(previous)

    @functools.cached_property
    def logger(self) -> logging.Logger:
        """A ``neonnb.jobs`` logger whose records carry the job id and, from INFO up, are
        kept in the job's output (``handle.output``); see ``neonnb.capture.job_logger``."""
        return job_logger(self.job_id)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress: ``ctx.progress(3, 10, "loading")``. Cheap to call often."""
        if not _finite_number(done) or (total is not None and not _finite_number(total)):
            raise TypeError(f"ctx.progress(done, total, message): done and total must be finite numbers "
                            f"(total may be None), got done={done!r}, total={total!r}")
        if message is not None and not isinstance(message, str):
            raise TypeError(f"ctx.progress(done, total, message): message must be a string or None, got {message!r}")
        self._report_progress(self._record, {"done": done, "total": total, "message": message})

    @property
    def cancelled(self) -> bool:
        """True once the job timed out, was cancelled or the worker is shutting down; long sync
        loops should check it and stop (a handler that saw it true and returned is taken to have
        stopped part-way: a stopping worker gives its job back rather than record it done)."""
        if self._cancelled:
            self.saw_cancel = True
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled = True  # a plain flag: handler threads only ever read it
