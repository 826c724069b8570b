"""``qm.dashboard()``: one ipywidgets panel. A card with one line of summary (store,
workers, throughput, queued / running / done / failed, how long the backlog will take), then
only the sections that have something to show: queues with a depth sparkline, running jobs
with bar, message and elapsed time, recently finished jobs, chains and batches, schedules,
failed jobs (retry, forget, an expandable error and traceback, retry all), and the kernel's
workers with controls. Where the panel is saved or closed, a static HTML snapshot of its last
state takes its place.

One refresher task on neonnb's background loop reads the store every ``interval`` seconds
and sets a widget trait only when what it shows changed, inside ``hold_sync()``: the kernel
accepts trait changes from that thread (ipykernel >= 6.29), so the panel keeps moving while a
cell runs sync code. Button callbacks only submit work to the loop and return.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .. import _loop, render
from ..codec import shown_payload
from ..config import DEFAULT_DATABASE_URL
from ..errors import MissingExtra
from ..frames import fraction, progress_message
from ..records import JobRecord, QueueCounts, Status, WorkerInfo
from . import KERNEL_LOG

if TYPE_CHECKING:
    from ..manager import QueueManager
    from ..worker import Worker

try:
    import ipywidgets as w
except ImportError as exc:  # pragma: no cover - depends on the install
    raise MissingExtra("the dashboard needs ipywidgets: pip install 'neonnb[notebook]'") from exc

logger = logging.getLogger("neonnb.notebook")

_open: set[Dashboard] = set()  # refreshing now; %unload_ext closes them
REST_PER_REFRESH = 9.0  # seconds of rest per second a refresh took
# ipywidgets' HTML content keeps its text's width: let a failed row's error shrink to the row
# (and end in an ellipsis) instead of pushing its traceback out of sight.
_STYLE = ("<style>.neonnb-failed-job .widget-html-content{min-width:0;overflow:hidden}"
          # Narrow panels: tables scroll sideways, rows wrap, nothing spills past the edge.
          ".neonnb-dashboard{max-width:100%;overflow-x:hidden}"
          ".neonnb-dashboard .widget-html-content{overflow-x:auto;max-width:100%}"
          ".neonnb-running-job,.neonnb-workflow{flex-wrap:wrap}"
          "</style>")


@dataclasses.dataclass
class _Seen:
    """What one refresh read, as plain data: the widgets and the static snapshot show it."""

    counts: dict[str, QueueCounts]
    running: list[tuple[JobRecord, float | None, str | None, float | None]]  # record, done, message, elapsed
    recent: list[JobRecord]
    failed: list[JobRecord]
    flows: list[tuple[str, str, float, str, str]]  # key, label, done share, state text, bar style
    schedules: str
    workers: list[Worker]
    elsewhere: list[WorkerInfo]  # the workers of other processes, as the store knows them
    now: float
    throughput: float | None
    eta: float | None


class Dashboard:
    def __init__(self, manager: QueueManager, *, interval: float | None = 0.5, history: int = 120) -> None:
        self.manager = manager
        self.interval = interval
        self.store = manager.config.describe_store()
        self._web_link = _web_dashboard_link(manager.config.connection)
        self._depths: collections.deque[int] = collections.deque(maxlen=history)
        self._finished: collections.deque[tuple[float, int]] = collections.deque()  # (monotonic, done + failed)
        self._shown: dict[str, Any] = {}  # what each part shows now, to skip unchanged updates
        self._bars: dict[str, tuple[w.HBox, w.FloatProgress, w.Label, w.Label]] = {}
        self._workflow_bars: dict[str, tuple[w.HBox, w.FloatProgress, w.HTML]] = {}
        self._seen: _Seen | None = None
        self._display_ids: list[str] = []
        self._filled: tuple[str, int] | None = None  # what the worker controls were last filled in with
        self._task: Any = None
        self.closed = False

        self.header = _with_class(w.HTML(), "neonnb-summary-view")
        self.queues = _with_class(w.HTML(), "neonnb-queues-view")
        self.sparkline = _with_class(w.HTML(), "neonnb-sparkline-view")
        self.running = _with_class(w.VBox(), "neonnb-running")
        self.recent = _with_class(w.HTML(), "neonnb-recent")
        self.workflows = _with_class(w.VBox(), "neonnb-workflows")
        self.schedules = _with_class(w.HTML(), "neonnb-schedules")
        self.failed = _with_class(w.VBox(), "neonnb-failed")
        self.retry_all = _with_class(w.Button(description="Retry all failed", icon="redo",
                                              layout={"width": "auto", "align_self": "flex-start"}), "neonnb-retry-all")
        self.retry_all.on_click(lambda _: self._submit(self.manager.failed.aretry_all()))
        narrow = {"description_width": "initial"}  # the label as wide as its word, so a narrow panel holds them
        self.queue_name = w.Text(value=manager.config.default_queue, description="queue", style=narrow,
                                 layout={"width": "200px", "max_width": "100%"})
        self.concurrency = w.BoundedIntText(value=manager.config.workers, min=1, max=1000, description="slots",
                                            style=narrow, layout={"width": "130px", "max_width": "100%"})
        self.start_button = _with_class(w.Button(description="Start worker", icon="play"), "neonnb-start")
        self.stop_button = _with_class(w.Button(description="Stop workers", icon="stop"), "neonnb-stop")
        self.start_button.on_click(lambda _: self.start_worker())
        self.stop_button.on_click(lambda _: self.stop_workers())
        # Pause or resume one queue, for every worker on the store (qm.pause / qm.resume).
        self.queue_pick = w.Dropdown(options=[], description="queue", style=narrow,
                                     layout={"width": "200px", "max_width": "100%"})
        self.pause_button = _with_class(w.Button(description="Pause", icon="pause"), "neonnb-pause")
        self.resume_button = _with_class(w.Button(description="Resume", icon="play"), "neonnb-resume")
        self.pause_button.on_click(lambda _: self._steer_queue(self.manager.apause))
        self.resume_button.on_click(lambda _: self._steer_queue(self.manager.aresume))
        self.worker_state = _with_class(w.HTML(), "neonnb-worker-state")
        self.elsewhere = _with_class(w.HTML(), "neonnb-elsewhere")
        self.log = _with_class(w.HTML(), "neonnb-log")

        def section(name: str, title: str, *parts: w.Widget) -> w.VBox:
            return _with_class(w.VBox([w.HTML(render.section_title(title)), *parts]), f"neonnb-section-{name}")

        self.sections = {
            "queues": _with_class(w.VBox([self.queues, self.sparkline, w.HBox(
                [self.queue_pick, self.pause_button, self.resume_button],
                layout={"flex_flow": "row wrap", "max_width": "100%"})]), "neonnb-section-queues"),
            "running": section("running", "running", self.running),
            "recent": section("recent", "recently finished", self.recent),
            "workflows": section("workflows", "chains and batches", self.workflows),
            "schedules": section("schedules", "schedules", self.schedules),
            "failed": section("failed", "failed", self.failed, self.retry_all),
            "elsewhere": section("elsewhere", "workers in other processes", self.elsewhere),
            "log": section("log", "log (neonnb's warnings in this kernel, newest last)", self.log),
        }
        # Wraps onto more lines in a narrow panel instead of running past its edge.
        controls = w.HBox([self.queue_name, self.concurrency, self.start_button, self.stop_button],
                          layout={"flex_flow": "row wrap", "max_width": "100%"})
        self.widget = _with_class(w.VBox([
            w.HTML(_STYLE), self.header, *self.sections.values(),
            section("workers", "workers in this kernel", self.worker_state, controls),
        ], layout={"padding": "4px 8px"}), "neonnb-panel", "neonnb-dashboard")
        self._fill_controls(manager.workers)

    # --- display: the live widget, with a picture of it for saved notebooks ----------------

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        if not self.closed:
            self._refresh_now()  # shown again (a re-run cell, %neonnb status): current at once
        return self._bundle()

    def _bundle(self) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_())
        bundle["text/html"] = self.snapshot()
        bundle["text/plain"] = f"neonnb panel · {self.store}"
        return bundle

    def _ipython_display_(self) -> None:
        """Shown with a display id, so that its picture can follow the work and ``close()``
        can leave it in the panel's place; earlier displays' pictures catch up too."""
        from IPython.display import display

        bundle = self._repr_mimebundle_()
        self._update_pictures(bundle)
        handle = display(bundle, raw=True, display_id=True)  # type: ignore[no-untyped-call]
        if handle is not None:
            self._display_ids.append(handle.display_id)

    def _update_pictures(self, bundle: dict[str, Any]) -> None:
        """Replace what every display of this panel holds (the live widget stays the same
        model): where widgets can't render, the saved picture is the latest one."""
        if not self._display_ids:
            return
        from IPython.display import update_display

        for display_id in self._display_ids:
            update_display(bundle, raw=True, display_id=display_id)  # type: ignore[no-untyped-call]

    def snapshot(self) -> str:
        """Static HTML of what the panel showed last: what GitHub, nbviewer or a notebook
        opened without its kernel show in the panel's place."""
        seen = self._seen
        parts = [render.summary(self.store, 0, None, {}, None) if seen is None else self._summary(seen)]
        if seen is not None:
            if seen.counts:
                parts.append(render.queues_table(seen.counts) + render.sparkline(list(self._depths)))
            if seen.running:
                parts.append(render.section_title("running") + render.running_rows(seen.running))
            if seen.recent:
                parts.append(render.section_title("recently finished") + render.recent_table(seen.recent))
            if seen.flows:
                rows = [[label, render.progress_bar(done), render.Raw(state)]  # state: HTML, escaped where made
                        for _, label, done, state, _ in seen.flows]
                flows = render.table(["", "", ""], rows, "neonnb-flows")
                parts.append(render.section_title("chains and batches") + flows)
            if seen.schedules:
                parts.append(render.section_title("schedules") + seen.schedules)
            if seen.failed:
                parts.append(render.section_title("failed") + "".join(render.failed_detail(r) for r in seen.failed))
            if seen.elsewhere:
                parts.append(render.section_title("workers in other processes")
                             + render.store_workers_table(seen.elsewhere, seen.now))
            if seen.workers:
                parts.append(render.section_title("workers in this kernel") + render.workers_table(seen.workers))
        return render.panel("neonnb", "".join(parts), "neonnb-panel neonnb-snapshot")

    # --- refreshing ---------------------------------------------------------------------

    def start(self) -> Dashboard:
        """Refresh every ``interval`` seconds on the background loop until ``close()``."""
        if self._task is None and self.interval:
            self._task = _loop.submit(self._refresh_forever())
            _open.add(self)
        return self

    def close(self) -> None:
        """Stop refreshing; where the panel was shown, its last snapshot stays."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.closed = True
        _open.discard(self)
        self._update_pictures({"text/html": self.snapshot(), "text/plain": f"neonnb panel · {self.store} (closed)"})
        self.widget.close()

    def _refresh_now(self) -> None:
        try:
            _loop.run_sync(self.refresh())
        except Exception as exc:  # a repr must render even when the store is down
            logger.warning("dashboard refresh failed: %r", exc)

    async def _refresh_forever(self) -> None:
        while self.interval:  # None (set by a later qm.dashboard(interval=None)): refresh by hand
            started = time.monotonic()
            try:
                await self.refresh()
            except Exception as exc:  # the store may be down for a while; keep the panel alive
                logger.warning("dashboard refresh failed: %r", exc)
                error = f"<span style='color:{render.ERROR}'>{render.escape(str(exc))}</span>"
                self._set(self.header, "value", render.summary(self.store, 0, None, {}, None) + error)
            # However large the store, the panel takes at most a tenth of the kernel's time.
            took = time.monotonic() - started
            await asyncio.sleep(max(self.interval or 0, REST_PER_REFRESH * took))
        self._task = None
        _open.discard(self)

    async def refresh(self) -> None:
        """Read the store once and update what changed."""
        seen = await self._read()
        settled = self._seen is not None and _busy(self._seen) and not _busy(seen)
        self._seen = seen
        self._depths.append(sum(c.size for c in seen.counts.values()))
        with self.widget.hold_sync():
            self._set(self.header, "value", self._summary(seen))
            self._set(self.queues, "value", render.queues_table(seen.counts))
            self._set(self.queue_pick, "options", tuple(sorted(seen.counts)))
            self._set(self.sparkline, "value", render.sparkline(list(self._depths)))
            self._show_running(seen.running)
            self._set(self.recent, "value", render.recent_table(seen.recent))
            self._show_workflows(seen.flows)
            self._set(self.schedules, "value", seen.schedules)
            self._show_failed(seen.failed)
            self._set(self.retry_all.layout, "display", None if len(seen.failed) > 1 else "none")
            self._set(self.worker_state, "value", render.workers_table(seen.workers) if seen.workers else "")
            self._set(self.elsewhere, "value", render.store_workers_table(seen.elsewhere, seen.now))
            self._fill_controls(seen.workers)
            log_lines = list(KERNEL_LOG.lines)[-LOG_LINES:]
            self._set(self.log, "value", _log_html(log_lines))
            shown = {"queues": seen.counts, "running": seen.running, "recent": seen.recent,
                     "workflows": seen.flows, "schedules": seen.schedules, "failed": seen.failed,
                     "elsewhere": seen.elsewhere, "log": log_lines}
            for name, box in self.sections.items():
                self._set(box.layout, "display", None if shown[name] else "none")  # empty sections stay out of sight
        if settled:  # the work it shows has ended: what a saved notebook keeps is this
            self._update_pictures(self._bundle())

    async def _read(self) -> _Seen:
        manager = self.manager
        now = manager.clock()
        counts = await manager.astats()
        workers = manager.workers
        # A job whose handler ended waits for its ack (still "running" in the store) while the
        # slot runs the next one: of this kernel's workers, show only what runs now.
        running_here = {wk.id: wk.running_job_ids for wk in workers}
        running = [r for r in await manager.ajobs(Status.RUNNING, limit=40)
                   if r.worker_id not in running_here or r.id in running_here[r.worker_id]][:20]
        finished = await manager.ajobs(Status.SUCCEEDED, limit=8)
        failed = await manager.ajobs(Status.FAILED, limit=20)
        cancelled = await manager.ajobs(Status.CANCELLED, limit=8)
        recent = sorted([*finished, *failed[:8], *cancelled], key=lambda r: r.finished_at or 0, reverse=True)[:8]
        throughput = self._throughput(sum(c.succeeded + c.failed for c in counts.values()))
        waiting = sum(sum(c.waiting.values()) for c in counts.values())
        return _Seen(
            counts=counts,
            running=[(r, fraction(r.progress or {}), progress_message(r.progress or {}),
                      None if r.started_at is None else max(0.0, now - r.started_at)) for r in running],
            recent=recent, failed=failed, flows=await _workflow_states(manager),
            schedules=_schedules_table(manager, now), workers=workers, throughput=throughput, now=now,
            elsewhere=[info for info in await manager.aknown_workers() if info.id not in running_here],
            eta=waiting / throughput if throughput and waiting else None,
        )

    def _throughput(self, finished: int, window: float = 10.0) -> float | None:
        """Jobs finished per second over the last ``window`` seconds of refreshes."""
        now = time.monotonic()
        self._finished.append((now, finished))
        while len(self._finished) > 2 and now - self._finished[1][0] >= window:
            self._finished.popleft()
        then, before = self._finished[0]
        if now - then < 1.0:
            return None
        return max(0, finished - before) / (now - then)  # results expire: never below 0

    def _summary(self, seen: _Seen) -> str:
        busy = sum(1 for wk in seen.workers if wk.is_running)
        return render.summary(self.store, busy, seen.throughput, seen.counts, seen.eta) + self._web_link

    def _set(self, widget: Any, trait: str, value: Any) -> None:
        key = f"{id(widget)}.{trait}"
        if self._shown.get(key) != value:
            self._shown[key] = value
            setattr(widget, trait, value)

    def _show_running(self, rows: list[tuple[JobRecord, float | None, str | None, float | None]]) -> None:
        for record, done, message, elapsed in rows:
            if record.id not in self._bars:
                short_name = record.name.rpartition(".")[2][-24:]
                bar = _with_class(w.FloatProgress(min=0.0, max=1.0, description=short_name,
                                                  tooltip=record.id), "neonnb-progress")
                label, clock = w.Label(), _with_class(w.Label(), "neonnb-elapsed")
                self._bars[record.id] = (_with_class(w.HBox([bar, label, clock]), "neonnb-running-job"),
                                         bar, label, clock)
            _, bar, label, clock = self._bars[record.id]
            self._set(bar, "value", done or 0.0)
            self._set(label, "value", message or "")
            self._set(clock, "value", render.progress_times(done, elapsed, (record.progress or {}).get("done")))
        ids = [record.id for record, *_ in rows]
        for gone in set(self._bars) - set(ids):
            self._bars.pop(gone)[0].close()
        self._set(self.running, "children", tuple(self._bars[i][0] for i in ids))

    def _show_workflows(self, states: list[tuple[str, str, float, str, str]]) -> None:
        """One row per recent chain or batch: a label, a progress bar (red once it failed)
        and its state."""
        for key, label, done, state, style in states:
            if key not in self._workflow_bars:
                bar = _with_class(w.FloatProgress(min=0.0, max=1.0, description=label), "neonnb-workflow-progress")
                text = w.HTML()
                self._workflow_bars[key] = (_with_class(w.HBox([bar, text]), "neonnb-workflow"), bar, text)
            _, bar, text = self._workflow_bars[key]
            self._set(bar, "value", done)
            self._set(bar, "bar_style", style)
            self._set(text, "value", state)  # HTML, escaped where it was made
        self._set(self.workflows, "children", tuple(self._workflow_bars[key][0] for key, *_ in states))

    def _show_failed(self, records: list[JobRecord]) -> None:
        rows = tuple((r.id, render.failed_detail(r, _arguments_text(r.payload))) for r in records)
        if self._shown.get("failed") == rows:
            return
        self._shown["failed"] = rows
        for old in self.failed.children:
            old.close()
        self.failed.children = tuple(self._failed_row(job_id, detail) for job_id, detail in rows)

    def _failed_row(self, job_id: str, detail: str) -> w.HBox:
        fixed = {"width": "70px", "min_width": "70px", "flex": "0 0 auto"}  # a long error never squeezes them
        retry = _with_class(w.Button(description="retry", layout=fixed), "neonnb-retry")
        forget = _with_class(w.Button(description="forget", layout=fixed), "neonnb-forget")
        text = w.HTML(detail, layout={"flex": "1 1 auto", "min_width": "0", "overflow": "hidden"})
        retry.on_click(lambda _: self._submit(self.manager.failed.aretry(job_id)))
        forget.on_click(lambda _: self._submit(self.manager.failed.aforget(job_id)))
        return _with_class(w.HBox([retry, forget, text], layout={"width": "100%"}), "neonnb-failed-job")

    def _steer_queue(self, steer: Callable[[str], Coroutine[Any, Any, None]]) -> None:
        if self.queue_pick.value:
            self._submit(steer(self.queue_pick.value))

    def _submit(self, work: Coroutine[Any, Any, Any]) -> None:
        """From a button: run ``work`` on the loop, then refresh; never block the caller."""
        async def then_refresh() -> None:
            try:
                await work
            finally:
                await self.refresh()

        _loop.submit(then_refresh())

    # --- worker controls ----------------------------------------------------------------

    def _fill_controls(self, workers: list[Worker]) -> None:
        """Start from what the running worker does, unless the user typed something else."""
        running = [wk for wk in workers if wk.is_running]
        if running:
            proposal = (",".join(running[0].queues), running[0].concurrency)
        elif self._seen is not None and len(self._seen.counts) == 1:  # the store's one queue, not "default"
            proposal = (next(iter(self._seen.counts)), self.concurrency.value)
        else:
            return
        if self._filled is None or (self.queue_name.value, self.concurrency.value) == self._filled:
            self._filled = proposal
            self._set(self.queue_name, "value", proposal[0])
            self._set(self.concurrency, "value", proposal[1])

    def start_worker(self) -> Worker:
        queues = [q.strip() for q in self.queue_name.value.split(",") if q.strip()]
        return self.manager.worker(queues or self.manager.config.default_queue, int(self.concurrency.value)).start()

    def stop_workers(self) -> None:
        """Ask every worker of this kernel's manager to stop, however it was started (here,
        ``%neonnb start``, ``qm.worker(...)``); their unfinished jobs go back to the queue."""
        for worker in self.manager.workers:
            worker.request_stop()


def _busy(seen: _Seen) -> bool:
    return any(c.size or c.running for c in seen.counts.values())


def _with_class(widget: Any, *names: str) -> Any:
    for name in names:
        widget.add_class(name)
    return widget


def _schedules_table(manager: QueueManager, now: float) -> str:
    schedules = [s for scheduler in manager.schedulers for s in scheduler.schedules.values()]
    if not schedules:
        return ""
    rows = [[s.name, s.cron or f"every {s.interval:g}s", s.queue, render.when(s.last_tick),
             render.when(s.next_tick(now))] for s in schedules]
    return render.table(["schedule", "rule", "queue", "last run", "next run"], rows, "neonnb-schedules-view")


async def _workflow_states(manager: QueueManager) -> list[tuple[str, str, float, str, str]]:
    """(key, label, finished share, state, bar style) of this kernel's recent chains and batches."""
    from ..workflows import BatchHandle

    states = []
    for flow in list(manager.recent_workflows):
        if isinstance(flow, BatchHandle):
            counts = await flow.acounts()
            share = flow.finished_share(counts)
            states.append((str(id(flow)), f"batch of {len(flow)}", share, render.batch_state(counts, len(flow)),
                           render.batch_bar_style(counts, share == 1)))
        else:
            status = await flow.astatus()
            done = status.steps.count(Status.SUCCEEDED.value)
            style = {"failed": "danger", "cancelled": "danger", "succeeded": "success"}.get(status.state, "")
            states.append((flow.id, f"chain of {flow.length}", done / flow.length, render.escape(str(status)), style))
    return states


