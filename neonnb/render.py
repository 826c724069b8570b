"""HTML for the rich reprs and the dashboard: plain functions of plain data, so they can be
tested without a kernel. Colours come from JupyterLab's theme variables (with fallbacks),
so the output reads well in light and dark themes. CSS classes start with ``neonnb-``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from html import escape
from typing import Any

from .records import QueueCounts

# The notebook layer's live views (the dashboard, a running job's bar), which the objects
# below offer without importing upward: neonnb.notebook puts them here when it is imported,
# as neonnb's own __init__ does.
VIEWS: dict[str, Callable[..., Any]] = {}

FG = "var(--jp-ui-font-color1, #222)"
MUTED = "var(--jp-ui-font-color2, #666)"
BORDER = "var(--jp-border-color2, #ddd)"
ACCENT = "var(--jp-brand-color1, #1976d2)"
ERROR = "var(--jp-error-color1, #d32f2f)"
__all__ = ["ACCENT", "BORDER", "ERROR", "FG", "MUTED", "SUCCESS", "Raw", "duration", "escape", "failed_detail",
           "job_id", "panel", "progress_bar", "queues_table", "recent_table", "running_rows", "section_title",
           "sparkline", "status_badge", "summary", "table", "when", "workers_table"]

SUCCESS = "var(--jp-success-color1, #388e3c)"
STATUS_COLOURS = {
    "queued": MUTED, "running": ACCENT, "succeeded": SUCCESS, "failed": ERROR,
    "cancelled": "var(--jp-warn-color1, #f57c00)", "expired": MUTED, "stopping": "var(--jp-warn-color1, #f57c00)",
    "stopped": MUTED,
}


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], css: str) -> str:
    cell = f"padding:2px 8px;border-bottom:1px solid {BORDER};text-align:left"
    head = "".join(f"<th style='{cell}'>{escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='{cell}'>{value if isinstance(value, Raw) else escape(str(value))}</td>"
                         for value in row) + "</tr>"
        for row in rows
    )
    return f"<table class='{css}' style='border-collapse:collapse;color:{FG}'><tr>{head}</tr>{body}</table>"


class Raw(str):
    """Markup that ``table`` must not escape."""


def status_badge(status: str) -> Raw:
    colour = STATUS_COLOURS.get(status, MUTED)
    return Raw(f"<span class='neonnb-status neonnb-status-{escape(status)}' style='color:{colour}'>"
               f"{escape(status)}</span>")


def progress_bar(fraction: float | None, message: str | None = None) -> Raw:
    percent = 0.0 if fraction is None else fraction * 100
    label = f"{percent:.0f}%" + (f" {escape(message)}" if message else "")
    return Raw(
        f"<span class='neonnb-progress' data-percent='{percent:.0f}' style='display:inline-block;width:120px;"
        f"height:8px;background:{BORDER};vertical-align:middle'><span style='display:block;height:8px;"
        f"width:{percent:.1f}%;background:{ACCENT}'></span></span> <span style='color:{MUTED}'>{label}</span>"
    )


def queue_rows(counts: dict[str, QueueCounts]) -> list[list[Any]]:
    return [[_queue_label(queue, c), c.waiting["high"], c.waiting["normal"], c.waiting["low"],
             c.delayed, c.running, c.succeeded, c.failed] for queue, c in sorted(counts.items())]


def _queue_label(queue: str, counts: QueueCounts) -> str:
    """The queue's name, with what holds it back: "emails (paused, at most 100/m)"."""
    state = queue_state(counts)
    return queue if state == "active" else f"{queue} ({state})"


def queue_state(counts: QueueCounts) -> str:
    """"active", or what holds the queue back: "paused, at most 100/m, at most 5 at once"."""
    notes = [note for note in ("paused" if counts.paused else "", f"at most {counts.rate}" if counts.rate else "",
                               f"at most {counts.concurrency} at once" if counts.concurrency else "") if note]
    return ", ".join(notes) or "active"


QUEUE_HEADERS = ["queue", "high", "normal", "low", "delayed", "running", "succeeded", "failed"]


def queues_table(counts: dict[str, QueueCounts]) -> str:
    if not counts:
        return f"<div class='neonnb-queues' style='color:{MUTED}'>no jobs yet</div>"
    return table(QUEUE_HEADERS, queue_rows(counts), "neonnb-queues")


