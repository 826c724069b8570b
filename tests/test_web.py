"""The web dashboard's JSON API and /metrics (neonnb.web), on every store another process can
reach, through Starlette's test client; its auth rules; and `neonnb dashboard` served by uvicorn."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from neonnb import Config, QueueManager, Status
from neonnb.web import create_app
from tests import jobs
from tests.conftest import DRIVERS, wait_until
from tests.services import answers, free_port

MakeManager = Callable[..., QueueManager]
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t0ken-for-tests"
WRITE = {"Authorization": f"Bearer {TOKEN}"}
LOCAL = ("127.0.0.1", 50000)
HERE = "http://127.0.0.1:8765"  # the Host a browser on this machine sends


# Every store another process can reach (an in-memory one lives in its process alone).
REACHABLE = pytest.mark.parametrize("make_manager", [d for d in DRIVERS if d != "memory"], indirect=True)


@pytest.fixture
def qm(make_manager: MakeManager) -> QueueManager:
    return make_manager(max_retries=0)


@REACHABLE
def test_the_api_lists_shows_retries_forgets_and_cancels(qm: QueueManager) -> None:
    ok = qm.dispatch("web", jobs.Note("fine"))
    bad = [qm.dispatch("web", jobs.Permanent()) for _ in range(3)]
    qm.worker("web", 4).run_once()
    waiting = qm.dispatch("web", jobs.Note("later"))
    with TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE) as client:
        queues = client.get("/api/queues").json()
        assert (queues["web"]["succeeded"], queues["web"]["failed"], queues["web"]["size"]) == (1, 3, 1)
        assert [j["id"] for j in client.get("/api/jobs", params={"status": "queued"}).json()["jobs"]] == [waiting.id]
        assert client.get(f"/api/jobs/{ok.id}").json()["result"] == '"fine"'
        assert client.get("/api/jobs/nope").status_code == 404

        page = client.get("/api/failed", params={"limit": 2, "offset": 0}).json()
        assert page["total"] == 3 and len(page["jobs"]) == 2
        assert page["jobs"][0]["error_type"] == "ValueError" and "failed_at" in page["jobs"][0]
        assert client.get("/api/failed", params={"limit": 0}).status_code == 400

        retried = client.post(f"/api/failed/{bad[0].id}/retry", headers=WRITE)
        assert retried.json() == {"message": "Job queued for retry"} and bad[0].status is Status.QUEUED
        assert client.post("/api/failed/nope/retry", headers=WRITE).status_code == 404
        assert client.delete(f"/api/failed/{bad[1].id}", headers=WRITE).json() == {"message": "Job forgotten"}
        assert client.delete(f"/api/failed/{bad[1].id}", headers=WRITE).status_code == 404
        assert client.post("/api/failed/retry-all", headers=WRITE).json() == {"retried": 1}

        assert client.post(f"/api/jobs/{waiting.id}/cancel", headers=WRITE).json() == {"was": "queued"}
        assert client.post(f"/api/jobs/{waiting.id}/cancel", headers=WRITE).status_code == 409
        assert client.get("/api/jobs", params={"status": "done"}).status_code == 400

        first = client.get("/api/jobs", params={"queue": "web", "limit": 2}).json()
        rest = client.get("/api/jobs", params={"queue": "web", "limit": 10, "cursor": first["cursor"]}).json()
        listed = [j["id"] for j in first["jobs"] + rest["jobs"]]
        assert listed == [waiting.id, bad[2].id, bad[0].id, ok.id], "newest first (bad[1] was forgotten)"
        assert rest["cursor"] is None
        assert client.get("/api/jobs", params={"cursor": "nonsense"}).status_code == 400

        qm.dispatch_batch("doomed", [jobs.Note("x") for _ in range(3)])
        qm.dispatch_after("doomed", jobs.Note("later"), 3600)
        assert client.post("/api/queues/doomed/purge").status_code == 403, "a write without the token"
        assert client.post("/api/queues/doomed/purge", headers=WRITE).json() == {"purged": 4}
        assert qm.size("doomed") == 0 and qm.size("web") == 2, "the other queues keep theirs"

        assert client.post("/api/queues/web/pause").status_code == 403, "a write without the token"
        assert client.post("/api/queues/web/pause", headers=WRITE).json() == {"queue": "web", "paused": True}
        assert client.get("/api/queues").json()["web"]["paused"] is True
        assert client.post("/api/queues/web/resume", headers=WRITE).json() == {"queue": "web", "paused": False}
        assert client.get("/api/queues").json()["web"]["paused"] is False
        assert client.post("/api/queues/bad%00name/pause", headers=WRITE).status_code == 400
        assert client.post("/api/queues/web/limit", json={"rate": "100/m"}, headers=WRITE).json() == {
            "queue": "web", "rate": "100/m"}
        assert client.get("/api/queues").json()["web"]["rate"] == "100/m"
        for bad in ({"rate": "fast"}, {"rate": 5}, ["100/m"]):
            answer = client.post("/api/queues/web/limit", json=bad, headers=WRITE)
            assert answer.status_code == 400 and "error" in answer.json(), bad
        assert client.post("/api/queues/web/limit", json={"rate": None}, headers=WRITE).json()["rate"] is None
        assert client.post("/api/queues/web/limit", json={"concurrency": 3}, headers=WRITE).json()["concurrency"] == 3
        assert client.post("/api/queues/web/limit", json={"concurrency": 0}, headers=WRITE).status_code == 400
        assert client.post("/api/queues/web/limit", json={}, headers=WRITE).status_code == 400


@REACHABLE
def test_metrics_parse_with_prometheus_clients_own_parser(qm: QueueManager) -> None:
    qm.dispatch("web", jobs.Permanent())
    queued = qm.dispatch("web", jobs.Note("queued"))
    qm.worker("web", 1).run_once()
    worker = qm.worker("web", 1).start()
    try:
        assert queued.result(timeout=30) == "queued"  # before the first scrape: not counted
        with TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE) as client:
            wait_until(lambda: client.get("/api/workers").json()["workers"] != [], what="the worker to register")
            text = client.get("/metrics").text  # the first scrape: jobs that end from now on are counted
            families = {f.name: f for f in text_string_to_metric_families(text)}
            jobs_by_state = {(s.labels["queue"], s.labels["state"]): s.value for s in families["neonnb_jobs"].samples}
            assert jobs_by_state[("web", "failed")] == 1
            assert [s.value for s in families["neonnb_queue_paused"].samples if s.labels["queue"] == "web"] == [0]
            workers = {s.labels["state"]: s.value for s in families["neonnb_workers"].samples}
            assert workers["running"] == 1 and workers["lost"] == 0
            assert [s.value for s in families["neonnb_jobs_finished"].samples] == []

            ended = [qm.dispatch("web", jobs.Note("counted")), qm.dispatch("web", jobs.Permanent())]
            for handle in ended:
                wait_until(lambda h=handle: h.status in (Status.SUCCEEDED, Status.FAILED), what="the job to end")

            def finished() -> dict[tuple[str, str], float]:
                families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
                counted = {(s.labels["queue"], s.labels["outcome"]): s.value
                           for s in families["neonnb_jobs_finished"].samples if s.name.endswith("_total")}
                durations = {s.name: s.value for s in families["neonnb_job_duration_seconds"].samples
                             if s.labels.get("queue") == "web" and s.name.endswith(("_count", "_sum"))}
                counted[("web", "durations")] = durations.get("neonnb_job_duration_seconds_count", 0)
                return counted

            wait_until(lambda: finished() == {("web", "succeeded"): 1, ("web", "failed"): 1, ("web", "durations"): 2},
                       what="the ended jobs counted by outcome, with their durations")
            history = client.get("/api/history").json()  # the page's last hour, from the same events
            assert len(history["minute_starts"]) == 60 and history["since"] <= qm.clock()
            web = history["queues"]["web"]
            assert (sum(web["ended"]), sum(web["failed"])) == (2, 1) and web["ended"][-1] + web["ended"][-2] == 2
    finally:
        worker.stop()


def test_a_store_that_is_down_answers_503_with_what_is_wrong_and_no_password() -> None:
    with QueueManager(Config.for_url("redis://:s3cret-pw@127.0.0.1:1/0")) as qm:
        client = TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE)
        for method, path in [("GET", "/api/queues"), ("GET", "/api/jobs"), ("GET", "/api/failed"),
                             ("GET", "/api/workers"), ("GET", "/api/schedules"), ("GET", "/metrics"),
                             ("POST", "/api/failed/retry-all"), ("POST", "/api/queues/q/purge")]:
            answer = client.request(method, path, headers=WRITE)
            assert answer.status_code == 503, (path, answer.text)
            assert "can't be reached" in answer.json()["error"] and "s3cret-pw" not in answer.text, path


def test_auth_off_loopback_writes_and_read_only() -> None:
    with QueueManager(Config(driver="memory")) as qm:
        handle = qm.dispatch("web", jobs.Permanent())
        qm.worker("web", 1).run_once()
        away = TestClient(create_app(qm, token=TOKEN, allowed_hosts=("dash.example",)), client=("203.0.113.9", 40000),
                          base_url="http://dash.example")
        assert away.get("/api/queues").status_code == 401
        assert away.get("/api/queues", headers=WRITE).status_code == 200
        assert away.get("/api/queues", headers={"Authorization": "Bearer wrong"}).status_code == 401
        local = TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE)
        assert local.get("/api/queues").status_code == 200
        assert local.post(f"/api/failed/{handle.id}/retry").status_code == 403, "a write without the token"
        read_only = TestClient(create_app(qm, token=TOKEN, read_only=True), client=LOCAL, base_url=HERE)
        assert read_only.post(f"/api/failed/{handle.id}/retry", headers=WRITE).status_code == 403
        assert read_only.delete(f"/api/failed/{handle.id}", headers=WRITE).status_code == 403
        assert read_only.post("/api/queues/web/purge", headers=WRITE).status_code == 403
        assert qm.handle(handle.id).status is Status.FAILED
        assert TOKEN not in local.get("/api/queues").text


def test_neonnb_dashboard_serves_the_api_on_loopback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with QueueManager(Config.for_url(url, max_retries=0)) as qm:
        handle = qm.dispatch("web", jobs.Permanent())
        qm.worker("web", 1).run_once()
        port = free_port()
        log = (tmp_path / "dashboard.log").open("w")
        env = {**os.environ, "NEONNB_DASHBOARD_TOKEN": TOKEN}
        server = subprocess.Popen([sys.executable, "-m", "neonnb", "dashboard", url, "--port", str(port)], cwd=ROOT,
                                  stdout=log, stderr=log, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: answers(f"{base}/api/failed"), what="neonnb dashboard to listen")
            assert httpx.get(f"{base}/api/failed").json()["total"] == 1
            assert httpx.post(f"{base}/api/failed/{handle.id}/retry").status_code == 403
            assert httpx.post(f"{base}/api/failed/{handle.id}/retry", headers=WRITE).status_code == 200
            assert handle.status is Status.QUEUED
        finally:
            server.terminate()
            server.wait(timeout=10)
            log.close()
        assert TOKEN not in (tmp_path / "dashboard.log").read_text(), "a token from the environment is not printed"


ROUTES = [("GET", "/"), ("GET", "/page.js"), ("GET", "/api/queues"), ("POST", "/api/queues/q/purge"),
          ("GET", "/api/jobs"), ("GET", "/api/jobs/18ef1c2d1751914e"), ("POST", "/api/jobs/18ef1c2d1751914e/cancel"),
          ("GET", "/api/failed"), ("POST", "/api/failed/18ef1c2d1751914e/retry"), ("POST", "/api/failed/retry-all"),
          ("DELETE", "/api/failed/18ef1c2d1751914e"), ("GET", "/api/workers"), ("GET", "/api/schedules"),
          ("GET", "/metrics")]


def test_a_host_the_dashboard_does_not_serve_gets_400_on_every_route() -> None:
    """DNS rebinding: a page of evil.test, resolving to 127.0.0.1, would be same-origin with the API."""
    with QueueManager(Config(driver="memory")) as qm:
        app = create_app(qm, token=TOKEN, allowed_hosts=("dash.example",))
        for host, served in [("evil.test", False), ("evil.test:8765", False), ("127.0.0.1.evil.test", False),
                             ("", False), ("127.0.0.1:8765", True), ("localhost:8765", True), ("[::1]:8765", True),
                             ("LOCALHOST", True), ("dash.example", True)]:
            client = TestClient(app, client=LOCAL, base_url=HERE)
            for method, path in ROUTES:
                answer = client.request(method, path, headers={**WRITE, "Host": host})
                if served:
                    assert answer.status_code != 400 or "host" not in answer.text, (host, path, answer.text)
                else:
                    assert answer.status_code == 400, (host, path)
                    assert "does not serve the host" in answer.json()["error"], (host, path)


def test_the_page_carries_security_headers_and_loads_no_inline_script() -> None:
    with QueueManager(Config(driver="memory")) as qm:
        client = TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE)
        for path in ("/", "/api/queues", "/no/such/route"):
            headers = client.get(path).headers
            assert "script-src 'self'" in headers["content-security-policy"]
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert (headers["x-frame-options"], headers["referrer-policy"]) == ("DENY", "no-referrer")
        page = client.get("/").text
        assert '<script src="page.js"></script>' in page and "<script>" not in page
        assert client.get("/page.js").headers["content-type"].startswith("text/javascript")


BAD_REQUESTS = [
    ("GET", "/api/jobs?limit=9223372036854775807"), ("GET", "/api/jobs?limit=0"), ("GET", "/api/jobs?limit=-5"),
    ("GET", "/api/jobs?limit=1e3"), ("GET", "/api/jobs?limit=%00"), ("GET", "/api/jobs?limit=" + "9" * 400),
    ("GET", "/api/jobs?status=done"), ("GET", "/api/jobs?status=%00"), ("GET", "/api/jobs?queue=%00"),
    ("GET", "/api/jobs?queue=" + "q" * 5000), ("GET", "/api/jobs?queue=%7Bx%7D"), ("GET", "/api/jobs?cursor=nan"),
    ("GET", "/api/jobs?cursor=inf/1"), ("GET", "/api/jobs?cursor=1.5/%00"), ("GET", "/api/jobs?cursor=nonsense"),
    ("GET", "/api/jobs?cursor=1e999/x"), ("GET", "/api/jobs?cursor=" + "1" * 5000),
    ("GET", "/api/failed?limit=9223372036854775807"), ("GET", "/api/failed?offset=9223372036854775807"),
    ("GET", "/api/failed?offset=-1"), ("GET", "/api/failed?offset=x"), ("GET", "/api/failed?queue=%00"),
    ("GET", "/api/failed?limit=99999999999999999999999"),
    ("GET", "/api/jobs/%00"), ("GET", "/api/jobs/a%00b"), ("GET", "/api/jobs/" + "a" * 5000),
    ("GET", "/api/jobs/%E2%80%AE"), ("GET", "/api/jobs/..%2F..%2Fetc"),
    ("POST", "/api/jobs/%00/cancel"), ("POST", "/api/jobs/" + "x" * 3000 + "/cancel"),
    ("POST", "/api/failed/%00/retry"), ("POST", "/api/failed/a%0Ab/retry"), ("DELETE", "/api/failed/%00"),
    ("DELETE", "/api/failed/" + "z" * 3000), ("POST", "/api/failed/retry-all?queue=%00"),
    ("POST", "/api/failed/retry-all?queue=" + "q" * 5000), ("POST", "/api/queues/%00/purge"),
    ("POST", "/api/queues/" + "q" * 5000 + "/purge"), ("POST", "/api/queues/%7Bq%7D/purge"),
    ("GET", "/api/nothing"), ("PUT", "/api/failed"), ("GET", "/api/failed/retry-all"),
    ("PATCH", "/api/queues"), ("POST", "/api/jobs"), ("DELETE", "/api/jobs/abc"), ("GET", "/api/queues/q/purge"),
]


@pytest.mark.parametrize("make_manager", DRIVERS, indirect=True)
def test_bad_input_on_every_route_is_a_4xx_json_answer_never_a_5xx(make_manager: MakeManager) -> None:
    qm = make_manager(max_retries=0)
    qm.dispatch("q", jobs.Permanent())
    client = TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE, raise_server_exceptions=False)
    for method, path in BAD_REQUESTS:
        answer = client.request(method, path, headers=WRITE)
        assert 400 <= answer.status_code < 500, (method, path[:80], answer.status_code, answer.text[:300])
        assert isinstance(answer.json()["error"], str), (method, path[:80])
    assert qm.size("q") == 1


def test_a_queue_with_a_slash_in_its_name_can_be_purged() -> None:
    with QueueManager(Config(driver="memory")) as qm:
        qm.dispatch("a/b", jobs.Permanent())
        client = TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE)
        answer = client.post("/api/queues/a%2Fb/purge", headers=WRITE)
        assert answer.json() == {"purged": 1} and qm.size("a/b") == 0


def test_a_password_in_the_urls_query_string_shows_nowhere(
        postgres_server: object, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "S3cretPW-in-query"
    up = f"{postgres_server.url()}?password={secret}&application_name=neonnb"  # type: ignore[attr-defined]
    down = f"postgresql://neonnb@127.0.0.1:1/test?sslpassword={secret}&password={secret}&connect_timeout=1"
    seen: list[str] = []
    for url in (up, down):
        with QueueManager(Config.for_url(url, max_retries=0)) as qm:
            seen += [repr(qm), repr(qm.config), qm._repr_html_(), qm.config.describe_store()]
            client = TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE)
            for method, path in ROUTES:
                seen.append(client.request(method, path, headers=WRITE).text)
            try:
                qm.stats()
            except Exception as exc:
                seen.append(f"{exc!r} {exc}")
        cli = subprocess.run([sys.executable, "-m", "neonnb", "stats", url], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        seen += [cli.stdout, cli.stderr]
    seen.append(caplog.text)
    assert any("can't be reached" in text for text in seen), "the store that is down was reported"
    assert [text[:200] for text in seen if secret in text] == []


def test_failed_views_show_each_jobs_arguments_shortened_and_frames_by_shape(tmp_path: Path) -> None:
    import json

    from neonnb.notebook.dashboard import _arguments_text
    from tests import data_jobs

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with QueueManager(Config.for_url(url, max_retries=0)) as qm:

        @qm.job(queue="parts", max_attempts=1)
        def load(part, region: str, note: str = "") -> None:  # type: ignore[no-untyped-def]
            raise ValueError("corrupt")

        handle = load.dispatch(data_jobs.frame_of(1000), "eu", note="x" * 1000)
        qm.worker("parts", 1).run_once()
        shape = "<DataFrame 1,000 rows x 4 columns: id, region, price, when>"
        client = TestClient(create_app(qm, token=TOKEN), client=LOCAL, base_url=HERE)
        [listed] = client.get("/api/failed").json()["jobs"]
        assert listed["arguments"]["part"] == shape and listed["arguments"]["region"] == "eu"
        assert len(listed["arguments"]["note"]) == 200
        cli = subprocess.run([sys.executable, "-m", "neonnb", "failed", url], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert "ARGUMENTS" in cli.stdout and '{"part": "<DataFrame 1,000 rows' in cli.stdout
        cli_json = subprocess.run([sys.executable, "-m", "neonnb", "failed", url, "--json"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
        assert json.loads(cli_json.stdout)["jobs"][0]["arguments"]["part"] == shape
        assert qm.failed_df()["arguments"][0]["part"] == shape
        assert shape in _arguments_text(handle.fetch().payload)
        whole = qm.failed.arguments(handle.id)
        assert len(whole["part"]) == 1000 and whole["note"] == "x" * 1000
