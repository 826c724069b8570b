"""pandas views of queues, jobs, failed jobs and workers, with typed columns: counts are
int64, times are UTC timestamps, statuses and priorities are categoricals.

The QueueManager's ``queues_df()``, ``jobs_df()``, ``failed_df()`` and ``workers_df()`` call
these; pandas is imported only here (``pip install 'neonnb[notebook]'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .artifacts import is_reference
from .codec import loads, shown_payload
from .errors import MissingExtra
from .records import JobRecord, Priority, QueueCounts, Status, WorkerInfo

if TYPE_CHECKING:
    import pandas as pd

TIMES = ("created_at", "run_at", "started_at", "finished_at")


def pandas_module() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise MissingExtra("DataFrame views need pandas: pip install 'neonnb[notebook]'") from exc
    return pandas


def queues_frame(counts: dict[str, QueueCounts]) -> pd.DataFrame:
    pd = pandas_module()
    columns = ["high", "normal", "low", "delayed", "running", "succeeded", "failed"]
    rows = [[c.waiting["high"], c.waiting["normal"], c.waiting["low"], c.delayed, c.running, c.succeeded, c.failed]
            for c in counts.values()]
    frame = pd.DataFrame(rows, index=pd.Index(list(counts), name="queue", dtype="object"), columns=columns)
    frame = frame.astype("int64")
    frame.insert(3, "waiting", frame[["high", "normal", "low"]].sum(axis=1).astype("int64"))
    return frame


SMALL_RESULT = 64 * 1024  # results up to this size (encoded) are decoded into jobs_df(results=True)


def jobs_frame(records: Sequence[JobRecord], results: bool = False) -> pd.DataFrame:
    """One row per job; ``results``: with a ``result`` column, small results decoded, bigger
    ones (and those kept apart) described (``<DataFrame 1,000,000 rows x 4 columns: ...>``)."""
    pd = pandas_module()
    frame = pd.DataFrame({
        "id": pd.Series([r.id for r in records], dtype="object"),
        "queue": pd.Series([r.queue for r in records], dtype="object"),
        "name": pd.Series([r.name for r in records], dtype="object"),
        "status": pd.Categorical([r.status.value for r in records], categories=[s.value for s in Status]),
        "priority": pd.Categorical([r.priority.value for r in records], categories=[p.value for p in Priority],
                                   ordered=True),
        "attempts": pd.Series([r.attempts for r in records], dtype="int64"),
        "max_attempts": pd.Series([r.max_attempts for r in records], dtype="int64"),
        **{name: _timestamps(pd, [getattr(r, name) for r in records]) for name in TIMES},
        "progress": pd.Series([fraction(r.progress) for r in records], dtype="float64"),
        "message": pd.Series([progress_message(r.progress) for r in records], dtype="object"),
        "worker_id": pd.Series([r.worker_id for r in records], dtype="object"),
        "error": pd.Series([(r.error or {}).get("message") for r in records], dtype="object"),
    })
    if results:
        frame["result"] = pd.Series([_result(r.result) for r in records], dtype="object")
    return frame


def _result(text: str | None) -> Any:
    if text is None:
        return None
    if len(text) <= SMALL_RESULT and not is_reference(text):
        return loads(text)
    return shown_payload(text)


def failed_frame(records: Sequence[JobRecord]) -> pd.DataFrame:
    pd = pandas_module()
    return pd.DataFrame({
        "id": pd.Series([r.id for r in records], dtype="object"),
        "queue": pd.Series([r.queue for r in records], dtype="object"),
        "name": pd.Series([r.name for r in records], dtype="object"),
        "arguments": pd.Series([shown_payload(r.payload) for r in records], dtype="object"),
        "attempts": pd.Series([r.attempts for r in records], dtype="int64"),
        "failed_at": _timestamps(pd, [r.finished_at for r in records]),
        "error_type": pd.Series([(r.error or {}).get("type") for r in records], dtype="object"),
        "error": pd.Series([(r.error or {}).get("message") for r in records], dtype="object"),
    })


def workers_frame(workers: Sequence[WorkerInfo], now: float) -> pd.DataFrame:
    pd = pandas_module()
    frame = pd.DataFrame({
        "id": pd.Series([w.id for w in workers], dtype="object"),
        "host": pd.Series([w.host for w in workers], dtype="object"),
        "pid": pd.Series([w.pid for w in workers], dtype="int64"),
        "queues": pd.Series([", ".join(w.queues) for w in workers], dtype="object"),
        "concurrency": pd.Series([w.concurrency for w in workers], dtype="int64"),
        "state": pd.Categorical([w.state(now) for w in workers], categories=["running", "stopping", "lost"]),
        "running": pd.Series([len(w.running) for w in workers], dtype="int64"),
        "running_jobs": pd.Series([list(w.running) for w in workers], dtype="object"),
        "jobs_done": pd.Series([w.jobs_done for w in workers], dtype="int64"),
        "jobs_failed": pd.Series([w.jobs_failed for w in workers], dtype="int64"),
    })
    frame["started_at"] = _timestamps(pd, [w.started_at for w in workers])
    frame["last_seen"] = _timestamps(pd, [w.last_seen for w in workers])
    return frame


def _timestamps(pd: Any, epochs: list[float | None]) -> Any:
    # nanoseconds whatever the pandas version's default unit, so the dtype is stable
    return pd.to_datetime(pd.Series(epochs, dtype="float64"), unit="s", utc=True).astype("datetime64[ns, UTC]")


def fraction(progress: Any) -> float | None:
    """done/total in [0, 1], or None when the job reported no total. Values ctx.progress no
    longer takes (text, NaN), stored by an older neonnb or by hand, read as no total."""
    if not isinstance(progress, dict) or not progress.get("total"):
        return None
    try:
        share = float(progress["done"]) / float(progress["total"])
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError):
        return None
    return min(max(share, 0.0), 1.0) if math.isfinite(share) else None


def progress_message(progress: Any) -> str | None:
    """The message of a progress report, as text whatever was stored."""
    message = progress.get("message") if isinstance(progress, dict) else None
    return None if message is None else str(message)


def results_frame(results: Sequence[Any], ids: Sequence[str]) -> pd.DataFrame:
    """A batch's results as one DataFrame: DataFrame results concatenated in batch order,
    other results one row per job (a dict's keys as columns, anything else in ``result``),
    indexed by job id."""
    pd = pandas_module()
    if results and all(isinstance(r, pd.DataFrame) for r in results):
        return pd.concat(list(results))
    if any(isinstance(r, pd.DataFrame) for r in results):
        raise TypeError("the batch's results mix DataFrames and other values; concatenate them by hand")
    index = pd.Index(list(ids), name="job_id", dtype="object")
    if results and all(isinstance(r, dict) for r in results):
        return pd.DataFrame.from_records(list(results), index=index)
    return pd.DataFrame({"result": pd.Series(list(results), index=index, dtype="object")})