def sparkline(values: Sequence[int], width: int = 240, height: int = 36) -> str:
    """Queue depth over time as an inline SVG polyline."""
    if len(values) < 2:
        return f"<svg class='neonnb-sparkline' width='{width}' height='{height}'></svg>"
    top = max(max(values), 1)
    step = width / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values))
    return (f"<svg class='neonnb-sparkline' width='{width}' height='{height}' data-last='{values[-1]}'>"
            f"<polyline fill='none' stroke='{ACCENT}' stroke-width='1.5' points='{points}'/></svg>"
            f"<span style='color:{MUTED};font-size:smaller'> depth now {values[-1]}, peak {max(values)}</span>")


def when(moment: dt.datetime | float | None) -> str:
    if moment is None:
        return ""
    if not isinstance(moment, dt.datetime):
        moment = dt.datetime.fromtimestamp(moment, dt.timezone.utc)
    return moment.astimezone().strftime("%H:%M:%S")


def panel(title: str, body: str, css: str = "neonnb-panel") -> str:
    return (f"<div class='{css}' style='border:1px solid {BORDER};padding:6px 10px;color:{FG};display:inline-block'>"
            f"<div style='font-weight:bold;margin-bottom:4px'>{escape(title)}</div>{body}</div>")


def job_id(full: str, keep: int = 8) -> Raw:
    """The id's last ``keep`` characters (where ids of jobs made together differ), the whole
    id on hover, and the whole id copied by a click-and-copy: the rest is there, zero-sized."""
    hidden, shown = full[:-keep], full[-keep:]
    return Raw(f"<code class='neonnb-id' title='{escape(full)}' style='user-select:all'>"
               f"<span style='font-size:0'>{escape(hidden)}</span>{escape(shown)}</code>")


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 90:
        return f"{minutes} min {secs} s" if minutes < 10 and secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def segments(shares: Sequence[tuple[float, str]], width: int = 80) -> str:
    """A small bar of coloured parts in proportion (a batch: done, failed, running)."""
    parts = "".join(f"<span style='display:inline-block;height:8px;width:{max(0.0, share) * width:.1f}px;"
                    f"background:{colour}'></span>" for share, colour in shares if share > 0)
    return (f"<span class='neonnb-segments' style='display:inline-block;width:{width}px;height:8px;"
            f"border:1px solid {BORDER};vertical-align:middle;line-height:0'>{parts}</span>")


def batch_state(counts: dict[str, int], size: int, label: str = "") -> str:
    """A batch's parts in proportion (green done, red failed, blue running), then ``label``
    and the counts in words."""
    shares = [(counts[what] / max(size, 1), colour) for what, colour in
              (("done", SUCCESS), ("failed", ERROR), ("running", ACCENT))]
    words = ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "empty"
    return f"{segments(shares)} {escape(label + words)}"


def batch_bar_style(counts: dict[str, int], finished: bool) -> str:
    """Red only when nothing succeeded: 3 failures in 50 are a yellow batch, not a red one."""
    failed, done = counts.get("failed", 0), counts.get("done", 0)
    return "danger" if failed and not done else "warning" if failed else "success" if finished else ""


def progress_times(fraction: float | None, elapsed: float | None, steps: Any = None) -> str:
    """A running job's share, time and pace, as tqdm puts it: ``42% · 1.2 s < 1.7 s · 3.4/s``
    (elapsed < left, steps a second); only what is known."""
    parts = []
    if fraction is not None:
        parts.append(f"{fraction:.0%}")
    if elapsed is not None and elapsed >= 0:
        left = elapsed * (1 - fraction) / fraction if fraction and 0 < fraction < 1 else None
        parts.append(duration(elapsed) + ("" if left is None else f" < {duration(left)}"))
        if isinstance(steps, int | float) and not isinstance(steps, bool) and steps > 0 and elapsed > 0:
            parts.append(f"{steps / elapsed:.1f}/s")
    return " · ".join(parts)


def summary(store: str, workers: int, throughput: float | None, counts: dict[str, QueueCounts],
            eta: float | None) -> str:
    """The card's one line: where, how many workers, how fast, how much of each, how long."""
    queued = sum(sum(c.waiting.values()) + c.delayed for c in counts.values())
    running = sum(c.running for c in counts.values())
    done = sum(c.succeeded for c in counts.values())
    failed = sum(c.failed for c in counts.values())
    parts = [f"<b>{escape(store)}</b>", f"{workers} worker{'s' if workers != 1 else ''} in this kernel"]
    if throughput is not None:
        parts.append(f"{throughput:,.1f} jobs/s")
    parts += [f"<span class='neonnb-count-queued'>{queued:,} queued</span>",
              f"<span class='neonnb-count-running' style='color:{ACCENT}'>{running:,} running</span>",
              f"<span class='neonnb-count-done' style='color:{SUCCESS}'>{done:,} done</span>",
              f"<span class='neonnb-count-failed' style='color:{ERROR if failed else FG}'>{failed:,} failed</span>"]
    if eta is not None:
        parts.append(f"backlog clear in about {duration(eta)}")
    card = (f"color:{FG};background:var(--jp-layout-color2, #f5f5f5);border:1px solid {BORDER};"
            "border-radius:4px;padding:6px 10px;margin-bottom:4px")
    return f"<div class='neonnb-summary' style='{card}'><b>neonnb</b> · {' · '.join(parts)}</div>"


