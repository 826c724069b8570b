"""How the Redis driver talks to redis-py: each event loop's client with the scripts of
``redis_scripts.lua`` (called by SHA, loaded where missing) and pipelines."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

from ..errors import ConfigError, StoreUnavailable
from .redis_client import ERRORS, AsyncClient, aclose, redis


def _read_scripts() -> dict[str, str]:
    """Each script of the file, with the file's ``_prelude`` (shared helpers) in front."""
    text = resources.files("neonnb.drivers").joinpath("redis_scripts.lua").read_text()
    bodies = dict(part.split("\n", 1) for part in text.split("--! ")[1:])
    prelude = bodies.pop("_prelude")
    return {name.strip(): prelude + body for name, body in bodies.items()}


SCRIPTS = _read_scripts()
SHAS = {name: hashlib.sha1(body.encode()).hexdigest() for name, body in SCRIPTS.items()}


# Scripts that store or change no job: never waited on for replicas.
NO_JOB_WRITES = frozenset({"idle", "unidle", "stopping"})


class Client:
    """One loop's redis-py client, its scripts, and what closes it at the loop's end.
    ``replicas``: (how many, within how many ms) every job write waits for (Redis ``WAIT``)."""

    def __init__(self, client: AsyncClient, replicas: tuple[int, int] | None = None) -> None:
        self.redis = client
        self.is_cluster = isinstance(client, redis.asyncio.RedisCluster)
        if replicas is not None and self.is_cluster:
            raise ConfigError("replica_acks works with a single Redis server or Sentinel, not a Redis Cluster "
                              "(each write would have to wait on its own slot's master); leave it at 0")
        self.scripts = {name: Script(client, name, None if name in NO_JOB_WRITES else replicas) for name in SCRIPTS}
        self.closed = False
        self.closer = close_at_loop_end(self)

    async def pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Commands sent together, answered together (on a cluster: per node)."""
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()

    async def refresh(self) -> None:
        """On a cluster, read which node holds which slot again."""
        if isinstance(self.redis, redis.asyncio.RedisCluster):
            with contextlib.suppress(*ERRORS):  # the next command says whether it helped
                await self.redis.nodes_manager.initialize()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await aclose(self.redis)


class Script:
    """One script, called by SHA (loaded where it is missing). On a cluster it goes to the
    node that owns its keys' slot, and never to the node an ASK points at: a script reads
    and writes keys it does not declare (a job's hash, its queue's sets), and while a slot
    moves, those are split between the two nodes. So an ASK (or TRYAGAIN) means: wait for
    the move to end (``_reach`` sends it again)."""

    def __init__(self, client: AsyncClient, name: str, replicas: tuple[int, int] | None = None) -> None:
        self.client, self.name, self.replicas = client, name, replicas

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        target: Any = self.client
        if isinstance(self.client, redis.asyncio.RedisCluster):
            target = slot_owner(self.client, keys[0])
        command = ("EVALSHA", SHAS[self.name], len(keys), *keys, *args)
        try:
            return await self._run(target, command)
        except redis.exceptions.NoScriptError:
            await target.execute_command("SCRIPT", "LOAD", SCRIPTS[self.name])
            return await self._run(target, command)
        except redis.exceptions.MovedError as exc:  # the move is over: its new owner, from now on
            nodes = self.client.nodes_manager  # type: ignore[union-attr]
            move_slot = getattr(nodes, "move_slot", None)  # redis-py 6 and later; before, read the map anew
            await (move_slot(exc) if move_slot is not None else nodes.initialize())
            raise


    async def _run(self, target: Any, command: tuple[Any, ...]) -> Any:
        if self.replicas is None:
            return await target.execute_command(*command)
        # WAIT counts the replicas that hold this connection's writes: it goes on the same one.
        pipe = target.pipeline(transaction=False)
        pipe.execute_command(*command)
        pipe.execute_command("WAIT", *self.replicas)
        reply, acked = await pipe.execute()
        check_replicas(int(acked), self.replicas)
        return reply


def check_replicas(acked: int, replicas: tuple[int, int]) -> None:
    wanted, within = replicas
    if acked < wanted:
        raise StoreUnavailable(f"only {acked} of the {wanted} replica(s) replica_acks asks for acknowledged the write "
                               f"within {within / 1000:g}s: it is on the master, but may be lost if the master fails "
                               "now (a failover under way, a replica down)")


def slot_owner(cluster: redis.asyncio.RedisCluster, key: str) -> Any:
    """The node that holds ``key``'s slot, as the client's slot map says."""
    node = cluster.get_node_from_key(key)
    if node is None:
        raise redis.exceptions.SlotNotCoveredError(f"no node holds the slot of {key!r}")
    return node


async def close_at_loop_end(client: Client) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await client.close()
