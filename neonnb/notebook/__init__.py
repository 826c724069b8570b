"""The notebook layer: ``%load_ext neonnb``, the ``%neonnb`` magics, the dashboard and the
HTML reprs. IPython and ipywidgets are imported only when used."""

from __future__ import annotations

from typing import Any

from .. import render


def _job_bundle(handle: Any) -> dict[str, Any]:
    from .live import job_bundle

    return job_bundle(handle)


def _dashboard(manager: Any, interval: float | None) -> Any:
    from .dashboard import Dashboard

    return Dashboard(manager, interval=interval)


render.VIEWS.update(job_handle=_job_bundle, dashboard=_dashboard)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext neonnb``; loading twice just registers the same magics again."""
    from .magics import NeonnbMagics

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
