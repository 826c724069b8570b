"""The SQL driver's engines: one made from a URL (the DBAPI each database gets when it names
none), SQLite's set-up (WAL, BEGIN IMMEDIATE), and the turns SQLite writers take."""

from __future__ import annotations

import functools
import os
import sys
import threading
import weakref
from typing import Any

if sys.platform != "win32":
    import fcntl

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError

from ..config import redact
from ..errors import ConfigError, MissingExtra, StoreError, StoreUnavailable


def sqlite_engine(url: str) -> Engine:
    # A statement waits up to a minute for another connection's write lock.
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        prepare_sqlite(dbapi_connection)

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


_lenient_text = functools.partial(str, encoding="utf-8", errors="replace")


def prepare_sqlite(dbapi_connection: Any) -> None:
    """Every neonnb connection to a SQLite file: WAL, and transactions begun explicitly."""
    # Take transaction control from pysqlite so BEGIN IMMEDIATE is what runs.
    dbapi_connection.isolation_level = None
    # SQLite stores whatever bytes it is given as text; strict decoding would make one bad
    # value fail every read that touches its row (a claim, a listing). As on Redis, a byte
    # that isn't UTF-8 reads as U+FFFD, and the job it spoils fails alone.
    dbapi_connection.text_factory = _lenient_text
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # A returned dispatch survives any process crash; a power cut may take the last
    # commits (WAL with synchronous=NORMAL, huey's default too). FULL would fsync each.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class WriterTurns:
    """Writers to one SQLite file take turns: this process's threads on a lock, processes on
    an flock of a file beside the database (not on Windows). Both wake the next writer the
    moment the last one is done, and the Interrupt button can break the wait; SQLite's own
    busy handler sleeps in steps of 1 to 100 ms."""

    def __init__(self, database: str) -> None:
        self._threads = threading.Lock()
        self._path = f"{database}-neonnb-lock"
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._take(blocking=True)

    def enter_now(self) -> bool:
        """Take the turn only if no writer holds it now; True if taken (leave with __exit__)."""
        return self._take(blocking=False)

    def _take(self, blocking: bool) -> bool:
        if not self._threads.acquire(blocking=blocking):
            return False
        if sys.platform == "win32":
            return True
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
                # Not at exit (the OS closes it then): a manager closed at exit still takes its turn.
                weakref.finalize(self, os.close, self._fd).atexit = False
            fcntl.flock(self._fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:  # another process's turn
            self._threads.release()
            return False
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *_exc: object) -> None:
        if sys.platform != "win32" and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()


# Held by the drivers: once none is left on a file, its turns and lock file descriptor go.
_writer_turns: weakref.WeakValueDictionary[str, WriterTurns] = weakref.WeakValueDictionary()
_writer_turns_guard = threading.Lock()


def turns_for(database: str | None) -> WriterTurns:
    """One set of turns per SQLite file in this process, shared by every driver on it."""
    path = os.path.realpath(database or "")
    with _writer_turns_guard:
        return _writer_turns.setdefault(path, WriterTurns(path))


# The DBAPI each database gets when the URL names none, and the extra that installs it.
_DEFAULT_DBAPI = {"postgresql": ("psycopg", "postgres"), "mysql": ("pymysql", "mysql"), "mariadb": ("pymysql", "mysql")}


def engine_for(connection: str) -> Engine:
    url = make_url(connection)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ConfigError(
                "Config.connection: an in-memory SQLite database can't be shared between "
                "threads and processes; use driver='memory' or a file such as sqlite:///jobs.db"
            )
        return sqlite_engine(connection)
    dbapi, extra = _DEFAULT_DBAPI.get(backend, (None, None))
    if dbapi is not None and "+" not in url.drivername:
        url = url.set(drivername=f"{backend}+{dbapi}")
    try:
        return create_engine(url, pool_size=10, max_overflow=10)
    except NoSuchModuleError:
        raise ConfigError(
            f"Config.connection {url.drivername}://: SQLAlchemy knows no database {backend!r}; the database "
            "driver takes sqlite:///jobs.db, postgresql://host/db or mysql://host/db"
        ) from None
    except ModuleNotFoundError as exc:
        hint = f"pip install 'neonnb[{extra}]'" if extra else f"install the DBAPI module {exc.name}"
        raise MissingExtra(f"Config.connection {url.drivername}:// needs {exc.name}: {hint}") from None


def unreachable(where: str, cause: object) -> StoreUnavailable:
    """The database ``where`` (a URL without its password) can't be reached."""
    return StoreUnavailable(redact(f"the database {where} can't be reached: {cause}"))


def refused(where: str, cause: object) -> StoreError:
    """The database ``where`` refused a statement."""
    return StoreError(redact(f"the database {where} refused a statement: {cause}"))
