"""How the Redis driver talks to redis-py: each event loop's client with the scripts of
``redis_scripts.lua`` (called by SHA, loaded where missing) and pipelines."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

from .redis_client import ERRORS, AsyncClient, aclose, redis


def _read_scripts() -> dict[str, str]:
    """Each script of the file, with the file's ``_prelude`` (shared helpers) in front."""
    text = resources.files("neonnb.drivers").joinpath("redis_scripts.lua").read_text()
    bodies = dict(part.split("\n", 1) for part in text.split("--! ")[1:])
    prelude = bodies.pop("_prelude")
    return {name.strip(): prelude + body for name, body in bodies.items()}


SCRIPTS = _read_scripts()
SHAS = {name: hashlib.sha1(body.encode()).hexdigest() for name, body in SCRIPTS.items()}


class Client:
    """One loop's redis-py client, its scripts, and what closes it at the loop's end."""

    def __init__(self, client: AsyncClient) -> None:
        self.redis = client
        self.is_cluster = isinstance(client, redis.asyncio.RedisCluster)
        self.scripts = {name: Script(client, name) for name in SCRIPTS}
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

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client, self.name = client, name

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        target: Any = self.client
        if isinstance(self.client, redis.asyncio.RedisCluster):
            target = slot_owner(self.client, keys[0])
        command = ("EVALSHA", SHAS[self.name], len(keys), *keys, *args)
        try:
            return await target.execute_command(*command)
        except redis.exceptions.NoScriptError:
            await target.execute_command("SCRIPT", "LOAD", SCRIPTS[self.name])
            return await target.execute_command(*command)
        except redis.exceptions.MovedError as exc:  # the move is over: its new owner, from now on
            nodes = self.client.nodes_manager  # type: ignore[union-attr]
            move_slot = getattr(nodes, "move_slot", None)  # redis-py 6 and later; before, read the map anew
            await (move_slot(exc) if move_slot is not None else nodes.initialize())
            raise


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
