"""SQLite: a worker's calls (claims, acknowledgements, leases, progress) and one-job async
dispatches run on the caller's thread, on a sqlite3 connection of the driver's own, whenever
the write lock is free at that moment.

The hop to the driver's thread costs more than such a call, and so does SQLAlchemy's execution
path: several times the database's own work, more still on a cold cache, as between jobs that
arrive some milliseconds apart. The statements SQLAlchemy built are compiled once
(``CompiledStatements``) and run on the raw connection.

They never wait here: the turn is taken only if free (``WriterTurns.enter_now``) and the
connection gives up at once on a lock held outside neonnb (busy timeout 0). ``transaction``
then says it did not run, and the driver sends the call to its thread, which waits its turn.
The connection is used only while this process's turn is held, so threads never share it at
once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from .sql_compiled import CompiledStatements
from .sql_engine import WriterTurns, prepare_sqlite, refused, unreachable

T = TypeVar("T")
# A statement's rows as dicts; a list of parameter sets runs it once per set (no rows).
Run = Callable[[Any, "Mapping[str, Any] | Sequence[Mapping[str, Any]]"], list[dict[str, Any]]]


class SqliteHere:
    def __init__(self, path: str, turns: WriterTurns, where: str, statements: CompiledStatements) -> None:
        self._path = path
        self._turns = turns
        self._where = where
        self._statements = statements
        self._conn: sqlite3.Connection | None = None

    def transaction(self, fn: Callable[[Run], T]) -> tuple[bool, T | None]:
        """``(True, fn(run))`` in one transaction on this thread if the write turn is free now,
        else ``(False, None)`` with nothing done."""
        if not self._turns.enter_now():
            return False, None
        try:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "database is locked" in str(exc):  # a writer outside neonnb: BEGIN IMMEDIATE refused
                    return False, None
                raise
            try:
                value = fn(lambda statement, params: self._run(conn, statement, params))
                conn.execute("COMMIT")
                return True, value
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:  # the file can't be opened, read or written
            raise unreachable(self._where, exc) from exc
        except sqlite3.Error as exc:
            raise refused(self._where, exc) from exc
        finally:
            self._turns.__exit__()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, timeout=0, check_same_thread=False)
            prepare_sqlite(conn)
            self._conn = conn
        return self._conn

    def _run(self, conn: sqlite3.Connection, statement: Any,
             params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if not isinstance(params, Mapping):
            for each in params:
                conn.execute(*self._statements.render(statement, each))
            return []
        cursor = conn.execute(*self._statements.render(statement, params))
        if cursor.description is None:
            return []
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def close(self) -> None:
        if self._conn is None:  # never opened (the file may not even be reachable)
            return
        with self._turns:  # not while another thread runs a call on it
            if self._conn is not None:
                self._conn.close()
                self._conn = None
