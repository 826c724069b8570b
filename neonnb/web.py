"""The web dashboard's JSON API and Prometheus metrics, on Starlette (``pip install 'neonnb[web]'``).

``create_app(qm)`` is an ASGI app to mount in a FastAPI or Starlette app; ``neonnb dashboard
TARGET`` serves one with uvicorn. ``GET /`` is the page (queues with their depth over the
last minute, running jobs with progress, failed jobs with retry / forget / retry all,
workers), refreshed every second from the API; the other routes are JSON (errors as
``{"error": "..."}``):

    GET    /api/queues                    per-queue counts
    POST   /api/queues/{queue}/purge      {"purged": N}: the queue's jobs not yet started, deleted
    GET    /api/jobs?status=&queue=&limit=&cursor=  {"jobs": [...], "cursor": next page or null}
    GET    /api/jobs/{id}                 one job
    POST   /api/jobs/{id}/cancel          {"was": "queued"}
    GET    /api/failed?limit=50&offset=0  {"jobs": [...], "total": N}  (the seed's shape)
    POST   /api/failed/{id}/retry         {"message": "Job queued for retry"}
    POST   /api/failed/retry-all?queue=   {"retried": N}
    DELETE /api/failed/{id}               {"message": "Job forgotten"}
    GET    /api/workers                   every worker on the store, with its state
    GET    /api/schedules                 every running scheduler's schedules, with next tick
    GET    /metrics                       Prometheus' text format

Safe by default, against the network, the browser and bad input:

- Every write needs the token, sent as ``Authorization: Bearer <token>`` (a header: a page of
  another origin can't send it without a preflight, which is refused); a request from off
  this machine needs it for reads too (401 without); ``read_only`` refuses every write (403).
- Behind Jupyter (``proxied``: ``neonnb dashboard --unix-socket``, see neonnb.web_proxy) the app
  listens on a unix socket only Jupyter's user can open, so Jupyter's login is the only way
  in; there writes need the ``X-Neonnb-CSRF`` header to match the ``neonnb_csrf`` cookie the
  page was served with (double submit: a page of another origin can read neither).
- A write that a browser marks as coming from another site (``Sec-Fetch-Site``) is refused.
- The Host header must be one this dashboard serves (loopback names and ``allowed_hosts``),
  else 400: a DNS-rebinding page can't read the API.
- Every answer is JSON, bad input a 4xx with ``{"error": ...}``; 503 only when the store is
  down, saying so without echoing a command, a statement or a key.
- The page loads no inline script and carries CSP, frame-ancestors, X-Frame-Options and
  no-referrer headers.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import html
import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from .codec import shown_payload
from .errors import ConfigError, JobNotFound, MissingExtra, StoreError, StoreUnavailable
from .hooks import JobEvent
from .manager import QueueManager
from .records import Status, record_data, schedules_data

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from starlette.applications import Starlette
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - the message is the point
    raise MissingExtra("the web dashboard needs Starlette and prometheus_client: pip install 'neonnb[web]'") from exc

Handler = Callable[[Request], Awaitable[Response]]
_PAGE = resources.files("neonnb").joinpath("web_page.html").read_text()
_SCRIPT = resources.files("neonnb").joinpath("web_page.js").read_text()
READS = ("GET", "HEAD")
CSRF_COOKIE, CSRF_HEADER = "neonnb_csrf", "x-neonnb-csrf"
logger = logging.getLogger("neonnb.web")


def create_app(qm: QueueManager, *, token: str | None = None, read_only: bool = False, proxied: bool = False,
               allowed_hosts: tuple[str, ...] = ()) -> ASGIApp:
    """The dashboard's API for ``qm``'s store. ``token``: what writes (and reads from off this
    machine) must send as ``Authorization: Bearer <token>``. ``proxied``: served on a unix
    socket behind Jupyter's proxy (no token; writes need the page's CSRF cookie echoed in a
    header). ``allowed_hosts``: names besides loopback's the Host header may carry."""
    if not token and not proxied:
        raise ConfigError("the dashboard needs a token: every write must carry it")
    csrf = secrets.token_urlsafe(24)

    def guarded(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            allowed = bool(sent and token) and hmac.compare_digest(sent, str(token))
            if not allowed and not proxied and not _loopback(request):
                return _error(401, "send the dashboard's token: Authorization: Bearer <token>")
            if request.method not in READS:
                if read_only:
                    return _error(403, "this dashboard is read-only")
                if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
                    return _error(403, "a write from another site's page is refused")
                if proxied and not _same_secret(request.headers.get(CSRF_HEADER), request.cookies.get(CSRF_COOKIE)):
                    return _error(403, f"a write needs the {CSRF_HEADER} header to match the {CSRF_COOKIE} cookie "
                                       "of the dashboard's page: reload the page")
                if not proxied and not allowed:
                    return _error(403, "a write needs the dashboard's token: Authorization: Bearer <token>")
            try:
                return await handler(request)
            except JobNotFound as exc:
                return _error(404, str(exc))
            except ConfigError as exc:
                return _error(400, str(exc))
            except StoreUnavailable:
                return _error(503, f"the store ({qm.config.describe_store()}) can't be reached; try again later")
            except StoreError:
                logger.exception("the store refused %s %s", request.method, request.url.path)
                return _error(500, "the store refused this request; the dashboard's log has the details")

        return run

    async def queues(request: Request) -> Response:
        counts = await qm.astats()
        return JSONResponse({q: c.as_data() for q, c in counts.items()})

    async def jobs(request: Request) -> Response:
        params = request.query_params
        page = await qm.ajobs(params.get("status"), params.get("queue"), _number(params, "limit", 50),
                              params.get("cursor"))
        return _json({"jobs": [record_data(r) for r in page], "cursor": page.cursor})

    async def job(request: Request) -> Response:
        record = await qm.handle(request.path_params["job_id"]).afetch()
        # For the page's job view: arguments and result shortened (a DataFrame by its shape).
        shown = {"arguments": shown_payload(record.payload),
                 "result_shown": None if record.result is None else shown_payload(record.result)}
        return _json({**record_data(record), **shown})

    async def cancel(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        was = await qm.acancel(job_id)
        if was is None:
            raise JobNotFound(f"job {job_id} not found")
        if was not in (Status.QUEUED, Status.RUNNING):
            return _error(409, f"job {job_id} had already ended ({was.value})")
        return _json({"was": was.value})

    async def failed(request: Request) -> Response:
        params = request.query_params
        queue = params.get("queue")
        listed = await qm.failed.alist(_number(params, "limit", 50), _number(params, "offset", 0), queue)
        return _json({"jobs": [dataclasses.asdict(f) for f in listed], "total": await qm.failed.atotal(queue)})

    async def retry(request: Request) -> Response:
        await qm.failed.aretry(request.path_params["job_id"])
        return _json({"message": "Job queued for retry"})

    async def retry_all(request: Request) -> Response:
        return _json({"retried": await qm.failed.aretry_all(request.query_params.get("queue"))})

    async def forget(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not await qm.failed.aforget(job_id):
            raise JobNotFound(f"job {job_id} is not in the failed store")
        return _json({"message": "Job forgotten"})

    async def schedules(request: Request) -> Response:
        return _json({"schedules": schedules_data(await qm.aknown_schedulers(), qm.clock())})

    async def purge(request: Request) -> Response:
        return _json({"purged": await qm.apurge(request.path_params["queue"])})

    async def pause(request: Request) -> Response:
        queue = request.path_params["queue"]
        await qm.apause(queue)
        return _json({"queue": queue, "paused": True})

    async def limit(request: Request) -> Response:
        queue = request.path_params["queue"]
        try:
            sent = await request.json()
            given = {name: sent[name] for name in ("rate", "concurrency") if name in sent}
        except (ValueError, TypeError, AttributeError):
            given = {}
        if not given:
            return _error(400, 'send JSON: {"rate": "100/m"} and/or {"concurrency": 5}; null lifts a limit')
        if given.get("rate") is not None and not isinstance(given["rate"], str):
            return _error(400, f'rate must be a text such as "100/m", or null, got {given["rate"]!r}')
        await qm.alimit_queue(queue, **given)
        return _json({"queue": queue, **given})

    async def resume(request: Request) -> Response:
        queue = request.path_params["queue"]
        await qm.aresume(queue)
        return _json({"queue": queue, "paused": False})

    async def workers(request: Request) -> Response:
        infos, now = await qm.aknown_workers(), qm.clock()
        return _json({"workers": [info.as_data(now) for info in infos]})

    seen = _Metrics(qm)

    async def metrics(request: Request) -> Response:
        return Response(seen.latest(await qm.astats(), await qm.aknown_workers()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def history(request: Request) -> Response:
        return _json(seen.history(qm.clock()))

    async def page(request: Request) -> Response:
        # Static: everything it shows comes through the API, with the token the user gives it.
        answer = HTMLResponse(_PAGE.replace("{{store}}", html.escape(qm.config.describe_store())))
        if proxied:  # no Path: the browser scopes it to the page's own path (/user/<name>/neonnb)
            answer.set_cookie(CSRF_COOKIE, csrf, samesite="strict", httponly=False, path=None)
        return answer

    async def script(request: Request) -> Response:
        return Response(_SCRIPT, media_type="text/javascript; charset=utf-8")

    routes = [
        Route("/", page),
        Route("/page.js", script),
        Route("/api/queues", guarded(queues)),
        Route("/api/queues/{queue:path}/purge", guarded(purge), methods=["POST"]),
        Route("/api/queues/{queue:path}/pause", guarded(pause), methods=["POST"]),
        Route("/api/queues/{queue:path}/resume", guarded(resume), methods=["POST"]),
        Route("/api/queues/{queue:path}/limit", guarded(limit), methods=["POST"]),
        Route("/api/jobs", guarded(jobs)),
        Route("/api/jobs/{job_id}", guarded(job)),
        Route("/api/jobs/{job_id}/cancel", guarded(cancel), methods=["POST"]),
        Route("/api/failed", guarded(failed)),
        Route("/api/failed/retry-all", guarded(retry_all), methods=["POST"]),
        Route("/api/failed/{job_id}/retry", guarded(retry), methods=["POST"]),
        Route("/api/failed/{job_id}", guarded(forget), methods=["DELETE"]),
        Route("/api/workers", guarded(workers)),
        Route("/api/schedules", guarded(schedules)),
        Route("/api/history", guarded(history)),
        Route("/metrics", guarded(metrics)),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail if exc.status_code != 404 else f"no such route: {request.url.path}")

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(500, "the dashboard failed on this request; its log has the details")

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    return _Guard(app, None if proxied else frozenset(h.lower() for h in allowed_hosts))


SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; connect-src 'self'; "
                                 b"style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; "
                                 b"form-action 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
]


class _Guard:
    """Outermost: refuses a Host header the dashboard doesn't serve (DNS rebinding: a page of
    ``evil.test`` resolving to 127.0.0.1 would otherwise read the API as a same-origin page)
    and puts the security headers on every answer. ``allowed_hosts`` None: no Host check (a
    unix socket behind Jupyter's proxy, which no rebinding page can reach)."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] | None) -> None:
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if self.allowed_hosts is not None and not self._serves(host):
            await _error(400, f"this dashboard does not serve the host {host[:100]!r}")(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)

    def _serves(self, host: str) -> bool:
        name = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
        name = name.lower().removeprefix("[").removesuffix("]")
        assert self.allowed_hosts is not None
        return bool(name) and (is_loopback(name) or name in self.allowed_hosts)


def _same_secret(sent: str | None, expected: str | None) -> bool:
    return bool(sent and expected) and hmac.compare_digest(str(sent), str(expected))


class _Metrics:
    """What /metrics reports: the store's counts and workers, read at each scrape, and the jobs
    that ended (by queue and outcome) with their durations, counted from the events of every
    worker on the store since the first scrape (prometheus_client's counters and histogram);
    and the page's last hour by the minute, from the same events."""

    def __init__(self, qm: QueueManager) -> None:
        self.qm = qm
        self.registry = CollectorRegistry()
        self.store = _StoreCollector()
        self.registry.register(self.store)
        self.finished = Counter("neonnb_jobs_finished", "Attempts that ended, by queue and outcome (succeeded, "
                                "retrying, failed, cancelled), since this dashboard's first scrape",
                                ["queue", "outcome"], registry=self.registry)
        self.durations = Histogram("neonnb_job_duration_seconds", "How long attempts ran, by queue", ["queue"],
                                   registry=self.registry, buckets=DURATION_BUCKETS)
        # Per queue and minute of the last hour: attempts that ended, and of them those that failed.
        self.minutes: dict[str, dict[int, list[int]]] = collections.defaultdict(dict)
        self.since: float | None = None  # when the events began to be counted

    def _subscribe(self) -> None:
        if self.since is None:
            self.since = self.qm.clock()
            self.qm.events.subscribe(self._seen)

    def latest(self, counts: dict[str, Any], workers: list[Any]) -> bytes:
        self._subscribe()
        self.store.counts, self.store.workers, self.store.now = counts, workers, self.qm.clock()
        return bytes(generate_latest(self.registry))

    def history(self, now: float) -> dict[str, Any]:
        """Each queue's last hour by the minute, oldest first: attempts that ended, and the
        failed ones (a retry counts as a failed attempt); counted since ``since``."""
        self._subscribe()
        last = int(now // 60)
        minutes = range(last - HISTORY_MINUTES + 1, last + 1)
        queues = {}
        for queue, counted in list(self.minutes.items()):  # events arrive on another thread
            for old in [m for m in list(counted) if m < minutes.start]:
                del counted[old]
            queues[queue] = {"ended": [counted.get(m, [0, 0])[0] for m in minutes],
                             "failed": [counted.get(m, [0, 0])[1] for m in minutes]}
        return {"since": self.since, "minute_starts": [m * 60 for m in minutes], "queues": queues}

    def _seen(self, event: JobEvent) -> None:
        if event.kind in ("succeeded", "retrying", "failed", "cancelled", "expired"):
            self.finished.labels(event.queue, event.kind).inc()
            if event.duration is not None:
                self.durations.labels(event.queue).observe(event.duration)
            minute = self.minutes[event.queue].setdefault(int((event.at or self.qm.clock()) // 60), [0, 0])
            minute[0] += 1
            minute[1] += event.kind in ("retrying", "failed")


HISTORY_MINUTES = 60
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class _StoreCollector:
    """The store's side of /metrics, as of the latest scrape."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}
        self.workers: list[Any] = []
        self.now = 0.0

    def collect(self) -> Any:
        jobs = GaugeMetricFamily("neonnb_jobs", "Jobs in the store, by queue and state", labels=["queue", "state"])
        for queue, c in self.counts.items():
            for state, value in (("waiting", sum(c.waiting.values())), ("delayed", c.delayed),
                                 ("running", c.running), ("succeeded", c.succeeded), ("failed", c.failed),
                                 ("cancelled", c.cancelled), ("expired", c.expired)):
                jobs.add_metric([queue, state], value)
        yield jobs
        paused = GaugeMetricFamily("neonnb_queue_paused", "1 while a queue is paused (qm.pause)", labels=["queue"])
        for queue, c in self.counts.items():
            paused.add_metric([queue], int(c.paused))
        yield paused
        workers = GaugeMetricFamily("neonnb_workers", "Registered workers, by state", labels=["state"])
        states = [w.state(self.now) for w in self.workers]
        for state in ("running", "stopping", "lost"):
            workers.add_metric([state], states.count(state))
        yield workers


def _loopback(request: Request) -> bool:
    return is_loopback(request.client.host if request.client else "")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") is this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _number(params: Any, name: str, default: int) -> int:
    """A whole number from the query string (its range is checked where it is used)."""
    text = params.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.lstrip("-").isdigit() or len(text) > 20:
        raise ConfigError(f"{name} must be an integer, got {text[:40]!r}")
    return int(text)


def _json(data: Any) -> Response:
    return JSONResponse(_plain(data))


def _plain(value: Any) -> Any:
    """Datetimes as ISO text, for JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)
