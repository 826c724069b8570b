"""neonnb: a background job queue for people who work in Jupyter notebooks."""

from .config import Config, WorkerOptions
from .errors import (
    ClockSkew,
    ConfigError,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    JobTimeout,
    MissingDependency,
    MissingExtra,
    NeonnbError,
    PayloadError,
    Retry,
    SerializationError,
    StoreError,
    StoreUnavailable,
    UnknownJobError,
)
from .handles import FailedJob, JobHandle
from .hooks import Hook, JobEvent, Outcome
from .job import Context, Job
from .manager import QueueManager, connect
from .notebook import load_ipython_extension, unload_ipython_extension
from .records import JobRecord, Priority, QueueCounts, SchedulerInfo, Status, WorkerInfo
from .worker import Worker

__all__ = [
    "ClockSkew", "Config", "ConfigError", "Context", "FailedJob", "Hook", "Job", "JobCancelled", "JobEvent",
    "JobExpired", "JobFailed", "JobHandle", "JobNotFound", "JobRecord", "JobTimeout", "MissingDependency",
    "MissingExtra",
    "NeonnbError", "Outcome", "PayloadError", "Priority", "QueueCounts", "QueueManager", "Retry", "SchedulerInfo",
    "SerializationError", "Status", "StoreError", "StoreUnavailable", "UnknownJobError", "Worker", "WorkerInfo",
    "WorkerOptions",
    "connect", "load_ipython_extension", "unload_ipython_extension",
]
__version__ = "0.1.0"
