"""Redis driver. The key layout and every state change are in ``redis_scripts.lua`` (one Lua
script per change, called by SHA); the connection is neonnb's own small client (resp.py).

Each event loop that calls the driver gets its own client (asyncio connections belong to the
loop that made them), so the driver works from any loop like the others, without hopping threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from .. import _loop
from ..errors import ConfigError, StoreUnavailable
from ..records import JobRecord, Priority, QueueCounts, Recovered, Status, read_record
from . import resp
from .base import Driver, Waiter
from .wakeups import WAKE_ALL

logger = logging.getLogger("neonnb.drivers.redis")
T = TypeVar("T")

_STATUS_KEYS = {
    Status.QUEUED: None, Status.RUNNING: "running", Status.SUCCEEDED: "done", Status.FAILED: "failed",
    Status.CANCELLED: "cancelled",
}


def _scripts() -> dict[str, resp.Script]:
    """Each script of the file, with the file's ``_prelude`` (shared helpers) in front."""
    text = resources.files("neonnb.drivers").joinpath("redis_scripts.lua").read_text()
    bodies = dict(part.split("\n", 1) for part in text.split("--! ")[1:])
    prelude = bodies.pop("_prelude")
    return {name.strip(): resp.Script(prelude + body) for name, body in bodies.items()}


_SCRIPTS = _scripts()


def _num(value: float) -> str:
    return repr(float(value))


