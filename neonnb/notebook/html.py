"""HTML for the rich reprs and the dashboard: plain functions of plain data, so they can be
tested without a kernel. Colours come from JupyterLab's theme variables (with fallbacks),
so the output reads well in light and dark themes. CSS classes start with ``neonnb-``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from ..drivers.base import QueueCounts

FG = "var(--jp-ui-font-color1, #222)"
MUTED = "var(--jp-ui-font-color2, #666)"
BORDER = "var(--jp-border-color2, #ddd)"
ACCENT = "var(--jp-brand-color1, #1976d2)"
ERROR = "var(--jp-error-color1, #d32f2f)"
__all__ = ["ACCENT", "BORDER", "ERROR", "FG", "MUTED", "Raw", "escape", "panel", "progress_bar", "queues_table",
           "sparkline", "status_badge", "table", "when"]

STATUS_COLOURS = {
    "queued": MUTED, "running": ACCENT, "succeeded": "var(--jp-success-color1, #388e3c)", "failed": ERROR,
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
    return [[queue, c.waiting["high"], c.waiting["normal"], c.waiting["low"], c.delayed, c.running, c.succeeded,
             c.failed] for queue, c in sorted(counts.items())]


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
