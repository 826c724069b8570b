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



def job_bundle(handle: JobHandle) -> dict[str, Any]:
    """The handle's display: a live widget while the job is queued or running, else HTML."""
    try:
        import ipywidgets as w
    except ImportError:
        w = None
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
