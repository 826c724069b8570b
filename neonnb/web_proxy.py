"""The jupyter-server-proxy entry point: in JupyterLab or JupyterHub the dashboard opens at
``/neonnb/`` (and in the launcher), without a port of its own (``pip install 'neonnb[jupyter]'``).

It serves the store ``$NEONNB_URL`` names (default: the embedded SQLite file). The dashboard
listens on a unix socket in a folder only Jupyter's user can open (the proxy makes it), not on
a port, so Jupyter's login is the one way in: no other user of the machine, and no page that
rebinds a DNS name, can reach it. The proxy forwards the browser's cookies, so a write (retry,
forget, purge) must also echo the page's CSRF cookie in a header, which a page of another
origin can't read (see neonnb.web). Imports nothing heavy: Jupyter loads it at start.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .config import DEFAULT_DATABASE_URL


def server() -> dict[str, Any]:
    return {
        "command": [sys.executable, "-m", "neonnb", "dashboard", os.environ.get("NEONNB_URL", DEFAULT_DATABASE_URL),
                    "--unix-socket", "{unix_socket}"],
        "unix_socket": True,
        "timeout": 30,
        "launcher_entry": {"title": "neonnb"},
    }
