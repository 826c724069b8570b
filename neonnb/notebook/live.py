"""A job handle shown in a cell while its job runs: a progress bar that follows the job on
the background loop until it ends (then the usual HTML takes over on the next display)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .. import _loop, render
from ..frames import fraction, progress_message
from ..records import FINISHED, Status

if TYPE_CHECKING:
    from ..handles import JobHandle
    from ..workflows import BatchHandle



def _widgets() -> Any:
    """ipywidgets, or None where it isn't installed (the displays fall back to HTML)."""
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def job_bundle(handle: JobHandle) -> dict[str, Any]:
    """The handle's display: a live widget while the job is queued or running, else HTML."""
    w = _widgets()
    try:
        status = handle.status
    except Exception:  # a missing job or an unreachable store: the HTML says which
        status = None
    if w is None or status is None or status in FINISHED:
        return {"text/html": handle._repr_html_(), "text/plain": repr(handle)}
    bar = w.FloatProgress(min=0.0, max=1.0, description=handle.id[-8:])
    label = w.HTML()
    box = w.HBox([bar, label])
    box.add_class("neonnb-job-progress")
    _loop.submit(_follow(handle, bar, label))
    return dict(box._repr_mimebundle_())


async def _follow(handle: JobHandle, bar: Any, label: Any, interval: float = 0.3) -> None:
    while True:
        try:
            record = await handle.afetch()
        except Exception as exc:
            label.value = render.escape(str(exc))
            return
        progress = record.progress or {}
        if record.status is Status.SUCCEEDED:
            bar.value = 1.0
        elif fraction(progress) is not None:
            bar.value = fraction(progress)
        message = progress_message(progress) or ""
        label.value = f"{render.status_badge(record.status.value)} {render.escape(str(message))}"
        if record.status in FINISHED:
            return
        await asyncio.sleep(interval)


def batch_bundle(batch: BatchHandle) -> dict[str, Any]:
    """A batch's display: one live bar for the whole batch (its parts in proportion beside it)
    until every job has ended, then the same as static HTML."""
    w = _widgets()
    try:
        counts = _loop.run_sync(batch.acounts())
    except Exception as exc:  # an unreachable store: say so where the bar would be
        return {"text/html": render.escape(str(exc)), "text/plain": repr(batch)}
    if w is None or batch.finished_share(counts) == 1:
        return {"text/html": batch_html(batch, counts), "text/plain": repr(batch)}
    bar = w.FloatProgress(min=0.0, max=1.0, description=f"batch of {len(batch)}")
    label = w.HTML(batch_html(batch, counts))
    box = w.HBox([bar, label])
    box.add_class("neonnb-batch-progress")
    _loop.submit(_follow_batch(batch, bar, label))
    return dict(box._repr_mimebundle_())


def batch_html(batch: BatchHandle, counts: dict[str, int]) -> str:
    return render.batch_state(counts, len(batch), f"batch of {len(batch)}: ")


async def _follow_batch(batch: BatchHandle, bar: Any, label: Any, interval: float = 0.5) -> None:
    while True:
        try:
            counts = await batch.acounts()
        except Exception as exc:
            label.value = render.escape(str(exc))
            return
        bar.value = batch.finished_share(counts)
        label.value = batch_html(batch, counts)
        if bar.value == 1:
            bar.bar_style = render.batch_bar_style(counts, True)
            return
        await asyncio.sleep(interval)
