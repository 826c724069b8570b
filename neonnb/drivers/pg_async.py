"""The PostgreSQL driver's hot path (claims, acknowledgements, leases, progress) on psycopg's
AsyncConnection, on the event loop of the worker that calls it.

Through the driver's thread pool each of these calls paid for the hop to a thread and back,
SQLAlchemy's execution path, and the GIL shared with the worker's sync jobs: about three
times what PostgreSQL took for the statement. Here the statements SQLAlchemy built are
compiled once to psycopg's SQL and run on a connection of the caller's loop.

An async connection belongs to the loop it was made on, and a driver may serve several loops
(neonnb's own loop thread, a notebook's kernel loop, a ``neonnb worker``'s), so each loop gets
its own few connections (``_LoopConnections``). psycopg_pool's pool is not used: with the
server down it waits its whole timeout for a connection, logging each failed attempt, where a
worker must hear at once that the store is unreachable (it then backs off and says so).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .._loop import running_loop
from ..errors import StoreError
from .sql_compiled import CompiledStatements
from .sql_engine import refused, unreachable

# Connections per loop and durability. A worker's calls are short and few at a time (one claim,
# one batched acknowledgement, a lease renewal, progress); more wait their turn.
CONNECTIONS_PER_LOOP = 4
# Worker bookkeeping may skip the commit's fsync (DatabaseDriver explains why); outcomes may not.
_RELAXED = "-c synchronous_commit=off"


class _LoopConnections:
    """The connections of one event loop: reused while healthy, a broken one dropped, a new
    one made on demand up to CONNECTIONS_PER_LOOP (a refused connection raises at once)."""

    def __init__(self, connect: dict[str, Any]) -> None:
        self._connect = connect
        self._idle: list[psycopg.AsyncConnection[dict[str, Any]]] = []
        self._opened = 0
        self._freed = asyncio.Condition()
        self._finished = False

    async def take(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        async with self._freed:
            while not self._idle and self._opened >= CONNECTIONS_PER_LOOP:
                await self._freed.wait()
            if self._idle:
                return self._idle.pop()
            self._opened += 1
        try:
            return await psycopg.AsyncConnection.connect(**self._connect, autocommit=True, row_factory=dict_row)
        except BaseException:
            await self.give_back(None, reusable=False)
            raise

    async def give_back(self, conn: psycopg.AsyncConnection[dict[str, Any]] | None, reusable: bool) -> None:
        """Back to the idle ones if ``reusable`` and healthy, else closed."""
        async with self._freed:
            if conn is None or not reusable or conn.closed or conn.broken or self._finished:
                self._opened -= 1
                if conn is not None:
                    conn.pgconn.finish()
            else:
                self._idle.append(conn)
            self._freed.notify()

    def finish(self) -> None:
        """Close the idle connections; those in use close when given back."""
        self._finished = True
        idle, self._idle = self._idle, []
        self._opened -= len(idle)
        for conn in idle:
            conn.pgconn.finish()  # libpq's close: a sync call, so any thread or loop state will do


class AsyncStatements:
    """Runs compiled hot statements on the calling loop's connections. Errors come out as the
    driver's others do: StoreUnavailable when the server can't be reached, StoreError when it
    refused the statement, naming the database but never its password."""

    def __init__(self, connect: dict[str, Any], where: str, statements: CompiledStatements) -> None:
        self._statements = statements
        self._connect = {durable: connect if durable else {**connect, "options": _options(connect)}
                         for durable in (True, False)}
        self._where = where
        self._loops: dict[asyncio.AbstractEventLoop, dict[bool, _LoopConnections]] = {}

    def _connections(self, durable: bool) -> _LoopConnections:
        loop = asyncio.get_running_loop()
        mine = self._loops.get(loop)
        if mine is None:
            self._close_where(lambda other: other.is_closed())  # a loop that ended (asyncio.run) left its own
            mine = self._loops[loop] = {d: _LoopConnections(self._connect[d]) for d in (True, False)}
        return mine[durable]

    async def rows(self, statement: Any, params: Mapping[str, Any], durable: bool,
                   repeatable: bool = True) -> list[dict[str, Any]]:
        """The rows a SQLAlchemy ``statement`` returns. Tried once more on a fresh connection if
        the first one had died (a server restart), unless not ``repeatable``: it may have died
        after the server did the work, its reply lost."""
        connections = self._connections(durable)
        for attempt in (1, 2):
            conn = await self._take(connections)
            reusable = False  # cancelled mid-statement (a worker stopping), its state is unknown: closed
            try:
                cursor = await conn.execute(*self._statements.render(statement, params))
                rows = await cursor.fetchall() if cursor.description is not None else []
                reusable = True
                return rows
            except psycopg.Error as exc:
                reusable = True  # the server answered (or the connection is broken, and give_back sees it)
                if (conn.broken or conn.closed) and repeatable and attempt == 1:
                    continue
                raise failure(self._where, exc, conn.broken or conn.closed) from exc
            finally:
                await connections.give_back(conn, reusable)
        raise AssertionError("unreachable")

    async def _take(self, connections: _LoopConnections) -> psycopg.AsyncConnection[dict[str, Any]]:
        try:
            return await connections.take()
        except psycopg.Error as exc:
            raise failure(self._where, exc, True) from exc

    def close(self) -> None:
        """Close every loop's connections (from any thread: libpq closes synchronously)."""
        self._close_where(lambda _loop: True)

    def _close_where(self, which: Callable[[asyncio.AbstractEventLoop], bool]) -> None:
        for loop in [loop for loop in self._loops if which(loop)]:
            for mine in self._loops.pop(loop).values():
                if loop.is_running() and loop is not running_loop():
                    loop.call_soon_threadsafe(mine.finish)  # its own thread may be using one now
                else:
                    mine.finish()


def failure(where: str, exc: psycopg.Error, lost: bool) -> StoreError:
    """psycopg's error as the driver's: the database ``where`` unreachable (or the connection
    ``lost``), or refusing the statement; never with the password."""
    if lost or isinstance(exc, psycopg.OperationalError):
        return unreachable(where, exc)
    return refused(where, exc)


def _options(connect: dict[str, Any]) -> str:
    given = connect.get("options")
    return f"{given} {_RELAXED}" if given else _RELAXED