def close_all() -> None:
    for dashboard in list(_open):
        dashboard.close()


def _arguments_text(payload: str) -> str:
    """A failed job's arguments as one line of JSON, long values cut, frames by their shape."""
    return json.dumps(shown_payload(payload, items=10, chars=80), ensure_ascii=False, default=str)


def _web_dashboard_link(connection: Any) -> str:
    """A link to the web dashboard Jupyter serves at /neonnb/ (jupyter-server-proxy), when it
    serves this panel's store ($NEONNB_URL, else the SQLite default); else nothing."""
    if importlib.util.find_spec("jupyter_server_proxy") is None:
        return ""
    if os.environ.get("NEONNB_URL", DEFAULT_DATABASE_URL) != connection:
        return ""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")  # /user/<name>/ on a JupyterHub
    href = render.escape(prefix.rstrip("/") + "/neonnb/")
    return f" · <a href='{href}' target='_blank' rel='noopener' class='neonnb-web-link'>web dashboard</a>"


LOG_LINES = 8  # of the kernel's neonnb log, the newest shown in the panel


def _log_html(lines: list[tuple[float, str, str]]) -> str:
    rows = "".join(
        f"<div><span style='color:{render.MUTED}'>{time.strftime('%H:%M:%S', time.localtime(when))} {level}</span> "
        f"{render.escape(message)}</div>" for when, level, message in lines)
    return f"<div style='font-family:monospace;font-size:smaller;overflow-x:auto;white-space:pre'>{rows}</div>"
