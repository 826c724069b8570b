"""Redis driver on redis-py's asyncio client. The key layout and every state change are in
``redis_scripts.lua`` (one Lua script per change, loaded once and called by SHA).

The client lives on neonnb's background loop; calls from another loop are handed to it, so
the driver works from any loop like the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar, cast

from .. import _loop
from ..errors import ConfigError, StoreUnavailable
from ..job import JobRecord, Priority, Status
from .base import LEASE_ERROR, Driver, QueueCounts
from .wakeups import WAKE_ALL, WakeThread

try:
    import redis.asyncio as aioredis
    from redis import Redis as SyncRedis
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError("the redis driver needs redis-py: pip install 'neonnb[redis]'") from exc

logger = logging.getLogger("neonnb.drivers.redis")
T = TypeVar("T")

_STATUS_KEYS = {Status.QUEUED: None, Status.RUNNING: "running", Status.SUCCEEDED: "done", Status.FAILED: "failed"}


def _scripts() -> dict[str, str]:
    text = resources.files("neonnb.drivers").joinpath("redis_scripts.lua").read_text()
    parts = text.split("--! ")[1:]
    return {part.split("\n", 1)[0].strip(): part.split("\n", 1)[1] for part in parts}


def _num(value: float) -> str:
    return repr(float(value))


class RedisDriver(Driver):
    def __init__(self, url: str, *, password: str | None = None, database: int | None = None,
                 prefix: str = "neonnb:") -> None:
        self.url = url
        self.prefix = prefix
        self._options: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": 5,
                                         "health_check_interval": 30}
        if password:
            self._options["password"] = password
        if database:
            self._options["db"] = database
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._watcher: _Subscriber | None = None

    # --- plumbing ---------------------------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            # A pooled connection that died with a server restart fails on first use: retry
            # a few times with backoff (bounded, so a dispatch during an outage still fails
            # within seconds). Every script is safe to repeat, or recoverable by the lease.
            retry = AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)
            self._client = aioredis.Redis.from_url(
                self.url, retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError], **self._options
            )
            self._scripts = {name: self._client.register_script(body) for name, body in _scripts().items()}
        return self._client

    async def _on_loop(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` on the background loop (where the client lives), translating a
        lost connection into StoreUnavailable."""
        background = _loop.get_loop()
        try:
            if asyncio.get_running_loop() is background:
                return await work()
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_call(work), background))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {self._where()} can't be reached: {exc}") from exc

    def _where(self) -> str:
        return self.url.split("@")[-1]

    async def _script(self, name: str, args: Sequence[Any]) -> Any:
        async def run() -> Any:
            self._redis()
            return await self._scripts[name](args=[self.prefix, *args])

        return await self._on_loop(run)

    def _record(self, fields: dict[str, str]) -> JobRecord:
        def number(name: str) -> float | None:
            value = fields.get(name)
            return None if value in (None, "") else float(value)

        return JobRecord(
            id=fields["id"], queue=fields["queue"], name=fields["name"], payload=fields["payload"],
            priority=Priority.from_rank(int(fields["priority"])), status=Status(fields["status"]),
            attempts=int(fields["attempts"]), max_attempts=int(fields["max_attempts"]), timeout=number("timeout"),
            run_at=float(fields["run_at"]), created_at=float(fields["created_at"]), started_at=number("started_at"),
            finished_at=number("finished_at"), lease_expires=number("lease_expires"),
            worker_id=fields.get("worker_id"),
            progress=json.loads(fields["progress"]) if fields.get("progress") else None,
            result=fields.get("result"),
            error=json.loads(fields["error"]) if fields.get("error") else None,
        )

    # --- the protocol -----------------------------------------------------------------

    async def enqueue(self, records: Sequence[JobRecord]) -> None:
        args: list[Any] = []
        for r in records:
            args += [r.id, r.queue, r.name, r.payload, r.priority.rank, r.status.value, r.attempts, r.max_attempts,
                     "" if r.timeout is None else _num(r.timeout), _num(r.run_at), _num(r.created_at)]
        if records:
            await self._script("enqueue", args)

    async def reserve(
        self, queues: Sequence[str], limit: int, worker_id: str, now: float, lease_expires: float
    ) -> list[JobRecord]:
        rows = await self._script("reserve", [_num(now), limit, worker_id, _num(lease_expires), *queues])
        return [self._record(dict(zip(row[::2], row[1::2], strict=True))) for row in rows]

    async def extend_leases(self, ids: Sequence[str], worker_id: str, lease_expires: float) -> None:
        if ids:
            await self._script("extend", [worker_id, _num(lease_expires), *ids])

    async def set_progress(self, job_id: str, worker_id: str, progress: dict[str, Any]) -> None:
        await self._script("progress", [job_id, worker_id, json.dumps(progress)])

    async def complete(self, results: Sequence[tuple[str, str | None]], worker_id: str, now: float) -> list[str]:
        args: list[Any] = [worker_id, _num(now)]
        for job_id, result in results:
            args += [job_id, "0" if result is None else "1", result or ""]
        return list(await self._script("complete", args))

    async def retry(self, job_id: str, worker_id: str, run_at: float, error: dict[str, Any]) -> bool:
        return bool(await self._script("retry", [job_id, worker_id, _num(run_at), json.dumps(error)]))

    async def fail(self, job_id: str, worker_id: str, now: float, error: dict[str, Any]) -> bool:
        return bool(await self._script("fail", [job_id, worker_id, _num(now), json.dumps(error)]))

    async def release(self, ids: Sequence[str], worker_id: str, now: float) -> int:
        return int(await self._script("release", [worker_id, *ids])) if ids else 0

    async def recover_expired(self, now: float) -> list[str]:
        return list(await self._script("recover", [_num(now), json.dumps(LEASE_ERROR)]))

    async def purge_finished(self, before: float) -> int:
        return int(await self._script("purge", [_num(before)]))

    async def get(self, job_id: str) -> JobRecord | None:
        async def fetch() -> dict[Any, Any]:
            return await cast("Awaitable[dict[Any, Any]]", self._redis().hgetall(f"{self.prefix}job:{job_id}"))

        fields = await self._on_loop(fetch)
        return self._record({str(k): str(v) for k, v in fields.items()}) if fields else None

    async def list_jobs(
        self, *, status: Status | None = None, queue: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[JobRecord]:
        async def collect() -> list[JobRecord]:
            client = self._redis()
            queues = [queue] if queue is not None else await self._queues(client)
            statuses = [status] if status is not None else list(Status)
            keys = []
            for q in queues:
                for st in statuses:
                    suffix = _STATUS_KEYS[st]
                    keys += [f"{self.prefix}q:{q}:ready:{p}" for p in range(3)] if suffix is None else [
                        f"{self.prefix}q:{q}:{suffix}"
                    ]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.zrange(key, 0, -1)
            ids = [job_id for found in await pipe.execute() for job_id in found]
            pipe = client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(f"{self.prefix}job:{job_id}")
            return [self._record(fields) for fields in await pipe.execute() if fields]  # decode_responses: str

        records = await self._on_loop(collect)
        if status is Status.FAILED:
            records.sort(key=lambda r: (r.finished_at or 0.0, r.id), reverse=True)
        else:
            records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return records[offset : offset + limit]

    async def counts(self, now: float) -> dict[str, QueueCounts]:
        async def count() -> dict[str, QueueCounts]:
            client = self._redis()
            queues = await self._queues(client)
            pipe = client.pipeline(transaction=False)
            for q in queues:
                base = f"{self.prefix}q:{q}"
                for p in range(3):
                    pipe.zcount(f"{base}:ready:{p}", "-inf", _num(now))
                    pipe.zcount(f"{base}:ready:{p}", f"({_num(now)}", "+inf")
                pipe.zcard(f"{base}:running")
                pipe.zcard(f"{base}:done")
                pipe.zcard(f"{base}:failed")
            values = iter(await pipe.execute())
            result = {}
            for q in queues:
                c = QueueCounts()
                for p in range(3):
                    c.waiting[Priority.from_rank(p).value] = next(values)
                    c.delayed += next(values)
                c.running, c.succeeded, c.failed = next(values), next(values), next(values)
                if c.size or c.running or c.succeeded or c.failed:
                    result[q] = c
            return result

        return await self._on_loop(count)

    async def _queues(self, client: aioredis.Redis) -> list[str]:
        members = await cast("Awaitable[set[Any]]", client.smembers(f"{self.prefix}queues"))
        return sorted(str(q) for q in members)

    async def requeue_failed(self, ids: Sequence[str] | None, queue: str | None, now: float) -> list[str]:
        if ids is not None and not ids:
            return []
        return list(await self._script("requeue_failed", [_num(now), queue or "", *(ids or [])]))

    async def delete_failed(self, ids: Sequence[str] | None) -> int:
        if ids is not None and not ids:
            return 0
        return int(await self._script("delete_failed", list(ids or [])))

    def watch(self, callback: Callable[[str], None]) -> None:
        if self._watcher is None:
            self._watcher = _Subscriber(self.url, self._options, f"{self.prefix}wake", callback)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        client = self._client
        if client is not None:
            self._client = None
            await self._on_loop(client.aclose)


async def _call(work: Callable[[], Awaitable[T]]) -> T:
    return await work()


class _Subscriber(WakeThread):
    """Subscribed to the wake channel: ``callback(queue)`` per dispatch."""

    def __init__(self, url: str, options: dict[str, Any], channel: str, callback: Callable[[str], None]) -> None:
        self.url, self.options, self.channel = url, options, channel
        super().__init__(f"SUBSCRIBE {channel}", callback)

    def listen(self) -> None:
        client = SyncRedis.from_url(self.url, **self.options)
        try:
            with client.pubsub(ignore_subscribe_messages=True) as pubsub:  # type: ignore[no-untyped-call]
                pubsub.subscribe(self.channel)
                self.callback(WAKE_ALL)
                while not self.stopping:
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self.callback(str(message["data"]))
        finally:
            client.close()
