"""PostgreSQL: a sync one-job dispatch (``dispatch`` from a notebook cell or a script) on a
psycopg connection of the driver's own, on the calling thread.

Through SQLAlchemy such a dispatch spent about as long in the pool's check-out and return and
the execution path as PostgreSQL took for the INSERT. The statement SQLAlchemy built is
compiled once (``CompiledStatements``). There is one connection, taken only if free: a second thread
dispatching at the same moment goes through SQLAlchemy as before, instead of waiting here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import psycopg

from .pg_async import failure
from .sql_compiled import CompiledStatements


class DispatchConnection:
    def __init__(self, connect: dict[str, Any], where: str, statements: CompiledStatements) -> None:
        self._connect = connect
        self._where = where
        self._statements = statements
        self._free = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    def run(self, statement: Any, params: Mapping[str, Any]) -> bool:
        """Run ``statement`` (safe to repeat) on this thread; False if another thread has the
        connection now, with nothing done. Tried once more on a fresh connection if the first
        had died (a server restart)."""
        if not self._free.acquire(blocking=False):
            return False
        try:
            for attempt in (1, 2):
                try:
                    if self._conn is None:
                        self._conn = psycopg.connect(**self._connect, autocommit=True)
                    self._conn.execute(*self._statements.render(statement, params))
                    return True
                except psycopg.Error as exc:
                    lost = self._conn is None or self._conn.broken or self._conn.closed
                    if lost:
                        self._drop()
                        if attempt == 1:
                            continue
                    raise failure(self._where, exc, lost) from exc
            raise AssertionError("unreachable")
        finally:
            self._free.release()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def close(self) -> None:
        with self._free:
            self._drop()
