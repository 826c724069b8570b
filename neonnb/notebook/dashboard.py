"""``qm.dashboard()``: one ipywidgets panel with the queues, a depth sparkline, running jobs
with progress bars, recent completions, the failed jobs (retry, forget, retry all) and worker
controls.

One refresher task on neonnb's background loop reads the store every ``interval`` seconds
and sets a widget trait only when what it shows changed, inside ``hold_sync()``: the kernel
accepts trait changes from that thread (ipykernel >= 6.29), so the panel keeps moving while a
cell runs sync code. Button callbacks only submit work to the loop and return.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .. import _loop
from ..errors import MissingDependency
from ..frames import fraction, progress_message
from ..job import JobRecord, Status
from . import html

if TYPE_CHECKING:
    from ..manager import QueueManager
    from ..worker import Worker

try:
    import ipywidgets as w
except ImportError as exc:  # pragma: no cover - depends on the install
    raise MissingDependency("the dashboard needs ipywidgets: pip install 'neonnb[notebook]'") from exc

logger = logging.getLogger("neonnb.notebook")

_open: set[Dashboard] = set()  # refreshing now; %unload_ext closes them


class Dashboard:
    def __init__(self, manager: QueueManager, *, interval: float | None = 0.5, history: int = 120) -> None:
        self.manager = manager
        self.interval = interval
        self._depths: collections.deque[int] = collections.deque(maxlen=history)
        self._shown: dict[str, Any] = {}  # what each part shows now, to skip unchanged updates
        self._bars: dict[str, tuple[w.HBox, w.FloatProgress, w.Label]] = {}
        self._workers: list[Worker] = []
        self._task: Any = None
        self.closed = False

        self.queues = _with_class(w.HTML(), "neonnb-queues-view")
        self.sparkline = _with_class(w.HTML(), "neonnb-sparkline-view")
        self.running = _with_class(w.VBox(), "neonnb-running")
        self.recent = _with_class(w.HTML(), "neonnb-recent")
        self.schedules = _with_class(w.HTML(), "neonnb-schedules")
        self.workflows = _with_class(w.VBox(), "neonnb-workflows")
        self._workflow_bars: dict[str, tuple[w.HBox, w.FloatProgress, w.HTML]] = {}
        self.failed = _with_class(w.VBox(), "neonnb-failed")
        self.retry_all = _with_class(w.Button(description="Retry all failed", icon="redo"), "neonnb-retry-all")
        self.retry_all.on_click(lambda _: self._submit(self.manager.failed.aretry_all()))
        self.queue_name = w.Text(value=manager.config.default_queue, description="queue", layout={"width": "200px"})
        self.concurrency = w.BoundedIntText(value=manager.config.workers, min=1, max=1000, description="workers",
                                            layout={"width": "160px"})
        self.start_button = _with_class(w.Button(description="Start worker", icon="play"), "neonnb-start")
        self.stop_button = _with_class(w.Button(description="Stop workers", icon="stop"), "neonnb-stop")
        self.start_button.on_click(lambda _: self.start_worker())
        self.stop_button.on_click(lambda _: self.stop_workers())
        self.worker_state = _with_class(w.HTML(), "neonnb-worker-state")

        def title(text: str) -> w.HTML:
            return w.HTML(f"<b>{html.escape(text)}</b>")

        self.widget = _with_class(w.VBox([
            title(f"neonnb · {manager.config.driver}"), self.queues, self.sparkline,
            title("running"), self.running, title("recently finished"), self.recent,
            title("schedules"), self.schedules, title("chains and batches"), self.workflows,
            title("failed"), self.failed, self.retry_all,
            title("workers in this kernel"), w.HBox([self.queue_name, self.concurrency, self.start_button,
                                                    self.stop_button]), self.worker_state,
        ]), "neonnb-panel", "neonnb-dashboard")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # --- refreshing ---------------------------------------------------------------------

    def start(self) -> Dashboard:
        """Refresh every ``interval`` seconds on the background loop until ``close()``."""
        if self._task is None and self.interval:
            self._task = _loop.submit(self._refresh_forever())
            _open.add(self)
        return self

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.closed = True
        _open.discard(self)
        self.widget.close()

    async def _refresh_forever(self) -> None:
        while self.interval:  # None (set by a later qm.dashboard(interval=None)): refresh by hand
            try:
                await self.refresh()
            except Exception as exc:  # the store may be down for a while; keep the panel alive
                logger.warning("dashboard refresh failed: %r", exc)
                error = f"<span style='color:{html.ERROR}'>{html.escape(str(exc))}</span>"
                self._set(self.worker_state, "value", error)
            await asyncio.sleep(self.interval or 0)
        self._task = None
        _open.discard(self)

    async def refresh(self) -> None:
        """Read the store once and update what changed."""
        manager = self.manager
        counts = await manager.astats()
        running = await manager.ajobs(Status.RUNNING, limit=20)
        finished = await manager.ajobs(Status.SUCCEEDED, limit=8)
        failed = await manager.ajobs(Status.FAILED, limit=20)
        self._depths.append(sum(c.size for c in counts.values()))
        with self.widget.hold_sync():
            self._set(self.queues, "value", html.queues_table(counts))
            self._set(self.sparkline, "value", html.sparkline(list(self._depths)))
            self._show_running(running)
            self._set(self.recent, "value", _recent_table(finished))
            self._show_failed(failed)
            self._set(self.schedules, "value", _schedules_table(manager, manager.clock()))
            self._show_workflows(await _workflow_states(manager))
            workers = manager.workers
            state = ", ".join(repr(wk) for wk in workers) or "none running"
            self._set(self.worker_state, "value", f"<span class='neonnb-workers'>{html.escape(state)}</span>")

    def _set(self, widget: w.Widget, trait: str, value: Any) -> None:
        key = f"{id(widget)}.{trait}"
        if self._shown.get(key) != value:
            self._shown[key] = value
            setattr(widget, trait, value)

    def _show_running(self, records: list[JobRecord]) -> None:
        for record in records:
            if record.id not in self._bars:
                short_name = record.name.rpartition(".")[2][-24:]
                bar = _with_class(w.FloatProgress(min=0.0, max=1.0, description=short_name), "neonnb-progress")
                label = w.Label()
                self._bars[record.id] = (_with_class(w.HBox([bar, label]), "neonnb-running-job"), bar, label)
            _, bar, label = self._bars[record.id]
            progress = record.progress or {}
            self._set(bar, "value", fraction(progress) or 0.0)
            self._set(label, "value", progress_message(progress) or "")
        ids = [r.id for r in records]
        for gone in set(self._bars) - set(ids):
            self._bars.pop(gone)[0].close()
        self._set(self.running, "children", tuple(self._bars[i][0] for i in ids))

    def _show_workflows(self, states: list[tuple[str, str, float, str]]) -> None:
        """One row per recent chain or batch: a label, a progress bar and its state."""
        for key, label, done, state in states:
            if key not in self._workflow_bars:
                bar = _with_class(w.FloatProgress(min=0.0, max=1.0, description=label), "neonnb-workflow-progress")
                text = w.HTML()
                self._workflow_bars[key] = (_with_class(w.HBox([bar, text]), "neonnb-workflow"), bar, text)
            _, bar, text = self._workflow_bars[key]
            self._set(bar, "value", done)
            self._set(text, "value", html.escape(state))
        self._set(self.workflows, "children", tuple(self._workflow_bars[key][0] for key, *_ in states))

    def _show_failed(self, records: list[JobRecord]) -> None:
        rows = tuple((r.id, r.name, r.attempts, (r.error or {}).get("type"), (r.error or {}).get("message"))
                     for r in records)
        if self._shown.get("failed") == rows:
            return
        self._shown["failed"] = rows
        for old in self.failed.children:
            old.close()
        self.failed.children = tuple(self._failed_row(*row) for row in rows)

    def _failed_row(self, job_id: str, name: str, attempts: int, kind: str | None, message: str | None) -> w.HBox:
        text = w.HTML(f"<code>{html.escape(job_id)}</code> {html.escape(name)} after {attempts} attempt(s): "
                      f"<span style='color:{html.ERROR}'>{html.escape(str(kind))}: {html.escape(str(message))}</span>")
        retry = _with_class(w.Button(description="retry", layout={"width": "70px"}), "neonnb-retry")
        forget = _with_class(w.Button(description="forget", layout={"width": "70px"}), "neonnb-forget")
        retry.on_click(lambda _: self._submit(self.manager.failed.aretry(job_id)))
        forget.on_click(lambda _: self._submit(self.manager.failed.aforget(job_id)))
        return _with_class(w.HBox([retry, forget, text]), "neonnb-failed-job")

    def _submit(self, work: Coroutine[Any, Any, Any]) -> None:
        """From a button: run ``work`` on the loop, then refresh; never block the caller."""
        async def then_refresh() -> None:
            try:
                await work
            finally:
                await self.refresh()

        _loop.submit(then_refresh())

    # --- worker controls ----------------------------------------------------------------

    def start_worker(self) -> Worker:
        worker = self.manager.worker(self.queue_name.value, int(self.concurrency.value)).start()
        self._workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        """Ask the workers started here to stop; their unfinished jobs go back to the queue."""
        for worker in self._workers:
            worker.request_stop()
        self._workers.clear()


def _with_class(widget: Any, *names: str) -> Any:
    for name in names:
        widget.add_class(name)
    return widget


def _recent_table(records: list[JobRecord]) -> str:
    if not records:
        return f"<div class='neonnb-recent-view' style='color:{html.MUTED}'>nothing yet</div>"
    rows = [[html.when(r.finished_at), r.name, r.queue, r.id] for r in records]
    return html.table(["finished", "job", "queue", "id"], rows, "neonnb-recent-view")


def _schedules_table(manager: QueueManager, now: float) -> str:
    schedules = [s for scheduler in manager.schedulers for s in scheduler.schedules.values()]
    if not schedules:
        return f"<div class='neonnb-schedules-view' style='color:{html.MUTED}'>no schedules in this kernel</div>"
    rows = [[s.name, s.cron or f"every {s.interval:g}s", s.queue, html.when(s.last_tick),
             html.when(s.next_tick(now))] for s in schedules]
    return html.table(["schedule", "rule", "queue", "last run", "next run"], rows, "neonnb-schedules-view")


async def _workflow_states(manager: QueueManager) -> list[tuple[str, str, float, str]]:
    """(key, label, finished share, state) of this kernel's recent chains and batches."""
    from ..workflows import BatchHandle

    states = []
    for flow in list(manager.recent_workflows):
        if isinstance(flow, BatchHandle):
            counts = await flow.acounts()
            state = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
            states.append((str(id(flow)), f"batch of {len(flow)}", flow.finished_share(counts), state))
        else:
            status = await flow.astatus()
            done = status.steps.count(Status.SUCCEEDED.value)
            states.append((flow.id, f"chain of {flow.length}", done / flow.length, str(status)))
    return states


def close_all() -> None:
    for dashboard in list(_open):
        dashboard.close()
