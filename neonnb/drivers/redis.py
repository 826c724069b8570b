"""Redis driver, on redis-py. The key layout and every state change are in
``redis_scripts.lua`` (one Lua script per change, called by SHA); what a URL means and which
client it makes (one server, a cluster, Sentinel, a unix socket) is in ``redis_client``.

The speed comes from the design, not the client: one script per state change, pipelines for
reads of many keys, batched acknowledgements, and the hand-off (an idle worker blocks on an
inbox the dispatch itself pushes to). Each event loop that calls the driver gets its own
client (asyncio connections belong to the loop that made them), so the driver works from any
loop like the others, without hopping threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .. import _loop
from ..errors import ConfigError, StoreError, StoreUnavailable
from ..records import (
    JobPage,
    JobRecord,
    Member,
    Priority,
    QueueCounts,
    Recovered,
    Status,
    listed_by_finish,
    page_cursor,
    read_cursor,
    read_member,
    read_record,
)
from .base import BlockingEnqueue, Driver, EventFeed, HandOff, PipelinedClaims, StoreClock, Waiter, WakeUps
from .redis_calls import SCRIPTS, SHAS, Client, slot_owner
from .redis_client import (
    ERRORS,
    NO_REPLY,
    NOT_RUN,
    TRANSIENT,
    AsyncClient,
    Settings,
    SyncClient,
    aclose,
    close_blocking,
    redis,
)
from .wakeups import WAKE_ALL

logger = logging.getLogger("neonnb.drivers.redis")
T = TypeVar("T")

_STATUS_KEYS = {
    Status.QUEUED: None, Status.RUNNING: "running", Status.SUCCEEDED: "done", Status.FAILED: "failed",
    Status.CANCELLED: "cancelled", Status.EXPIRED: "expired",
}


PERMITS = "_permits"  # the pseudo-queue whose slot holds the rate limits' permits
PURGE_PIECE = 1000  # queued jobs one purge script deletes
RESENDS = 3  # a command that may be sent again is, this many times, after a dropped connection


def _num(value: float) -> str:
    return repr(float(value))


class RedisDriver(Driver, BlockingEnqueue, EventFeed, HandOff, PipelinedClaims, StoreClock, WakeUps):
    claim_piece = 10

    def __init__(self, url: str, *, password: str | None = None, database: int | None = None,
                 prefix: str = "neonnb:", replica_acks: int = 0) -> None:
        if "{" in prefix or "}" in prefix:
            raise ConfigError(
                f"key_prefix {prefix!r} must not contain braces: neonnb puts each queue's name in "
                "a {hash tag} after the prefix so that a queue's keys share one Redis Cluster slot"
            )
        self.prefix = prefix
        self.channel = f"{prefix}wake"
        self.events_channel = f"{prefix}events"
        self.settings = Settings.from_url(url, password=password, database=database)
        acks = self.settings.replica_acks if self.settings.replica_acks is not None else replica_acks
        # Each job write waits for this many replicas, for most of the time a reply may take.
        self._replicas = (acks, int(self.settings.reply_timeout * 800)) if acks else None
        self._where = self.settings.where()  # for messages: never a password
        # Connections belong to the loop that made them: one client per loop, so a call from
        # the caller's loop goes straight to Redis instead of hopping threads. Beside each
        # client, what closes it at the loop's end (held here: a loop holds it only weakly).
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Client] = weakref.WeakKeyDictionary()
        self._connecting: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Task[Client]] = weakref.WeakKeyDictionary()
        self._registered: set[str] = set()  # queues this process has added to P.."queues"
        self._cluster = False  # known once the first loop has connected
        self._watcher: concurrent.futures.Future[None] | None = None
        self._listeners: set[concurrent.futures.Future[None]] = set()  # listen()s running
        # Each thread's own blocking client (enqueue_blocking); closed with the thread, or by close().
        self._thread = threading.local()
        self._blocking: list[SyncClient] = []

    # --- plumbing ---------------------------------------------------------------------

    async def _client(self) -> Client:
        loop = asyncio.get_running_loop()
        known = self._clients.get(loop)
        if known is not None and not known.closed:
            return known
        # One connect per loop, however many callers arrive while it runs.
        connecting = self._connecting.get(loop)
        if connecting is None:
            connecting = self._connecting[loop] = loop.create_task(self._connect(loop))
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting.pop(loop, None)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Client:
        client = Client(await self.settings.connect(), self._replicas)
        self._cluster = client.is_cluster
        # Closed with the loop: asyncio.run() (and pytest-asyncio) finalize a loop's async
        # generators before closing it, while it still runs. Without this every asyncio.run()
        # of a script left its connection open until the manager closed.
        self._clients[loop] = client
        await anext(client.closer)
        return client

    async def _reach(self, work: Callable[[Client], Awaitable[T]], resend: bool = True) -> T:
        """``work(client)``, and what to do when Redis does not answer it:

        - a cluster moving or electing a master for the slot (the command did not run): sent
          again until it runs, for at most the reply timeout;
        - a dropped connection, a demoted replica (whether it ran is not known): sent again
          up to RESENDS times, 50, 100, 200 ms apart, when ``resend``;
        - no reply within the reply timeout: StoreUnavailable at once;
        - anything Redis refuses: StoreUnavailable saying what it said."""
        deadline, attempt = None, 0
        while True:
            client = None
            try:
                client = await self._client()
                return await work(client)
            except redis.exceptions.AuthenticationError as exc:
                raise StoreUnavailable(f"Redis at {self._where} refused the credentials: {exc}") from exc
            except NO_REPLY as exc:
                raise self._no_reply() from exc
            except NOT_RUN as exc:
                deadline = deadline or time.monotonic() + self.settings.reply_timeout
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"Redis Cluster at {self._where} has been moving the slot of these keys to another node "
                        f"(or electing its master) for over {self.settings.reply_timeout:g}s: {exc}") from exc
                if client is not None and not isinstance(exc, redis.exceptions.TryAgainError):
                    await client.refresh()  # learn where the slot is now
                await asyncio.sleep(0.05)
            except TRANSIENT as exc:
                if not resend or attempt == RESENDS:
                    raise self._unreachable(exc) from exc
                if client is not None:
                    await client.refresh()  # on a cluster: a failover may have moved the master
                await asyncio.sleep(0.05 * 2**attempt)
                attempt += 1
            except ERRORS as exc:
                raise StoreError(f"Redis at {self._where} refused a command: {exc}") from exc

    def _no_reply(self) -> StoreUnavailable:
        return StoreUnavailable(f"Redis at {self._where} sent no reply within {self.settings.reply_timeout:g}s "
                                "(a hung server, or a network that drops packets)")

    def _unreachable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"Redis at {self._where} can't be reached: {type(exc).__name__}: {exc}")

    def _base(self, queue: str) -> str:
        """Where queue's keys start; {queue} is their Redis Cluster hash tag."""
        return f"{self.prefix}{{{queue}}}:"

    async def _script(self, name: str, queues: Sequence[str], args: Sequence[Any], resend: bool = True) -> Any:
        keys = [self._base(q) for q in queues]
        return await self._reach(lambda client: client.scripts[name](keys, args), resend)

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
        if len(queues) > 1 and (await self._client()).is_cluster:
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
        if self._replicas is not None or len(by_queue) != 1 or not by_queue.keys() <= self._registered:
            # (the loop's way also waits for the replicas replica_acks asks for)
            return False  # the loop's way registers a new queue, and runs one script per queue
        [(queue, args)] = by_queue.items()
        client = None
        try:
            client = self._blocking_client()
            # On a cluster, to the slot's owner only: an ASK or MOVED ends up on the loop's
            # way, which waits out a slot's move instead of following it (see redis_calls.Script).
            target = (client.get_node_from_key(self._base(queue)).redis_connection  # type: ignore[no-untyped-call]
                      if isinstance(client, redis.RedisCluster) else client)
            command = ("EVALSHA", SHAS["enqueue"], 1, self._base(queue), self.channel, queue, "new", *args)
            try:
                target.execute_command(*command)
            except redis.exceptions.NoScriptError:
                target.script_load(SCRIPTS["enqueue"])
                target.execute_command(*command)
        except ERRORS as exc:
            if client is not None:
                close_blocking(client)  # the next call starts afresh
                self._thread.client = None
            if isinstance(exc, NO_REPLY):  # a hung server: the loop's way would only wait as long again
                raise self._no_reply() from exc
            # Stored or not, the loop's way stores it (unless stored: the script skips an id
            # it has) or reports the outage after its resends.
            logger.debug("blocking enqueue failed, going through the loop: %s", exc)
            return False
        return True

    def _blocking_client(self) -> SyncClient:
        known = getattr(self._thread, "client", None)
        if known is None or known[1] != os.getpid():
            client = self.settings.connect_blocking()
            known = self._thread.client = (client, os.getpid())
            self._blocking.append(client)
        return known[0]

    async def _store(self, records: Sequence[JobRecord], mode: str) -> list[Any]:
        """Run the enqueue script once per queue; returns what each run returned."""
        by_queue = _enqueue_args(records)
        new = by_queue.keys() - self._registered
        if new:
            if not self._registered:
                await self._reach(self._warn_if_evicting)
            await self._reach(lambda client: client.redis.sadd(f"{self.prefix}queues", *new))
            self._registered |= new
        return await self._per_queue("enqueue", by_queue, lambda q: [self.channel, q, mode])

    async def _warn_if_evicting(self, client: Client) -> None:
        """Once, before this process's first dispatch: a Redis that evicts any key when it
        runs out of memory (maxmemory-policy allkeys-*) may drop queued jobs without a trace."""
        try:
            info = await client.redis.info("memory")
        except redis.exceptions.ResponseError:
            return  # INFO not allowed to this ACL user: nothing to say
        policies = {str(info["maxmemory_policy"])} if "maxmemory_policy" in info else {
            str(node.get("maxmemory_policy", "")) for node in info.values() if isinstance(node, dict)}  # per node
        policy = next((p for p in sorted(policies) if p.startswith("allkeys")), "")
        if policy:
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
        rounds = [[q] for q in queues] if (await self._reach(_same)).is_cluster else [list(queues)]
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

    async def take_permit(self, key: str, count: int, window: float, token: str) -> float:
        # Every permit in one slot of its own ({permits}), whichever queues the jobs are on.
        wait = await self._script("permit", [PERMITS], [key, count, _num(window), token])
        return float(wait)

    async def take_slot(self, queue: str, key: str, limit: int, job_id: str) -> bool:
        return bool(await self._script("slot", [queue], ["take", key, limit, job_id]))

    async def release_slot(self, queue: str, key: str, job_id: str) -> None:
        await self._script("slot", [queue], ["release", key, 0, job_id])

    async def configure_queue(self, queue: str, settings: dict[str, Any]) -> None:
        # A hash in the queue's own slot, where the dispatch script reads "paused" before
        # handing a job over; each value as JSON.
        key = f"{self._base(queue)}settings"
        commands: list[tuple[Any, ...]] = [("SADD", f"{self.prefix}queues", queue)]
        for name, value in settings.items():
            commands.append(("HDEL", key, name) if value is None else ("HSET", key, name, json.dumps(value)))
        for command in commands:  # (two slots: one at a time)
            await self._command(command)

    async def _command(self, command: tuple[Any, ...]) -> Any:
        return await self._reach(lambda client: client.redis.execute_command(*command))

    async def queue_settings(self) -> dict[str, dict[str, Any]]:
        async def read(client: Client) -> dict[str, dict[str, Any]]:
            queues = await self._queues(client)
            stored = await client.pipeline([("HGETALL", f"{self._base(q)}settings") for q in queues]) if queues else []
            return {q: settings for q, fields in zip(queues, stored, strict=True)
                    if (settings := _read_settings(fields))}

        return await self._reach(read)

    async def stopping(self, jobs: Sequence[JobRecord], worker_id: str) -> list[str]:
        asked = await self._per_queue("stopping", _ids_by_queue(jobs), lambda q: [worker_id])
        return [job_id for ids in asked for job_id in ids]

    async def reacquire(self, jobs: Sequence[JobRecord], worker_id: str, lease_expires: float) -> list[str]:
        groups: dict[str, list[Any]] = {}
        for job in jobs:
            groups.setdefault(job.queue, []).extend([job.id, str(job.attempts)])
        taken = await self._per_queue("reacquire", groups, lambda q: [worker_id, _num(lease_expires)])
        return [job_id for ids in taken for job_id in ids]

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

    async def server_time(self) -> float:
        reply = await self._reach(lambda client: client.redis.time())
        seconds, micros = next(iter(reply.values())) if isinstance(reply, dict) else reply  # a cluster: per node
        return int(seconds) + int(micros) / 1e6

    async def postpone(self, job: JobRecord, worker_id: str, run_at: float) -> bool:
        [moved] = await self._per_queue("release", {job.queue: [job.id]},
                                        lambda q: [self.channel, q, worker_id, "later", _num(run_at)])
        return bool(moved)

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

    async def purge_queued(self, queue: str) -> int:
        # A piece at a time: a script blocks the server while it runs.
        purged = 0
        while deleted := await self._script("purge_queued", [queue], [PURGE_PIECE]):
            purged += int(deleted)
        return purged

    async def get(self, job_id: str, queue: str | None = None) -> JobRecord | None:
        found = await self.get_many([job_id], queue)
        return found[0] if found else None

    async def get_many(self, job_ids: Sequence[str], queue: str | None = None) -> list[JobRecord]:
        async def fetch(client: Client) -> list[JobRecord]:
            queues = [queue] if queue is not None else await self._queues(client)
            return await self._records(client, [(q, job_id) for q in queues for job_id in job_ids])

        return await self._reach(fetch) if job_ids else []

    async def _records(self, client: Client, jobs: Sequence[tuple[str, str]]) -> list[JobRecord]:
        """The records of these (queue, id) pairs that exist, in one pipelined round trip."""
        replies = await client.pipeline([("HGETALL", f"{self._base(q)}job:{job_id}") for q, job_id in jobs])
        return [self._record(fields) for fields in replies if fields]

    async def list_jobs(
        self, *, status: Status | None = None, queue: str | None = None, limit: int = 100, offset: int = 0,
        cursor: str | None = None,
    ) -> JobPage:
        # A page reads the newest members of one sorted set per queue (the queue's "created"
        # set, or a finished state's own), merged: what it shows, not what the store holds.
        # Queued jobs walk "created" past those that are not queued; running ones, few, are
        # read whole from the running set.
        after = None if cursor is None else read_cursor(cursor)
        wanted = offset + limit + 1
        by_finish = listed_by_finish(status)

        async def collect(client: Client) -> list[tuple[float, str, JobRecord]]:
            queues = [queue] if queue is not None else await self._queues(client)
            if status is Status.RUNNING:
                return await self._running_listed(client, queues, after)
            name = _STATUS_KEYS[status] if by_finish and status is not None else "created"
            keys = [(q, f"{self._base(q)}{name}") for q in queues]
            walk = 100 if status is Status.QUEUED else 0  # queued: read ahead past the jobs that are not
            found: list[tuple[float, str, JobRecord]] = []
            position = after
            while len(found) < wanted:
                chunk = await self._newest(client, keys, max(wanted - len(found), walk), position)
                if not chunk:
                    break
                records = {r.id: r for r in await self._records(client, [(q, job_id) for _, job_id, q in chunk])}
                found += [(score, job_id, r) for score, job_id, _ in chunk
                          if (r := records.get(job_id)) is not None and (status is None or r.status is status)]
                position = chunk[-1][:2]
            return found

        found = (await self._reach(collect))[offset:]
        page = [record for _, _, record in found[:limit]]
        return JobPage(page, page_cursor(*found[limit - 1][:2]) if len(found) > limit else None)

    async def _newest(self, client: Client, keys: Sequence[tuple[str, str]], count: int,
                      after: tuple[float, str] | None) -> list[tuple[float, str, str]]:
        """The ``count`` newest (score, id, queue) of these sorted sets together, after the
        position ``after`` (a score and the id at it: equal scores order by id)."""
        commands: list[tuple[Any, ...]] = []
        for _, key in keys:
            top = "+inf" if after is None else f"({_num(after[0])}"
            commands.append(("ZREVRANGEBYSCORE", key, top, "-inf", "WITHSCORES", "LIMIT", 0, count))
            if after is not None:  # the ids that share the position's score
                commands.append(("ZRANGEBYSCORE", key, _num(after[0]), _num(after[0]), "WITHSCORES"))
        replies = iter(await client.pipeline(commands))
        merged = []
        for q, _ in keys:
            merged += [(score, job_id, q) for job_id, score in _pairs(next(replies))]
            if after is not None:
                merged += [(score, job_id, q) for job_id, score in _pairs(next(replies)) if job_id < after[1]]
        merged.sort(reverse=True)
        return merged[:count]

    async def _running_listed(self, client: Client, queues: Sequence[str],
                              after: tuple[float, str] | None) -> list[tuple[float, str, JobRecord]]:
        ids = await client.pipeline([("ZRANGE", f"{self._base(q)}running", 0, -1) for q in queues])
        records = await self._records(client, [(q, job_id) for q, group in zip(queues, ids, strict=True)
                                               for job_id in group])
        listed = [(r.created_at, r.id, r) for r in records if r.status is Status.RUNNING]
        return sorted((item for item in listed if after is None or item[:2] < after), reverse=True)

    async def counts(self, now: float) -> dict[str, QueueCounts]:
        async def count(client: Client) -> dict[str, QueueCounts]:
            queues = await self._queues(client)
            commands: list[tuple[Any, ...]] = []
            for q in queues:
                base = self._base(q)
                for p in range(3):
                    commands.append(("ZCOUNT", f"{base}ready:{p}", "-inf", _num(now)))
                    commands.append(("ZCOUNT", f"{base}ready:{p}", f"({_num(now)}", "+inf"))
                commands += [("ZCARD", f"{base}{name}")
                             for name in ("running", "done", "failed", "cancelled", "expired")]
            values = iter(await client.pipeline(commands))
            result = {}
            for q in queues:
                c = QueueCounts()
                for p in range(3):
                    c.waiting[Priority.from_rank(p).value] = next(values)
                    c.delayed += next(values)
                c.running, c.succeeded, c.failed, c.cancelled, c.expired = (next(values) for _ in range(5))
                if c.total:
                    result[q] = c
            return result

        return await self._reach(count)

    async def _queues(self, client: Client) -> list[str]:
        return sorted(map(str, await client.redis.smembers(f"{self.prefix}queues")))


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

    # The registry: one hash (one slot on a cluster), id -> the worker's or scheduler's entry as JSON.

    async def save_member(self, info: Member) -> None:
        await self._reach(lambda client: client.redis.hset(f"{self.prefix}workers", info.id, info.to_json()))

    async def remove_member(self, member_id: str) -> None:
        await self._reach(lambda client: client.redis.hdel(f"{self.prefix}workers", member_id))

    async def list_members(self) -> list[Member]:
        stored = await self._reach(lambda client: client.redis.hgetall(f"{self.prefix}workers"))
        return [info for text in stored.values() if (info := read_member(str(text))) is not None]

    async def drop_members(self, seen_before: float) -> int:
        gone = [info.id for info in await self.list_members() if info.last_seen < seen_before]
        if gone:
            await self._reach(lambda client: client.redis.hdel(f"{self.prefix}workers", *gone))
        return len(gone)

    def watch(self, callback: Callable[[str], None]) -> None:
        # On the background loop, where the workers the callback wakes live: a wake-up costs
        # no thread hop. A cluster forwards every PUBLISH to all nodes, so subscribing on the
        # node of the URL hears them all.
        if self._watcher is None:
            self._watcher = _loop.submit(self._subscribe(self.channel, callback))

    async def publish(self, message: str) -> None:
        await self._reach(lambda client: client.redis.publish(self.events_channel, message))

    def listen(self, callback: Callable[[str], None]) -> Callable[[], None]:
        listening = _loop.submit(self._subscribe(self.events_channel, callback))
        self._listeners.add(listening)

        def stop() -> None:
            listening.cancel()
            self._listeners.discard(listening)

        return stop

    async def _subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        """Deliver ``channel``'s messages until cancelled, reconnecting with backoff when
        Redis goes away (on a cluster, to the next node: PUBLISH reaches them all); on each
        connect, ``WAKE_ALL`` first."""
        backoff, attempt = 0.1, 0
        while True:
            subscriber = None
            try:
                subscriber = await self._subscriber(attempt)
                async with subscriber.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    async for message in pubsub.listen():
                        if message["type"] == "subscribe":
                            backoff = 0.1
                            callback(WAKE_ALL)  # what was sent while away is lost: workers look now
                        elif message["type"] == "message":
                            callback(message["data"])
            except (redis.exceptions.RedisError, OSError, StoreUnavailable) as exc:
                logger.warning("SUBSCRIBE %s: messages lost (%r); reconnecting in %.1fs", channel, exc, backoff)
            finally:
                if subscriber is not None:
                    await aclose(subscriber)
            attempt += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _subscriber(self, attempt: int) -> AsyncClient:
        if self.settings.kind == "tcp":
            client = await self._reach(_same)
            if client.is_cluster:
                nodes = client.redis.get_nodes()  # type: ignore[union-attr]
                node = nodes[attempt % len(nodes)]
                return self.settings.node(str(node.host), int(node.port), reply_timeout=None)
        return await self.settings.connect(reply_timeout=None)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        for listening in list(self._listeners):
            listening.cancel()
        here = asyncio.get_running_loop()
        # A connect still in flight (the watcher's, a worker's) would store its client after
        # this close, open for good: it is closed once it is made.
        for loop, connecting in list(self._connecting.items()):
            if loop is here:
                await _close_when_made(connecting)
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(_close_when_made(connecting), loop)
        for loop, client in list(self._clients.items()):  # closed clients are replaced on use
            if loop is here:
                await client.close()
            elif loop.is_running():  # another thread's loop: close there, without waiting on it
                asyncio.run_coroutine_threadsafe(client.close(), loop)
            # a loop that has ended closed them at its end (see _client), or left them to the collector
        for blocking in self._blocking:
            close_blocking(blocking)
        self._blocking.clear()
        self._thread = threading.local()


