"""Inside Jupyter: with jupyter-server-proxy, a Jupyter server serves the dashboard at
/neonnb/, launching `neonnb dashboard` on first use; writes go through it (the proxy adds
the dashboard's token), while the dashboard's own port refuses them without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from neonnb import Config, QueueManager, Status
from tests import jobs
from tests.conftest import wait_until
from tests.services import answers, free_port


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:  # a redirect to the login page stays one
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def request(url: str, method: str = "GET") -> tuple[int, str]:
    try:
        with _OPENER.open(urllib.request.Request(url, method=method), timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError:  # not listening yet
        return 0, ""


def test_jupyter_serves_the_dashboard_at_neonnb(tmp_path: Path) -> None:
    pytest.importorskip("jupyter_server_proxy")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with QueueManager(Config.for_url(url, max_retries=0)) as qm:
        handle = qm.dispatch("q", jobs.Permanent())
        qm.worker("q", 1).run_once()
        port, token = free_port(), os.urandom(8).hex()
        log = (tmp_path / "jupyter.log").open("w")
        jupyter = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "server", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}"],
            stdout=log, stderr=log, env={**os.environ, "NEONNB_URL": url}, cwd=tmp_path)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: answers(f"{base}/api/status?token={token}"), timeout=60, what="Jupyter to listen")
            status, body = request(f"{base}/neonnb/api/failed?token={token}")
            assert status == 200, body
            assert json.loads(body)["total"] == 1
            status, page = request(f"{base}/neonnb/?token={token}")
            assert status == 200 and "<title>neonnb</title>" in page
            assert request(f"{base}/neonnb/api/queues")[0] in (302, 401, 403), "Jupyter's own login still applies"
            status, body = request(f"{base}/neonnb/api/failed/{handle.id}/retry?token={token}", "POST")
            assert status == 200, body
            assert handle.status is Status.QUEUED
        finally:
            jupyter.terminate()
            jupyter.wait(timeout=20)
            log.close()
