"""The notebook layer: ``%load_ext neonnb``, the ``%neonnb`` magics, the dashboard and the
HTML reprs. IPython and ipywidgets are imported only when used."""

from __future__ import annotations

import collections
import logging
from typing import Any

from .. import render
from ..config import printable


def _job_bundle(handle: Any) -> dict[str, Any]:
    from .live import job_bundle

    return job_bundle(handle)


def _dashboard(manager: Any, interval: float | None) -> Any:
    from .dashboard import Dashboard

    return Dashboard(manager, interval=interval)


def _batch_bundle(batch: Any) -> dict[str, Any]:
    from .live import batch_bundle

    return batch_bundle(batch)


render.VIEWS.update(job_handle=_job_bundle, batch_handle=_batch_bundle, dashboard=_dashboard)


class KernelLog(logging.Handler):
    """In a kernel, what neonnb logs (a job failing, a worker's store going away) is kept
    here for the panel's log section, instead of reaching whatever cell runs at that moment
    through Python's last-resort stderr handler. Records still propagate to the user's own
    handlers (``logging.basicConfig`` keeps working)."""

    def __init__(self, keep: int = 50) -> None:
        super().__init__(logging.WARNING)
        self.lines: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append((record.created, record.levelname, printable(record.getMessage())))
        except Exception:  # a broken message must never break the job that logged it
            self.handleError(record)


KERNEL_LOG = KernelLog()


def _in_a_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def install_kernel_log() -> None:
    """Keep neonnb's log lines out of cells (once per process; only inside a kernel)."""
    logger = logging.getLogger("neonnb")
    if _in_a_kernel() and KERNEL_LOG not in logger.handlers:
        logger.addHandler(KERNEL_LOG)


install_kernel_log()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext neonnb``; loading twice just registers the same magics again."""
    from .magics import NeonnbMagics

    install_kernel_log()
    ipython.register_magics(NeonnbMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext neonnb``: close the dashboards, stop the magics' workers and manager, and
    stop the background loop (the next neonnb call starts a fresh one)."""
    from .. import _loop
    from .dashboard import close_all
    from .magics import NeonnbMagics

    close_all()
    magics = ipython.magics_manager.registry.get(NeonnbMagics.__name__)
    if magics is not None and magics.manager is not None:
        magics.manager.close()
        magics.manager = None
    _loop.shutdown()