class _Waiter(Waiter):
    """Registers the worker in each queue's "idle" set, where the enqueue script finds it,
    and blocks on its inboxes on a client of its own, without a reply timeout (a blocking
    pop holds its connection)."""

    def __init__(self, driver: RedisDriver, worker_id: str, queues: Sequence[str]) -> None:
        self.driver, self.worker_id, self.queues = driver, worker_id, list(queues)
        self.inboxes = [f"{driver._base(q)}inbox:{worker_id}" for q in queues]
        self.client: AsyncClient | None = None

    async def wait(self, now: float, lease_timeout: float, timeout: float, wake: asyncio.Event,
                   start: Callable[[list[JobRecord]], None]) -> None:
        member = f"{_num(lease_timeout)} {self.worker_id}"
        await self.driver._script("idle", self.queues, [member, _num(now + timeout), self.worker_id])
        if self.client is None:
            self.client = await self.driver._reach(self._connect)
        popping = asyncio.ensure_future(self.client.blpop(self.inboxes, timeout))

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
                await self.driver._reach(lambda _: popping, resend=False)
            except StoreUnavailable:
                # The connection went (or the inbox's slot moved): the next wait connects anew.
                await self.close()
        start(self._records(handed))

    async def _connect(self, client: Client) -> AsyncClient:
        """A connection of the waiter's own, without a reply timeout; on a cluster, to the
        node of its one queue's slot (a cluster waiter waits on one queue)."""
        if isinstance(client.redis, redis.asyncio.RedisCluster):
            node = slot_owner(client.redis, self.inboxes[0])
            return self.driver.settings.node(str(node.host), int(node.port), reply_timeout=None)
        return await self.driver.settings.connect(reply_timeout=None)

    def _records(self, jobs: list[str]) -> list[JobRecord]:
        return [self.driver._record(json.loads(job)) for job in jobs if job]

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await aclose(client)


