"""The jupyter-server-proxy entry point: in JupyterLab or JupyterHub the dashboard opens at
``/neonnb/`` (and in the launcher), without a port of its own (``pip install 'neonnb[jupyter]'``).

It serves the store ``$NEONNB_URL`` names (default: the embedded SQLite file). Jupyter has
already authenticated the user, so the proxy adds the dashboard's token, made anew for each
launch, to every request it forwards; a process on the machine that goes to the dashboard's
port directly can read but not write. Imports nothing heavy: Jupyter loads it at start.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from .config import DEFAULT_DATABASE_URL


def server() -> dict[str, Any]:
    token = secrets.token_urlsafe(24)
    return {
        "command": [sys.executable, "-m", "neonnb", "dashboard", os.environ.get("NEONNB_URL", DEFAULT_DATABASE_URL),
                    "--port", "{port}"],
        "environment": {"NEONNB_DASHBOARD_TOKEN": token},
        "request_headers_override": {"Authorization": f"Bearer {token}"},
        "timeout": 30,
        "launcher_entry": {"title": "neonnb"},
    }