def section_title(text: str) -> str:
    return f"<div style='font-weight:bold;margin:8px 0 2px;color:{FG}'>{escape(text)}</div>"


def recent_table(records: Sequence[Any]) -> str:
    """Finished jobs, newest first: status in its colour, how long each took. Jobs in a row of
    the same name, queue and outcome fold into one line, "x N", the newest's time and id."""
    groups: list[list[Any]] = []
    for r in records:
        if groups and (groups[-1][0].name, groups[-1][0].queue, groups[-1][0].status) == (r.name, r.queue, r.status):
            groups[-1].append(r)
        else:
            groups.append([r])
    rows = [[status_badge(g[0].status.value), g[0].name.rpartition(".")[2] + (f" x {len(g)}" if len(g) > 1 else ""),
             g[0].queue, duration(None if g[0].started_at is None or g[0].finished_at is None
                                  else g[0].finished_at - g[0].started_at),
             when(g[0].finished_at), job_id(g[0].id)] for g in groups]
    return table(["", "job", "queue", "took", "finished", "id"], rows, "neonnb-recent-view")


def failed_detail(record: Any, arguments: str = "") -> str:
    """One failed job: a line that says what, with which ``arguments`` (shortened) and why, its
    full error and traceback folded."""
    error = record.error or {}
    message = str(error.get("message") or "")
    first = message.splitlines()[0] if message else ""
    if len(first) > 120:
        first = first[:119] + "…"
    short = arguments if len(arguments) <= 60 else arguments[:59] + "…"
    head = (f"{job_id(record.id)} {escape(record.name.rpartition('.')[2])}({escape(short)}) · "
            f"{record.attempts} attempt(s) · "
            f"<span style='color:{ERROR}'>{escape(str(error.get('type')))}: {escape(first)}</span>")
    body = escape((f"arguments: {arguments}\n\n" if arguments else "") + message
                  + ("\n\n" + str(error["traceback"]) if error.get("traceback") else ""))
    return (f"<details class='neonnb-failed-detail' style='color:{FG}'><summary style='cursor:pointer;"
            f"white-space:nowrap;overflow:hidden;text-overflow:ellipsis'>{head}</summary>"
            f"<pre style='white-space:pre-wrap;max-height:16em;overflow:auto;font-size:smaller;margin:2px 0'>{body}"
            f"</pre></details>")


def workers_table(workers: Sequence[Any]) -> str:
    """The kernel's workers, their state in words."""
    rows = [[", ".join(wk.queues), wk.concurrency, status_badge(wk.state),
             f"{len(wk.running_job_ids)} of {wk.concurrency} busy", f"{wk.jobs_started:,}"] for wk in workers]
    return table(["queues", "slots", "state", "now", "jobs started"], rows, "neonnb-workers")


def store_workers_table(infos: Sequence[Any], now: float) -> str:
    """Workers of other processes, as the store knows them (``WorkerInfo``)."""
    rows = [[f"{info.host}:{info.pid}", ", ".join(info.queues), status_badge(info.state(now)),
             f"{len(info.running)} of {info.concurrency} busy", f"{info.jobs_done:,}", f"{info.jobs_failed:,}",
             f"{duration(max(now - info.last_seen, 0.0))} ago"] for info in infos]
    return table(["host:pid", "queues", "state", "now", "done", "failed", "seen"], rows, "neonnb-store-workers")


def running_rows(rows: Sequence[tuple[Any, float | None, str | None, float | None]]) -> str:
    """For the snapshot: (record, fraction, message, elapsed) as static bars."""
    body = [[r.name.rpartition(".")[2], progress_bar(done, message), duration(elapsed), job_id(r.id)]
            for r, done, message, elapsed in rows]
    return table(["job", "progress", "running for", "id"], body, "neonnb-running-view")