async def _close_when_made(connecting: asyncio.Task[Client]) -> None:
    try:
        client = await asyncio.shield(connecting)
    except Exception:  # it failed: nothing was made
        return
    await client.close()


async def _same(client: Client) -> Client:
    return client


def _popped(reply: list[str] | None) -> list[str]:
    """The job a BLPOP returned ([] when it timed out)."""
    return [reply[1]] if reply else []


def _fields(flat: list[str]) -> dict[str, str]:
    """A hash from its flat field/value list (a field given twice: the later value)."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


_compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# The fields a dispatch stores, in the order the enqueue script's `fields` list names them.
ENQUEUE_FIELDS = ("id", "name", "payload", "priority", "status", "attempts", "max_attempts", "timeout", "run_at",
                  "created_at", "flow", "unique_key")


def _enqueue_args(records: Sequence[JobRecord]) -> dict[str, list[str]]:
    """The enqueue script's per-job arguments (each a JSON array of ENQUEUE_FIELDS), grouped by queue."""
    by_queue: dict[str, list[str]] = {}
    for r in records:
        by_queue.setdefault(r.queue, []).append(_compact_json((
            r.id, r.name, r.payload, str(r.priority.rank), r.status.value, str(r.attempts), str(r.max_attempts),
            "" if r.timeout is None else _num(r.timeout), _num(r.run_at), _num(r.created_at),
            "" if r.flow is None else json.dumps(r.flow), r.unique_key or "",
        )))
    return by_queue


def _ids_by_queue(jobs: Sequence[JobRecord]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for job in jobs:
        groups.setdefault(job.queue, []).append(job.id)
    return groups


def _pairs(reply: Any) -> list[tuple[str, float]]:
    """(member, score) pairs of a WITHSCORES reply, flat or already paired."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(str(member), float(score)) for member, score in reply]
    return [(str(reply[i]), float(reply[i + 1])) for i in range(0, len(reply), 2)]


def _read_settings(fields: Any) -> dict[str, Any]:
    """A queue's settings hash (a dict, or a flat list from a pipeline); values this version
    can't read are left out."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    settings = {}
    for name, text in (fields or {}).items():
        with contextlib.suppress(ValueError):
            settings[str(name)] = json.loads(text)
    return settings
