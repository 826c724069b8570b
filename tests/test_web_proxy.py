"""Inside Jupyter: with jupyter-server-proxy, a Jupyter server serves the dashboard at
/neonnb/, launching `neonnb dashboard --unix-socket` on first use. Jupyter's login is the one
way in (the dashboard has no TCP port), and a write must echo the page's CSRF cookie in a
header, so a page of another origin (another port of the same host, or another site) that a
logged-in user opens can't retry, purge or forget anything."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from neonnb import Config, QueueManager, Status
from tests import jobs
from tests.conftest import wait_until
from tests.services import answers, free_port, unavailable

CHROMIUM = "/usr/bin/chromium"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:  # a redirect to the login page stays one
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Status, body and the Set-Cookie headers."""
    try:
        with _OPENER.open(urllib.request.Request(url, method=method, headers=headers or {}), timeout=30) as answer:
            return answer.status, answer.read().decode(), "; ".join(answer.headers.get_all("Set-Cookie") or [])
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), ""
    except urllib.error.URLError:  # not listening yet
        return 0, "", ""


@contextlib.contextmanager
def jupyter_server(tmp_path: Path, store_url: str, *options: str, login: bool = True) -> Iterator[tuple[str, str]]:
    """A Jupyter server with the neonnb proxy entry: its base URL and login token ("": no login)."""
    pytest.importorskip("jupyter_server_proxy")
    port, token = free_port(), os.urandom(8).hex() if login else ""
    log = (tmp_path / "jupyter.log").open("w")
    jupyter = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "server", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", *options],
        stdout=log, stderr=log, env={**os.environ, "NEONNB_URL": store_url}, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(f"{base}/api/status?token={token}"), timeout=60, what="Jupyter to listen")
        yield base, token
    finally:
        jupyter.terminate()
        jupyter.wait(timeout=20)
        log.close()


def _listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    return inodes


def _dashboard_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"dashboard" in argv and b"--unix-socket" in argv:
                    pids.append(int(entry.name))
    return pids


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    return inodes


def test_jupyter_serves_the_dashboard_at_neonnb_on_a_socket_and_writes_need_the_page(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with QueueManager(Config.for_url(url, max_retries=0)) as qm, jupyter_server(tmp_path, url) as (base, token):
        handle = qm.dispatch("q", jobs.Permanent())
        qm.worker("q", 1).run_once()
        status, body, _ = request(f"{base}/neonnb/api/failed?token={token}")
        assert status == 200, body
        assert json.loads(body)["total"] == 1
        status, page, cookies = request(f"{base}/neonnb/?token={token}")
        assert status == 200 and "<title>neonnb</title>" in page
        assert request(f"{base}/neonnb/api/queues")[0] in (302, 401, 403), "Jupyter's own login still applies"
        pids = _dashboard_pids()
        assert pids, "the proxy started `neonnb dashboard --unix-socket`"
        assert not set().union(*map(_socket_inodes, pids)) & _listening_tcp_inodes(), "no TCP port of its own"

        retry = f"{base}/neonnb/api/failed/{handle.id}/retry?token={token}"
        status, body, _ = request(retry, "POST")  # what a forged form sends: Jupyter's login, no CSRF header
        assert status == 403 and "x-neonnb-csrf" in json.loads(body)["error"]
        assert handle.status is Status.FAILED
        csrf = cookies.partition("neonnb_csrf=")[2].partition(";")[0]
        assert csrf, cookies
        status, body, _ = request(retry, "POST", {"Cookie": f"neonnb_csrf={csrf}", "X-Neonnb-CSRF": "forged"})
        assert status == 403 and handle.status is Status.FAILED
        status, body, _ = request(retry, "POST", {"Cookie": f"neonnb_csrf={csrf}", "X-Neonnb-CSRF": csrf})
        assert status == 200, body
        assert handle.status is Status.QUEUED


_ATTACK = """<!doctype html><html><body>
<form id="retry" method="post" action="{target}/api/failed/retry-all" target="f1"></form>
<form id="purge" method="post" action="{target}/api/queues/waiting/purge" target="f2"></form>
<iframe name="f1"></iframe><iframe name="f2"></iframe>
<script>
document.getElementById("retry").submit();
document.getElementById("purge").submit();
const done = [];
for (const [method, path] of [["POST", "/api/failed/retry-all"], ["POST", "/api/queues/waiting/purge"],
                              ["DELETE", "/api/failed/{forget}"]]) {{
  done.push(fetch("{target}" + path, {{method, credentials: "include", mode: "no-cors"}}).catch(() => null));
  done.push(fetch("{target}" + path, {{method, credentials: "include",
                                       headers: {{"X-Neonnb-CSRF": "guess"}}}}).catch(() => null));
}}
Promise.all(done).then(() => {{ document.title = "attacked"; }});
</script></body></html>"""


@contextlib.contextmanager
def attacker_site(html: str) -> Iterator[int]:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_pages_of_another_port_or_site_cant_write_through_the_proxy_but_the_dashboard_can(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    # Jupyter's own checks off (its XSRF and Origin checks, and the login that today's Jupyter
    # refuses to take from a cookie on a foreign POST): not every Jupyter in use has them, and
    # jupyter-server-proxy leaves XSRF to the proxied app. The dashboard must hold by itself.
    lenient = ("--ServerApp.disable_check_xsrf=True", "--ServerApp.allow_origin=*")
    with QueueManager(Config.for_url(url, max_retries=0)) as qm, \
            jupyter_server(tmp_path, url, *lenient, login=False) as (base, token):
        failed = [qm.dispatch("q", jobs.Permanent()) for _ in range(3)]
        worker = qm.worker("q", 1)
        assert sum(worker.run_once() for _ in range(3)) == 3
        for _ in range(4):
            qm.dispatch("waiting", jobs.Permanent())

        def unchanged() -> None:
            assert (qm.failed.total(), qm.size("waiting")) == (3, 4)
            assert all(h.status is Status.FAILED for h in failed)

        with attacker_site(_ATTACK.format(target=f"{base}/neonnb", forget=failed[0].id)) as attacker, \
                playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--host-resolver-rules=MAP evil.test 127.0.0.1"])
            page = browser.new_page()
            page.goto(f"{base}/neonnb/?token={token}")  # logs in to Jupyter: its cookie is in the browser now
            page.wait_for_selector(f"#failed td[data-job-id='{failed[0].id}']")
            assert not page.is_visible("#token"), "behind the proxy there is no token to give"
            for site in (f"http://127.0.0.1:{attacker}/", f"http://evil.test:{attacker}/"):  # same-site, cross-site
                other = browser.new_page()
                other.goto(site)
                other.wait_for_function("document.title === 'attacked'", timeout=15000)
                other.wait_for_timeout(500)  # the form posts land in their frames
                unchanged()
                other.close()
            page.locator(f"#failed td[data-job-id='{failed[0].id}'] ~ td button[data-action='retry']").click()
            wait_until(lambda: failed[0].status is Status.QUEUED, timeout=10, what="the page's own Retry")
            assert qm.failed.total() == 2
            browser.close()