class RedisDriver(Driver):
    claim_piece = 10

    def __init__(self, url: str, *, password: str | None = None, database: int | None = None,
                 prefix: str = "neonnb:") -> None:
        if "{" in prefix or "}" in prefix:
            raise ConfigError(
                f"key_prefix {prefix!r} must not contain braces: neonnb puts each queue's name in "
                "a {hash tag} after the prefix so that a queue's keys share one Redis Cluster slot"
            )
        self._where = url.split("@")[-1]  # the URL without its credentials, for messages
        self.prefix = prefix
        self.channel = f"{prefix}wake"
        self.settings = resp.Settings.from_url(url, password=password, database=database)
        # Connections belong to the loop that made them: one client per loop, so a call from
        # the caller's loop goes straight to Redis instead of hopping threads. Beside each
        # client, what closes it at the loop's end (held here: a loop holds it only weakly).
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[resp.Client, AsyncIterator[None]]
        ] = weakref.WeakKeyDictionary()
        self._registered: set[str] = set()  # queues this process has added to P.."queues"
        self._watcher: concurrent.futures.Future[None] | None = None
        # Each thread's own blocking client (enqueue_blocking); closed with the thread, or by close().
        self._thread = threading.local()
        self._blocking: weakref.WeakSet[resp.BlockingClient] = weakref.WeakSet()

    # --- plumbing ---------------------------------------------------------------------

    async def _client(self) -> resp.Client:
        loop = asyncio.get_running_loop()
        known = self._clients.get(loop)
        if known is not None and not known[0].closed:
            return known[0]
        client = resp.Client(self.settings)
        # Closed with the loop: asyncio.run() (and pytest-asyncio) finalize a loop's async
        # generators before closing it, while it still runs. Without this every asyncio.run()
        # of a script left its connection open until the manager closed.
        closer = _close_at_loop_end(client)
        self._clients[loop] = (client, closer)
        await anext(closer)
        return client

    async def _reach(self, work: Callable[[resp.Client], Awaitable[T]]) -> T:
        """``work(client)``, with a lost connection reported as StoreUnavailable."""
        try:
            return await work(await self._client())
        except (ConnectionError, OSError) as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"Redis at {self._where} can't be reached: {exc}")

    def _base(self, queue: str) -> str:
        """Where queue's keys start; {queue} is their Redis Cluster hash tag."""
        return f"{self.prefix}{{{queue}}}:"

    async def _script(self, name: str, queues: Sequence[str], args: Sequence[Any], resend: bool = True) -> Any:
        keys = [self._base(q) for q in queues]
        return await self._reach(lambda client: client.script(_SCRIPTS[name], keys, args, resend))

    async def _per_queue(self, name: str, groups: dict[str, list[Any]], args: Callable[[str], list[Any]]) -> list[Any]:
        """Run script ``name`` once per queue (a script touches one queue's slot), concurrently."""
        calls = [self._script(name, [q], [*args(q), *extra]) for q, extra in groups.items()]
        if len(calls) == 1:  # the usual case: no tasks to create
            return [await calls[0]]
        return list(await asyncio.gather(*calls))

    def _record(self, fields: dict[str, str]) -> JobRecord:
        return read_record(fields)

    # --- the protocol -----------------------------------------------------------------

    async def waiter(self, worker_id: str, queues: Sequence[str]) -> Waiter | None:
        # A blocking pop takes keys of one slot only: on a cluster, one queue per worker.
        if len(queues) > 1 and await self._reach(lambda client: client.is_cluster()):
            return None
        return _Waiter(self, worker_id, queues)

    async def enqueue(self, records: Sequence[JobRecord]) -> None:
        await self._store(records, "new")

    async def enqueue_once(self, record: JobRecord) -> bool:
        return await self._store([record], "new") == [1]

    async def enqueue_unique(self, record: JobRecord) -> str:
        return str((await self._store([record], "unique"))[0])

    async def mark(self, queue: str, group: str, member: str, value: str, now: float,
                   complete_at: int) -> dict[str, str] | None:
        reply = await self._script("mark", [queue], [group, member, value, _num(now), complete_at])
        return _fields(reply) if reply else None

    def enqueue_blocking(self, records: Sequence[JobRecord]) -> bool:
        by_queue = _enqueue_args(records)
        if len(by_queue) != 1 or not by_queue.keys() <= self._registered:
            return False  # the loop's way registers a new queue, and runs one script per queue
        [(queue, args)] = by_queue.items()
        client = None
        try:
            client = self._blocking_client()
            client.script(_SCRIPTS["enqueue"], [self._base(queue)], [self.channel, queue, "new", *args])
        except (ConnectionError, OSError, resp.ReplyError) as exc:
            if client is not None:
                client.close()  # the next call starts afresh (after a MOVED, with the new slot map)
            if isinstance(exc, resp.NoReply):  # a hung server: the loop's way would only wait as long again
                raise self._unreachable(exc) from exc
            # Stored or not, the loop's way stores it (unless stored: the script skips an id
            # it has) or reports the outage after its retries.
            logger.debug("blocking enqueue failed, going through the loop: %s", exc)
            return False
        return True

    def _blocking_client(self) -> resp.BlockingClient:
        client: resp.BlockingClient | None = getattr(self._thread, "client", None)
        if client is None or client.closed or client.pid != os.getpid():
            client = self._thread.client = resp.BlockingClient(self.settings)
            self._blocking.add(client)
        return client

    async def _store(self, records: Sequence[JobRecord], mode: str) -> list[Any]:
        """Run the enqueue script once per queue; returns what each run returned."""
        by_queue = _enqueue_args(records)
        new = by_queue.keys() - self._registered
        if new:
            if not self._registered:
                await self._reach(self._warn_if_evicting)
            await self._reach(lambda client: client.execute("SADD", f"{self.prefix}queues", *new))
            self._registered |= new
        return await self._per_queue("enqueue", by_queue, lambda q: [self.channel, q, mode])

    async def _warn_if_evicting(self, client: resp.Client) -> None:
        """Once, before this process's first dispatch: a Redis that evicts any key when it
        runs out of memory (maxmemory-policy allkeys-*) may drop queued jobs without a trace."""
        try:
            info = str(await client.execute("INFO", "memory"))
        except resp.ReplyError:
            return  # INFO not allowed to this ACL user: nothing to say
        policy = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                       if line.startswith("maxmemory_policy:")), "")
        if policy.startswith("allkeys"):
            logger.warning(
                "Redis at %s may evict queued jobs when it runs out of memory (maxmemory-policy %s); "
                "set maxmemory-policy noeviction (or a volatile-* policy) for a queue",
                self._where, policy,
            )

    async def reserve(
        self, queues: Sequence[str], limit: int, worker_id: str, now: float, lease_expires: float,
        ranks: Sequence[int] | None = None,
    ) -> list[JobRecord]:
        # On a cluster each queue lives in its own slot: claim queue by queue, in the order
        # given; on one server a single script keeps priority strict across all of them.
        rounds = [[q] for q in queues] if await self._reach(lambda client: client.is_cluster()) else [list(queues)]
        claimed: list[JobRecord] = []
        for group in rounds:
            if len(claimed) >= limit:
                break
            bands = "".join(str(rank) for rank in (range(3) if ranks is None else ranks))
            args = [_num(now), limit - len(claimed), worker_id, _num(lease_expires), bands]
            # Not sent again if the connection drops: the claim may have run, its reply lost;
            # the worker then gives back what it took (release_unheld).
            rows = await self._script("reserve", group, args, resend=False)
            claimed += [self._record(_fields(flat)) for flat in rows]
        return claimed

    async def extend_leases(self, jobs: Sequence[JobRecord], worker_id: str, lease_expires: float) -> list[str]:
        stopping = await self._per_queue("extend", _ids_by_queue(jobs), lambda q: [worker_id, _num(lease_expires)])
        return [job_id for ids in stopping for job_id in ids]

    async def cancel(self, job_id: str, queue: str | None, now: float) -> Status | None:
        queues = [queue] if queue is not None else await self._reach(self._queues)
        for q in queues:
            was = await self._script("cancel", [q], [job_id, _num(now)])
            if was:
                return Status(was)
        return None

    async def set_progress(self, job: JobRecord, worker_id: str, progress: dict[str, Any]) -> None:
        await self._script("set_owned", [job.queue], [job.id, worker_id, "progress", json.dumps(progress)])

    async def save_output(self, job: JobRecord, worker_id: str, output: str) -> None:
        await self._script("set_owned", [job.queue], [job.id, worker_id, "output", output])

    async def complete(self, results: Sequence[tuple[JobRecord, str | None]], worker_id: str, now: float) -> list[str]:
        groups: dict[str, list[Any]] = {}
        for job, result in results:
            groups.setdefault(job.queue, []).extend([job.id, "0" if result is None else "1", result or ""])
        done = await self._per_queue("complete", groups, lambda q: [worker_id, _num(now)])
        return [job_id for ids in done for job_id in ids]

    async def retry(self, job: JobRecord, worker_id: str, run_at: float, error: dict[str, Any]) -> bool:
        return bool(await self._script("retry", [job.queue], [job.id, worker_id, _num(run_at), json.dumps(error)]))

    async def fail(
        self, job: JobRecord, worker_id: str, now: float, error: dict[str, Any], status: Status = Status.FAILED
    ) -> bool:
        args = [job.id, worker_id, _num(now), json.dumps(error), status.value]
        return bool(await self._script("fail", [job.queue], args))

    async def release(self, jobs: Sequence[JobRecord], worker_id: str, now: float) -> int:
        released = await self._per_queue("release", _ids_by_queue(jobs),
                                         lambda q: [self.channel, q, worker_id, "these"])
        return sum(released)

    async def server_time(self) -> float | None:
        seconds, micros = await self._reach(lambda client: client.execute("TIME", key=self.prefix))
        return int(seconds) + int(micros) / 1e6

    async def release_unheld(self, queues: Sequence[str], worker_id: str, held: Sequence[str], now: float) -> int:
        groups = {queue: list(held) for queue in queues}
        return sum(await self._per_queue("release", groups, lambda q: [self.channel, q, worker_id, "unheld"]))

    async def recover_expired(self, now: float) -> Recovered:
        every = await self._by_queue(None, None)
        replies = await self._per_queue("recover", every, lambda q: [self.channel, q, _num(now)])
        recovered = Recovered([job_id for requeued, _ in replies for job_id in requeued])
        exhausted = [(queue, job_id) for queue, (_, ids) in zip(every, replies, strict=True) for job_id in ids]
        if exhausted:
            recovered.exhausted = await self._reach(lambda client: self._records(client, exhausted))
        return recovered

    async def purge_finished(self, before: float) -> int:
        return sum(await self._per_queue("purge", await self._by_queue(None, None), lambda q: [_num(before)]))

    async def get(self, job_id: str, queue: str | None = None) -> JobRecord | None:
        found = await self.get_many([job_id], queue)
        return found[0] if found else None

    async def get_many(self, job_ids: Sequence[str], queue: str | None = None) -> list[JobRecord]:
        async def fetch(client: resp.Client) -> list[JobRecord]:
            queues = [queue] if queue is not None else await self._queues(client)
            return await self._records(client, [(q, job_id) for q in queues for job_id in job_ids])

        return await self._reach(fetch) if job_ids else []

    async def _records(self, client: resp.Client, jobs: Sequence[tuple[str, str]]) -> list[JobRecord]:
        """The records of these (queue, id) pairs that exist, in one pipelined round trip."""
        replies = await client.pipeline([("HGETALL", f"{self._base(q)}job:{job_id}") for q, job_id in jobs])
        return [self._record(_fields(flat)) for flat in replies if flat]

    async def list_jobs(
        self, *, status: Status | None = None, queue: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[JobRecord]:
        async def collect(client: resp.Client) -> list[JobRecord]:
            queues = [queue] if queue is not None else await self._queues(client)
            statuses = [status] if status is not None else list(Status)
            keys = []
            for q in queues:
                for st in statuses:
                    suffix = _STATUS_KEYS[st]
                    names = [f"ready:{p}" for p in range(3)] if suffix is None else [suffix]
                    keys += [(q, f"{self._base(q)}{name}") for name in names]
            found = await client.pipeline([("ZRANGE", key, 0, -1) for _, key in keys])
            return await self._records(client, [(q, job_id) for (q, _), ids in zip(keys, found, strict=True)
                                                for job_id in ids])

        records = await self._reach(collect)
        if status is Status.FAILED:
            records.sort(key=lambda r: (r.finished_at or 0.0, r.id), reverse=True)
        else:
            records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return records[offset : offset + limit]

    async def counts(self, now: float) -> dict[str, QueueCounts]:
        async def count(client: resp.Client) -> dict[str, QueueCounts]:
            queues = await self._queues(client)
            commands: list[resp.Command] = []
            for q in queues:
                base = self._base(q)
                for p in range(3):
                    commands.append(("ZCOUNT", f"{base}ready:{p}", "-inf", _num(now)))
                    commands.append(("ZCOUNT", f"{base}ready:{p}", f"({_num(now)}", "+inf"))
                commands += [("ZCARD", f"{base}{name}") for name in ("running", "done", "failed", "cancelled")]
            values = iter(await client.pipeline(commands))
            result = {}
            for q in queues:
                c = QueueCounts()
                for p in range(3):
                    c.waiting[Priority.from_rank(p).value] = next(values)
                    c.delayed += next(values)
                c.running, c.succeeded, c.failed, c.cancelled = next(values), next(values), next(values), next(values)
                if c.size or c.running or c.succeeded or c.failed or c.cancelled:
                    result[q] = c
            return result

        return await self._reach(count)

    async def _queues(self, client: resp.Client) -> list[str]:
        return sorted(await client.execute("SMEMBERS", f"{self.prefix}queues"))


    async def _by_queue(self, ids: Sequence[str] | None, queue: str | None) -> dict[str, list[Any]]:
        """The jobs with these ids grouped by queue. Without ids: every queue (or just
        ``queue``) with an empty list, which the scripts read as all of that queue's jobs."""
        queues = [queue] if queue is not None else await self._reach(self._queues)
        if ids is None:
            return {q: [] for q in queues}

        found = iter(await self._reach(lambda client: client.pipeline(
            [("EXISTS", f"{self._base(q)}job:{job_id}") for q in queues for job_id in ids])))
        groups = {q: [job_id for job_id in ids if next(found)] for q in queues}
        return {q: group for q, group in groups.items() if group}

    async def requeue_failed(self, ids: Sequence[str] | None, queue: str | None, now: float) -> list[str]:
        groups = await self._by_queue(ids, queue)
        moved = await self._per_queue("requeue_failed", groups, lambda q: [self.channel, q, _num(now)])
        return [job_id for group in moved for job_id in group]

    async def delete_failed(self, ids: Sequence[str] | None) -> int:
        return sum(await self._per_queue("delete_failed", await self._by_queue(ids, None), lambda q: []))

    def watch(self, callback: Callable[[str], None]) -> None:
        # On the background loop, where the workers the callback wakes live: a wake-up costs
        # no thread hop. A cluster forwards every PUBLISH to all nodes, so subscribing on the
        # node of the URL hears them all.
        if self._watcher is None:
            self._watcher = _loop.submit(self._subscribe(callback))

    async def _subscribe(self, callback: Callable[[str], None]) -> None:
        """Deliver wake-ups until cancelled, reconnecting with backoff when Redis goes away."""
        backoff = 0.1

        def subscribed() -> None:
            nonlocal backoff
            backoff = 0.1
            callback(WAKE_ALL)  # what was sent while away is lost: workers look now

        client = resp.Client(self.settings)
        while True:
            try:
                async for queue in client.subscribe(self.channel, subscribed):
                    callback(queue)
            except (ConnectionError, resp.ReplyError) as exc:
                logger.warning("SUBSCRIBE %s: wake-ups lost (%r); reconnecting in %.1fs", self.channel, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        here = asyncio.get_running_loop()
        for loop, (client, _) in list(self._clients.items()):  # closed clients are replaced on use
            if loop is here:
                client.close()
            elif loop.is_running():  # another thread's loop: close there, without waiting on it
                loop.call_soon_threadsafe(client.close)
            # a loop that has ended closed them at its end (see _client), or left them to the collector
        for blocking in list(self._blocking):
            blocking.close()


class _Waiter(Waiter):
    """Registers the worker in each queue's "idle" set, where the enqueue script finds it,
    and blocks on its inboxes on a connection of its own (a blocking pop holds it)."""

    def __init__(self, driver: RedisDriver, worker_id: str, queues: Sequence[str]) -> None:
        self.driver, self.worker_id, self.queues = driver, worker_id, list(queues)
        self.inboxes = [f"{driver._base(q)}inbox:{worker_id}" for q in queues]
        self.connection: resp.Connection | None = None

    async def wait(self, now: float, lease_timeout: float, timeout: float, wake: asyncio.Event,
                   start: Callable[[list[JobRecord]], None]) -> None:
        member = f"{_num(lease_timeout)} {self.worker_id}"
        await self.driver._script("idle", self.queues, [member, _num(now + timeout), self.worker_id])
        if self.connection is None or self.connection.lost is not None:
            self.connection = await self.driver._reach(lambda client: client.connect(self.inboxes[0]))
        popping = self.connection.send([("BLPOP", *self.inboxes, _num(timeout))])[0]

        def arrived(done: asyncio.Future[Any]) -> None:  # start it now, not a trip through the main task later
            if not done.cancelled() and done.exception() is None:
                start(self._records(_popped(done.result())))

        popping.add_done_callback(arrived)
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({popping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            # No more hand-overs; what came meanwhile; the "" this leaves ends the pop.
            handed = await self.driver._script("unidle", self.queues, [member, self.worker_id])
            try:
                await self.driver._reach(lambda _: popping)
            except resp.ReplyError:
                # ASK or MOVED: the inbox's slot is moving or has moved to another node. The
                # next wait connects to its owner then (its idle script waits out a move).
                self.connection.close()
        start(self._records(handed))

    def _records(self, jobs: list[str]) -> list[JobRecord]:
        return [self.driver._record(json.loads(job)) for job in jobs if job]

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


async def _close_at_loop_end(client: resp.Client) -> AsyncIterator[None]:
    try:
        yield
    finally:
        client.close()


def _popped(reply: list[str] | None) -> list[str]:
    """The job a BLPOP returned ([] when it timed out)."""
    return [reply[1]] if reply else []


def _fields(flat: list[str]) -> dict[str, str]:
    """A hash from its flat field/value list (a field given twice: the later value)."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


# The fields a dispatch stores, in the order the enqueue script's `fields` list names them.
ENQUEUE_FIELDS = ("id", "name", "payload", "priority", "status", "attempts", "max_attempts", "timeout", "run_at",
                  "created_at", "flow", "unique_key")


def _enqueue_args(records: Sequence[JobRecord]) -> dict[str, list[str]]:
    """The enqueue script's per-job arguments (ENQUEUE_FIELDS), grouped by queue."""
    by_queue: dict[str, list[str]] = {}
    for r in records:
        by_queue.setdefault(r.queue, []).extend((
            r.id, r.name, r.payload, str(r.priority.rank), r.status.value, str(r.attempts), str(r.max_attempts),
            "" if r.timeout is None else _num(r.timeout), _num(r.run_at), _num(r.created_at),
            "" if r.flow is None else json.dumps(r.flow), r.unique_key or "",
        ))
    return by_queue


def _ids_by_queue(jobs: Sequence[JobRecord]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for job in jobs:
        groups.setdefault(job.queue, []).append(job.id)
    return groups
