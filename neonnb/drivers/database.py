"""SQL driver on SQLAlchemy 2 Core: SQLite (the embedded default), PostgreSQL, MariaDB/MySQL.

Statements run on a small thread pool so the event loop never blocks, except a worker's own
calls where they can be made on its loop: on PostgreSQL over psycopg's async connection
(``pg_async.py``), on SQLite on the caller's thread whenever the write lock is free at once
(``sqlite_here.py``). A claim selects due rows in priority order with ``FOR UPDATE SKIP LOCKED``
(one statement where the database has ``UPDATE ... RETURNING``, else a short transaction) and
flips them to running; on SQLite every transaction starts with ``BEGIN IMMEDIATE`` so two
processes can't claim the same row. The hot statements are built once (``HotStatements``);
PostgreSQL runs single statements in autocommit, takes batches with COPY and wakes idle
workers with LISTEN/NOTIFY (``pg_notify.py``); SQLite wakes them through ``PRAGMA
data_version`` (``sqlite_watch.py``). Engines and SQLite's writer turns: ``sql_engine.py``;
the table and its statements: ``sql_schema.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar, cast

import sqlalchemy.exc
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from ..errors import ConfigError
from ..records import (
    JobPage,
    JobRecord,
    Member,
    Priority,
    QueueCounts,
    Recovered,
    Status,
    bad_cursor,
    ended,
    given_back,
    listed_by_finish,
    page_cursor,
    read_cursor,
    read_member,
    read_record,
    requeued,
    retried,
    revived,
)
from . import sql_messages
from .base import BlockingEnqueue, Driver, EventFeed, PipelinedClaims, StoreClock, WakeUps
from .pg_notify import Listener, announce, install_trigger
from .sql_compiled import CompiledStatements
from .sql_engine import engine_for, refused, turns_for, unreachable
from .sql_messages import MessagePoller
from .sql_schema import (
    CANCELLED,
    ENQUEUED_COLUMNS,
    EXPIRED,
    FAILED,
    FINISHED_STATES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    HotStatements,
    add_missing_columns,
    enqueued_row,
    insert_ignoring,
    jobs_table,
    mysql_lock,
    store_values_uncompressed,
)
from .sqlite_here import Run, SqliteHere
from .sqlite_watch import Watcher

if TYPE_CHECKING:
    from .pg_async import AsyncStatements
    from .pg_dispatch import DispatchConnection

T = TypeVar("T")
_BANDS = {p.rank: p.value for p in Priority}
_COUNTED = {"delayed", RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED}
CLAIM_PIECE = 100  # jobs per claim statement on PostgreSQL, for a worker with more free slots

class DatabaseDriver(Driver, BlockingEnqueue, EventFeed, PipelinedClaims, StoreClock, WakeUps):
    def __init__(self, connection: str | Engine, table_name: str = "neonnb_jobs") -> None:
        if isinstance(connection, Engine):
            self.engine, self._owns_engine = connection, False
        elif isinstance(connection, str):
            self.engine, self._owns_engine = engine_for(connection), True
        else:
            raise ConfigError(
                f"Config.connection must be a database URL or a SQLAlchemy Engine, got {type(connection).__name__}"
            )
        dialect = self.engine.dialect.name
        self.table = jobs_table(table_name)
        self.marks = self.table.metadata.tables[f"{table_name}_marks"]
        self.workers = self.table.metadata.tables[f"{table_name}_workers"]
        self.queues = self.table.metadata.tables[f"{table_name}_queues"]
        self.permits = self.table.metadata.tables[f"{table_name}_permits"]
        self.slots = self.table.metadata.tables[f"{table_name}_slots"]
        self.messages = self.table.metadata.tables[f"{table_name}_messages"]
        self._trimmed_at = 0.0
        self._insert_mark = insert_ignoring(self.marks, dialect)
        self._insert_new = insert_ignoring(self.table, dialect)
        self._insert_one_named = self._insert_new.values(
            {name: bindparam(name, type_=self.table.c[name].type) for name in ENQUEUED_COLUMNS})
        self._sql = HotStatements(
            self.table, dialect == "postgresql", dialect in ("mysql", "mariadb"), self.engine.dialect.paramstyle,
            self.engine.dialect.identifier_preparer.quote(table_name),
        )
        self._returning = self.engine.dialect.update_returning
        # On PostgreSQL a single statement needs no BEGIN/COMMIT round trips: run it in
        # autocommit. Elsewhere every call is a transaction (BEGIN IMMEDIATE on SQLite).
        self._postgres = dialect == "postgresql"
        self._packet: int | None = None  # MariaDB's max_allowed_packet, read when first needed
        # Worker bookkeeping (claims, leases, releases, progress) can skip the commit fsync: a
        # write lost to a server crash only means a job runs again, which at-least-once allows.
        # Dispatches and every outcome a user sees (succeeded, failed, retry scheduled, the
        # failed store's changes) stay durable. Only for engines we create ourselves.
        relaxed = (
            create_engine(self.engine.url, pool_size=10, max_overflow=10,
                          connect_args={"options": "-c synchronous_commit=off"})
            if self._postgres and self._owns_engine else self.engine
        )
        self._engines = {True: self.engine, False: relaxed}
        self._autocommit = {
            durable: engine.execution_options(isolation_level="AUTOCOMMIT") for durable, engine in self._engines.items()
        }
        # SQLite serialises writers anyway; one thread avoids busy-waiting on its lock.
        self._executor = ThreadPoolExecutor(max_workers=1 if dialect == "sqlite" else 8, thread_name_prefix="neonnb-db")
        # Every SQLite transaction takes the write lock (BEGIN IMMEDIATE), and a sync dispatch
        # writes from its own thread: writers take turns before they ask SQLite for the lock,
        # instead of meeting in SQLite's sleeping busy handler (benchmarks/DECISIONS.md).
        self._turns: contextlib.AbstractContextManager[None] = (
            turns_for(self.engine.url.database) if dialect == "sqlite" else contextlib.nullcontext()
        )
        # SQLite: a worker's calls and a small async dispatch run on the caller's thread when no
        # other writer has the turn at that moment, since the hop to the driver's thread costs
        # more than the call. They never wait there: the turn is only taken if free, and these
        # connections give up at once on a lock held outside neonnb (busy timeout 0); then the
        # call goes to the driver's thread, which waits its turn.
        self._where = self.engine.url.render_as_string(hide_password=True)
        # The hot statements as the paths below run them raw, each compiled once.
        statements = CompiledStatements(self.engine.dialect)
        self._here: SqliteHere | None = None
        if dialect == "sqlite" and self._owns_engine:
            self._here = SqliteHere(self.engine.url.database or "", turns_for(self.engine.url.database),
                                    self._where, statements)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        # LISTEN/NOTIFY needs psycopg 3's notifies(); other PostgreSQL DBAPIs poll.
        self._notifies = dialect == "postgresql" and self.engine.dialect.driver == "psycopg"
        self._listener: Listener | Watcher | None = None
        self._message_listeners: set[Listener | MessagePoller] = set()
        # A worker's own calls run on its loop, with no hop to the driver's threads, where the
        # engine is ours and speaks psycopg (an Engine passed in may carry connect_args we
        # can't see). The rest stays on the threads, through SQLAlchemy.
        self._async: AsyncStatements | None = None
        self._dispatching: DispatchConnection | None = None  # a sync one-job dispatch's own connection
        if self._notifies and self._owns_engine and sys.platform != "win32":  # psycopg async needs a selector loop
            from .pg_async import AsyncStatements  # psycopg is the postgres extra's
            from .pg_dispatch import DispatchConnection

            connect = dict(self.engine.dialect.create_connect_args(self.engine.url)[1])
            connect.pop("context", None)  # SQLAlchemy's adapters for its own sync connections
            self._async = AsyncStatements(connect, self._where, statements)
            self._dispatching = DispatchConnection(connect, self._where, statements)
        # A big claim in pieces over the loop's connections: PostgreSQL claims them side by side
        # (SKIP LOCKED keeps them apart) and the first jobs start while it claims the rest.
        # SQLite would only queue them for its one write lock.
        self.claim_piece = CLAIM_PIECE if self._async is not None else None
        self._owned_updates: dict[tuple[str, ...], Any] = {}  # by the columns set (_update_owned)

    # --- plumbing ---------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            try:
                self._create_schema()
            except (OperationalError, ProgrammingError, IntegrityError):
                # Another process created it between our check and our CREATE: fine if it's there now.
                self._create_schema()
            self._schema_ready = True

    def _create_schema(self) -> None:
        # Workers starting together on a new database take turns, so none inserts while
        # another is still creating the indexes (a deadlock on MariaDB).
        with self.engine.connect() as conn, mysql_lock(conn, f"neonnb-schema:{self.table.name}"), conn.begin():
            if self._postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": self.table.name})
            self.table.metadata.create_all(conn, checkfirst=True)
            add_missing_columns(conn, self.marks)
            if self._postgres:
                store_values_uncompressed(conn, self.table)
            if self._notifies:
                install_trigger(conn, self.table.name)

    def _call(self, fn: Callable[[Connection], T], single_statement: bool, durable: bool,
              again: Callable[[Connection], T] | None = None, repeatable: bool = True) -> T:
        """``fn`` on a pooled connection; once more (as ``again``, if given) on a fresh one if
        that connection died, unless not ``repeatable``. It may have died after the server did
        the work, its reply lost: a call retried this way must be safe to repeat."""
        with self._reachable():
            self._ensure_schema()
            for attempt in (1, 2):
                try:
                    with self._turns:
                        if single_statement and self._postgres:
                            with self._autocommit[durable].connect() as conn:
                                return fn(conn)
                        with self._engines[durable].begin() as conn:
                            return fn(conn)
                except DBAPIError as exc:
                    # A pooled connection that died with a server restart: the pool has dropped
                    # it, and a fresh connection gets the call through.
                    if attempt == 2 or not exc.connection_invalidated or not repeatable:
                        raise
                    fn = again or fn
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """A database that can't be reached raises StoreUnavailable, one that refuses a
        statement StoreError, as the other drivers do, naming the database but never its
        password: SQLAlchemy's and the DB-API's errors don't reach the caller."""
        try:
            yield
        except DBAPIError as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise unreachable(self._where, exc.orig) from exc
            raise refused(self._where, exc.orig) from exc
        except sqlalchemy.exc.TimeoutError as exc:  # every pooled connection busy for pool_timeout
            raise unreachable(self._where, f"no pooled connection came free in time: {exc}") from exc

    async def _statement(self, fn: Callable[[Connection], T], durable: bool = True, repeatable: bool = True) -> T:
        """Run ``fn``, which issues exactly one statement, on the driver's threads."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self._call, fn, True, durable, repeatable=repeatable)
        return await loop.run_in_executor(self._executor, call)

    async def _transaction(self, fn: Callable[[Connection], T], durable: bool = True, repeatable: bool = True) -> T:
        """Run ``fn`` (several statements) in one transaction on the driver's threads."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self._call, fn, False, durable, repeatable=repeatable)
        return await loop.run_in_executor(self._executor, call)

    async def _hot(self, fn: Callable[[Run], T], single_statement: bool, durable: bool = True,
                   repeatable: bool = True) -> T:
        """A worker's call or a small dispatch, ``fn`` given a way to run statements: on this
        thread where SQLite's turn is free now (``sqlite_here.py``), else through SQLAlchemy on
        the driver's threads."""
        if self._here is not None and self._schema_ready:
            ran, value = self._here.transaction(fn)
            if ran:
                return cast(T, value)
        run = self._statement if single_statement else self._transaction
        return await run(lambda conn: fn(_run_on(conn)), durable, repeatable)

    async def _rows(self, stmt: Any, params: dict[str, Any], durable: bool = True,
                    repeatable: bool = True) -> list[dict[str, Any]]:
        """The rows of one statement as dicts: on the caller's loop where the driver has the
        async path, else as ``_hot`` runs it."""
        if self._async is None:
            return await self._hot(lambda run: run(stmt, params), True, durable, repeatable)
        if not self._schema_ready:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._ready)
        return await self._async.rows(stmt, params, durable, repeatable)

    def value_limit(self) -> tuple[int, str] | None:
        # MariaDB and MySQL refuse a statement over max_allowed_packet by dropping the
        # connection. A value travels escaped inside the statement, where it may take up to
        # twice its length: half the packet, less room for the rest of the statement.
        if self.engine.dialect.name not in ("mysql", "mariadb"):
            return None
        if self._packet is None:
            with self._reachable(), self.engine.connect() as conn:
                self._packet = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())
        return (self._packet - 65536) // 2, (f"half the server's max_allowed_packet of {self._packet:,}, less 64 KiB: "
                                             "a value travels escaped in its statement")

    def _ready(self) -> None:
        with self._reachable():
            self._ensure_schema()

    def _record(self, row: Row[Any]) -> JobRecord:
        return read_record(row._asdict())  # a plain dict: a RowMapping's `in` is slow

    def _announce(self, conn: Connection, queues: set[str]) -> None:
        if self._notifies:
            announce(conn, self.table.name, queues)

    async def _update_owned(self, job_id: str, owner: str, values: dict[str, Any], durable: bool) -> bool:
        """Set ``values`` on the job if this worker still holds it; False if it does not."""
        stmt = self._owned_updates.get(tuple(values))
        if stmt is None:
            c = self.table.c
            stmt = update(self.table).where(self._sql.owned).values(
                {name: bindparam(f"v_{name}", type_=c[name].type) for name in values})
            stmt = self._owned_updates[tuple(values)] = stmt.returning(c.id) if self._returning else stmt
        params = {"b_ids": [job_id], "b_owner": owner, **{f"v_{name}": value for name, value in values.items()}}
        if self._returning:
            return len(await self._rows(stmt, params, durable)) == 1
        return await self._statement(lambda conn: conn.execute(stmt, params).rowcount == 1, durable=durable)

    # --- the protocol -----------------------------------------------------------------

    async def enqueue(self, records: Sequence[JobRecord]) -> None:
        # One job: on the caller's loop (PostgreSQL) or thread (SQLite, when the lock is free),
        # as a worker's calls are. Safe to repeat: a row whose id is stored is skipped.
        if len(records) == 1 and (self._async is not None or self._here is not None):
            await self._rows(self._insert_one_named, dict(zip(ENQUEUED_COLUMNS, enqueued_row(records[0]), strict=True)))
            return
        await asyncio.get_running_loop().run_in_executor(self._executor, self.enqueue_blocking, records)

    def enqueue_blocking(self, records: Sequence[JobRecord]) -> bool:
        rows = [enqueued_row(r) for r in records]
        # A dispatch repeated after its reply was lost stores nothing twice: each row goes in
        # unless its id is there (ids are unique, so only the first try can have put it there).
        if len(rows) == 1:
            if self._schema_ready and self._dispatch_here(dict(zip(ENQUEUED_COLUMNS, rows[0], strict=True))):
                return True
            # Plain DBAPI SQL: a one-row dispatch spends more in SQLAlchemy's statement
            # machinery than in the database.
            self._call(lambda conn: conn.exec_driver_sql(self._sql.insert_new, rows[0]), True, True)
        elif rows:  # a large batch may take several INSERTs: all or none
            named = [dict(zip(ENQUEUED_COLUMNS, row, strict=True)) for row in rows]
            def insert(conn: Connection) -> None:
                conn.execute(self._insert_new, named)

            if self._postgres:
                self._call(lambda conn: self._copy_in(conn, rows), True, True, again=insert)
            else:
                self._call(insert, False, True)
        return True

    def _dispatch_here(self, row: dict[str, Any]) -> bool:
        """A sync one-job dispatch on the driver's own connection, on this thread, if that
        connection (PostgreSQL) or SQLite's write turn is free now; False if nothing was done."""
        if self._dispatching is not None:
            return self._dispatching.run(self._insert_one_named, row)
        if self._here is not None:
            return self._here.transaction(lambda run: run(self._insert_one_named, row))[0]
        return False

    async def enqueue_once(self, record: JobRecord) -> bool:
        row = enqueued_row(record)
        return await self._statement(lambda conn: conn.exec_driver_sql(self._sql.insert_new, row).rowcount == 1)

    async def enqueue_unique(self, record: JobRecord) -> str:
        c = self.table.c
        holder = (
            select(c.id).where(c.unique_key == record.unique_key, c.status.in_([QUEUED, RUNNING])).limit(1)
        )
        row = dict(zip(ENQUEUED_COLUMNS, enqueued_row(record), strict=True))

        def store_unless_held(conn: Connection) -> str:
            existing = conn.execute(holder).scalar()
            if existing is not None:
                return str(existing)
            conn.execute(self.table.insert(), {**row, "unique_key": record.unique_key})
            return record.id

        return await self._locked(f"unique:{record.unique_key}", store_unless_held)

    async def _locked(self, key: str, fn: Callable[[Connection], T]) -> T:
        """``fn`` in one transaction under a lock on ``key`` that lasts until the commit, so
        two callers can't both read before either writes: PostgreSQL's advisory lock (it ends
        with the transaction), MariaDB's named lock (taken before, released after the commit);
        SQLite's BEGIN IMMEDIATE already serialises writers."""
        if self.engine.dialect.name not in ("mysql", "mariadb"):
            def locked(conn: Connection) -> T:
                if self._postgres:
                    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
                return fn(conn)

            return await self._transaction(locked)

        def under_named_lock() -> T:
            with self._reachable():
                self._ensure_schema()
                with self.engine.connect() as conn, mysql_lock(conn, f"neonnb:{key}"), conn.begin():
                    return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, under_named_lock)

    def _copy_in(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """A batch on PostgreSQL goes in with COPY: one atomic statement, a third of the time
        of a multi-row INSERT (which spends it adapting parameters)."""
        raw = conn.connection.driver_connection
        assert raw is not None
        statement = f'COPY "{self.table.name}" ({", ".join(ENQUEUED_COLUMNS)}) FROM STDIN'
        try:
            with raw.cursor() as cursor, cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
        except Exception as exc:
            if not (raw.closed or raw.broken):
                raise
            # psycopg's own cursor, not SQLAlchemy's: say the connection died as SQLAlchemy
            # would, so the pool drops it and _call tries once more.
            conn.invalidate(exc)
            raise OperationalError(statement, None, exc, connection_invalidated=True) from exc

    async def reserve(
        self, queues: Sequence[str], limit: int, worker_id: str, now: float, lease_expires: float,
        ranks: Sequence[int] | None = None,
    ) -> list[JobRecord]:
        single = len(queues) == 1
        params = {
            "b_queues": list(queues), "b_queue": queues[0], "b_limit": limit, "b_owner": worker_id, "b_now": now,
            "b_lease": lease_expires, "b_ranks": list(ranks or ()),
        }
        sql = self._sql
        claim, due = ((sql.claim[single], sql.due[single]) if ranks is None
                      else (sql.claim_in_bands[single], sql.due_in_bands[single]))

        def in_order(rows: list[dict[str, Any]]) -> list[JobRecord]:
            claimed = []
            for row in rows:
                record = read_record(row)
                record.status, record.started_at, record.lease_expires, record.worker_id = (
                    Status.RUNNING, now, lease_expires, worker_id)
                claimed.append((record.priority.rank, record.run_at, row["seq"], record))
            claimed.sort(key=lambda entry: entry[:3])
            return [record for *_, record in claimed]

        # Not repeated on a fresh connection if the first one dies: the claim may have run, its
        # reply lost; the worker then gives back what it took (release_unheld).
        if self._returning:
            return in_order(await self._rows(claim, params, durable=False, repeatable=False))

        def select_then_claim(conn: Connection) -> list[JobRecord]:  # MariaDB/MySQL: no UPDATE ... RETURNING
            seqs = list(conn.execute(due, params).scalars())
            if not seqs:
                return []
            conn.execute(sql.claim_seqs, {**params, "b_seqs": seqs})
            return in_order([row._asdict() for row in conn.execute(sql.rows_by_seq, {"b_seqs": seqs})])

        return await self._transaction(select_then_claim, durable=False, repeatable=False)

    async def extend_leases(self, jobs: Sequence[JobRecord], worker_id: str, lease_expires: float) -> list[str]:
        if not jobs:
            return []
        params = {"b_ids": [job.id for job in jobs], "b_owner": worker_id, "b_lease": lease_expires}
        if self._returning:
            rows = await self._rows(self._sql.extend_returning, params, durable=False)
            return [row["id"] for row in rows if row["cancel_requested"] == 1]

        def extend(conn: Connection) -> list[str]:
            conn.execute(self._sql.extend, params)
            return list(conn.execute(self._sql.stopping, params).scalars())

        return await self._transaction(extend, durable=False)

    async def take_permit(self, key: str, count: int, window: float, token: str) -> float:
        p = self.permits.c
        mine = p.key == key

        def take(conn: Connection) -> float:
            now = time.time()  # under the lock (the workers' clocks agree with the store's: ClockSkew)
            conn.execute(delete(self.permits).where(mine, p.at <= now - window))
            taken, oldest = conn.execute(select(func.count(), func.min(p.at)).where(mine)).one()
            if taken < count:
                conn.execute(self.permits.insert().values(key=key, token=token, at=now))
                return 0.0
            return float(oldest) + window - now

        # Under a lock on the key: the check and the count are one step for every worker.
        return await self._locked(f"permit:{key}", take)

    async def take_slot(self, queue: str, key: str, limit: int, job_id: str) -> bool:
        s, c = self.slots.c, self.table.c
        slot = f"{queue}:{key}"
        running = select(c.id).where(c.status == RUNNING)

        def take(conn: Connection) -> bool:
            # Holders that stopped running (ended, or recovered from a dead worker) free their slots.
            conn.execute(delete(self.slots).where(s.key == slot, s.job_id != job_id, s.job_id.not_in(running)))
            held = set(conn.execute(select(s.job_id).where(s.key == slot)).scalars())
            if job_id in held:
                return True
            if len(held) >= limit:
                return False
            conn.execute(self.slots.insert().values(key=slot, job_id=job_id))
            return True

        return await self._locked(f"slot:{slot}", take)

    async def release_slot(self, queue: str, key: str, job_id: str) -> None:
        s = self.slots.c
        stmt = delete(self.slots).where(s.key == f"{queue}:{key}", s.job_id == job_id)
        await self._statement(lambda conn: conn.execute(stmt), durable=False)

    async def configure_queue(self, queue: str, settings: dict[str, Any]) -> None:
        q = self.queues.c

        def save(conn: Connection) -> None:
            stored = conn.execute(select(q.settings).where(q.queue == queue)).scalar()
            merged = {**_settings(stored), **settings}
            text = json.dumps({name: value for name, value in merged.items() if value is not None})
            if stored is None:
                conn.execute(self.queues.insert().values(queue=queue, settings=text))
            else:
                conn.execute(update(self.queues).where(q.queue == queue).values(settings=text))

        # Under a lock on the queue's name: a read, then a write that must not lose another's.
        await self._locked(f"queue:{queue}", save)

    async def queue_settings(self) -> dict[str, dict[str, Any]]:
        stmt = select(self.queues.c.queue, self.queues.c.settings)
        rows = await self._statement(lambda conn: list(conn.execute(stmt)), durable=False)
        return {queue: settings for queue, text in rows if (settings := _settings(text))}

    async def stopping(self, jobs: Sequence[JobRecord], worker_id: str) -> list[str]:
        if not jobs:
            return []
        rows = await self._rows(self._sql.stopping, {"b_ids": [job.id for job in jobs], "b_owner": worker_id},
                                durable=False)
        return [row["id"] for row in rows]

    async def reacquire(self, jobs: Sequence[JobRecord], worker_id: str, lease_expires: float) -> list[str]:
        c = self.table.c

        def take(conn: Connection) -> list[str]:
            taken = []
            for job in jobs:  # rare (after the store was away) and few: one statement each
                stmt = (update(self.table)
                        .where(c.id == job.id, c.status == QUEUED, c.attempts.in_([job.attempts, job.attempts - 1]))
                        .values(status=RUNNING, attempts=job.attempts, worker_id=worker_id,
                                lease_expires=lease_expires))
                if conn.execute(stmt).rowcount == 1:
                    taken.append(job.id)
            return taken

        return await self._transaction(take) if jobs else []

    async def cancel(self, job_id: str, queue: str | None, now: float) -> Status | None:
        c = self.table.c

        def cancel(conn: Connection) -> Status | None:
            status = conn.execute(select(c.status).where(c.id == job_id).with_for_update()).scalar()
            if status == QUEUED:
                conn.execute(update(self.table).where(c.id == job_id).values(_columns(ended(Status.CANCELLED, now))))
            elif status == RUNNING:
                conn.execute(update(self.table).where(c.id == job_id).values(cancel_requested=1))
            return None if status is None else Status(status)

        return await self._transaction(cancel)

    async def set_progress(self, job: JobRecord, worker_id: str, progress: dict[str, Any]) -> None:
        await self._update_owned(job.id, worker_id, {"progress": json.dumps(progress)}, durable=False)

    async def save_output(self, job: JobRecord, worker_id: str, output: str) -> None:
        await self._update_owned(job.id, worker_id, {"output": output}, durable=False)

    async def complete(self, results: Sequence[tuple[JobRecord, str | None]], worker_id: str, now: float) -> list[str]:
        sql = self._sql
        params = {"b_ids": [job.id for job, _ in results], "b_owner": worker_id, "b_now": now}
        # Durable: a user saw it succeed.
        if self._postgres:  # the results ride along as an array: one statement for any batch
            rows = await self._rows(sql.complete_with_results, {**params, "b_results": [r for _, r in results]})
            return [row["id"] for row in rows]
        with_result = [{"b_id": job.id, "b_result": result} for job, result in results if result is not None]

        def finish(run: Run) -> list[str]:
            if self._returning:
                finished = [row["id"] for row in run(sql.complete_returning, params)]
            else:
                finished = [row["id"] for row in run(sql.owned_ids, params)]
                if finished:
                    run(sql.complete, {**params, "b_ids": finished})
            mine = set(finished)
            rows = [row for row in with_result if row["b_id"] in mine]
            if rows:
                run(sql.set_result, rows)
            return finished

        # Without results one statement; with them, status and result must appear together,
        # so one transaction.
        if not with_result and self._returning:
            return [row["id"] for row in await self._rows(sql.complete_returning, params)]
        return await self._hot(finish, False)

    async def retry(self, job: JobRecord, worker_id: str, run_at: float, error: dict[str, Any]) -> bool:
        return await self._update_owned(job.id, worker_id, _columns(retried(run_at, error)), durable=True)

    async def fail(
        self, job: JobRecord, worker_id: str, now: float, error: dict[str, Any], status: Status = Status.FAILED
    ) -> bool:
        return await self._update_owned(job.id, worker_id, _columns(ended(status, now, error)), durable=True)

    async def release(self, jobs: Sequence[JobRecord], worker_id: str, now: float) -> int:
        c = self.table.c
        return await self._give_back(c.id.in_([job.id for job in jobs]), worker_id) if jobs else 0

    async def server_time(self) -> float | None:
        now = {"postgresql": "SELECT extract(epoch from clock_timestamp())",
               "mysql": "SELECT UNIX_TIMESTAMP(NOW(6))", "mariadb": "SELECT UNIX_TIMESTAMP(NOW(6))"}.get(
            self.engine.dialect.name)
        if now is None:
            return None  # SQLite: this machine's clock
        return float(await self._statement(lambda conn: conn.exec_driver_sql(now).scalar_one()))

    async def postpone(self, job: JobRecord, worker_id: str, run_at: float) -> bool:
        return await self._give_back(self.table.c.id == job.id, worker_id, run_at) == 1

    async def release_unheld(self, queues: Sequence[str], worker_id: str, held: Sequence[str], now: float) -> int:
        c = self.table.c
        return await self._give_back(and_(c.queue.in_(list(queues)), c.id.not_in(list(held))), worker_id)

    async def _give_back(self, which: Any, worker_id: str, run_at: float | None = None) -> int:
        c = self.table.c
        changes = given_back() if run_at is None else requeued(run_at)
        stmt = (
            update(self.table)
            .where(which, c.status == RUNNING, c.worker_id == worker_id)
            .values({**_columns(changes), "attempts": c.attempts - 1})
        )

        def give_back(conn: Connection) -> int:
            if not self._postgres:
                return int(conn.execute(stmt).rowcount)
            queues = list(conn.execute(stmt.returning(c.queue)).scalars())
            self._announce(conn, set(queues))
            return len(queues)

        return await self._transaction(give_back, durable=False)

    async def recover_expired(self, now: float) -> Recovered:
        c = self.table.c
        expired = and_(c.status == RUNNING, c.lease_expires < now)

        def recover(conn: Connection) -> Recovered:
            exhausted = [self._record(row) for row in
                         conn.execute(select(self.table).where(expired, c.attempts >= c.max_attempts))]
            retryable = and_(expired, c.attempts < c.max_attempts)
            rows = list(conn.execute(select(c.id, c.queue).where(retryable).with_for_update(skip_locked=True)))
            ids = [row.id for row in rows]
            if ids:
                conn.execute(
                    update(self.table).where(c.id.in_(ids), expired)
                    .values(_columns(requeued(now)))
                )
                self._announce(conn, {row.queue for row in rows})
            return Recovered(ids, exhausted)

        return await self._transaction(recover, durable=False)

    async def purge_finished(self, before: float) -> int:
        c = self.table.c
        stmt = delete(self.table).where(c.status.in_([SUCCEEDED, CANCELLED, EXPIRED]), c.finished_at < before)
        old_marks = delete(self.marks).where(self.marks.c.created_at < before)
        old_permits = delete(self.permits).where(self.permits.c.at < before)  # keys no job uses any more

        def purge(conn: Connection) -> int:
            conn.execute(old_marks)
            conn.execute(old_permits)
            return int(conn.execute(stmt).rowcount)

        return await self._transaction(purge)

    async def purge_queued(self, queue: str) -> int:
        c = self.table.c
        stmt = delete(self.table).where(c.queue == queue, c.status == QUEUED)
        return await self._statement(lambda conn: int(conn.execute(stmt).rowcount))

    async def mark(self, queue: str, group: str, member: str, value: str, now: float,
                   complete_at: int) -> dict[str, str] | None:
        m = self.marks.c
        size = select(func.count()).select_from(self.marks).where(m.grp == group)

        def add(conn: Connection) -> dict[str, str] | None:
            conn.execute(self._insert_mark, {"grp": group, "member": member, "value": value, "created_at": now})
            if conn.execute(size).scalar_one() < complete_at:
                return None
            return {row.member: row.value for row in conn.execute(select(m.member, m.value).where(m.grp == group))}

        # Under a lock on the set: at READ COMMITTED two members ending together would each
        # count before the other's insert committed, and neither would see the set complete.
        return await self._locked(f"mark:{group}", add)

    async def get(self, job_id: str, queue: str | None = None) -> JobRecord | None:
        def fetch(conn: Connection) -> JobRecord | None:
            row = conn.execute(self._sql.by_id, {"b_id": job_id}).first()
            return None if row is None else self._record(row)

        return await self._statement(fetch)

    async def get_many(self, job_ids: Sequence[str], queue: str | None = None) -> list[JobRecord]:
        c = self.table.c
        chunks = [list(job_ids[i : i + 1000]) for i in range(0, len(job_ids), 1000)]  # bounded IN lists

        def fetch(conn: Connection) -> list[JobRecord]:
            rows = (row for chunk in chunks for row in conn.execute(select(self.table).where(c.id.in_(chunk))))
            return [self._record(row) for row in rows]

        return await self._transaction(fetch) if job_ids else []

    async def list_jobs(
        self, *, status: Status | None = None, queue: str | None = None, limit: int = 100, offset: int = 0,
        cursor: str | None = None,
    ) -> JobPage:
        # Newest first by seq (the order rows were stored in) walks the primary key backwards;
        # finished jobs by when they finished walk the finished index: either way a page reads
        # what it shows.
        c = self.table.c
        stmt = select(self.table)
        if status is not None:
            stmt = stmt.where(c.status == status.value)
        if queue is not None:
            stmt = stmt.where(c.queue == queue)
        by_finish = listed_by_finish(status)
        if by_finish:  # in the SQL text: a bound value would not show SQLite that the index serves it
            stmt = stmt.where(c.status.in_(bindparam("finished", FINISHED_STATES, expanding=True,
                                                     literal_execute=True)))
        if cursor is not None:
            position, tiebreak = read_cursor(cursor)
            if not tiebreak.isdigit():
                raise bad_cursor(cursor)
            seq = int(tiebreak)
            stmt = stmt.where(tuple_(c.finished_at, c.seq) < (position, seq) if by_finish else c.seq < seq)
        order = [c.finished_at.desc(), c.seq.desc()] if by_finish else [c.seq.desc()]
        stmt = stmt.order_by(*order).limit(limit + 1).offset(offset)
        rows = await self._statement(lambda conn: list(conn.execute(stmt)))
        if len(rows) <= limit:
            return JobPage([self._record(row) for row in rows])
        last = rows[limit - 1]
        return JobPage([self._record(row) for row in rows[:limit]],
                       page_cursor(last.finished_at if by_finish else float(last.seq), last.seq))

    async def counts(self, now: float) -> dict[str, QueueCounts]:
        c = self.table.c
        state = case((and_(c.status == QUEUED, c.run_at > now), "delayed"), else_=c.status)
        stmt = select(c.queue, state, c.priority, func.count()).group_by(c.queue, state, c.priority)

        def count(conn: Connection) -> dict[str, QueueCounts]:
            result: dict[str, QueueCounts] = {}
            for queue, st, priority, n in conn.execute(stmt):
                qc = result.setdefault(queue, QueueCounts())
                if st == QUEUED:
                    band = _BANDS.get(priority, "normal")  # a rank stored by hand counts as normal
                    qc.waiting[band] += n
                elif st in _COUNTED:
                    setattr(qc, st, getattr(qc, st) + n)
                else:
                    qc.failed += n  # a status no neonnb writes: it needs someone's attention
            return result

        return await self._statement(count)

    async def requeue_failed(self, ids: Sequence[str] | None, queue: str | None, now: float) -> list[str]:
        c = self.table.c
        condition = c.status == FAILED
        if ids is not None:
            condition = and_(condition, c.id.in_(ids))
        if queue is not None:
            condition = and_(condition, c.queue == queue)

        def requeue(conn: Connection) -> list[str]:
            rows = list(conn.execute(select(c.id, c.queue).where(condition).with_for_update()))
            moved = [row.id for row in rows]
            if moved:
                conn.execute(
                    update(self.table).where(c.id.in_(moved)).values(_columns(revived(now)))
                )
                self._announce(conn, {row.queue for row in rows})
            return moved

        return await self._transaction(requeue)

    async def delete_failed(self, ids: Sequence[str] | None) -> int:
        c = self.table.c
        stmt = delete(self.table).where(c.status == FAILED)
        if ids is not None:
            stmt = stmt.where(c.id.in_(ids))
        return await self._statement(lambda conn: conn.execute(stmt).rowcount)

    async def save_member(self, info: Member) -> None:
        w = self.workers.c
        values = {"last_seen": info.last_seen, "info": info.to_json()}

        def save(conn: Connection) -> None:
            if conn.execute(update(self.workers).where(w.id == info.id).values(values)).rowcount == 0:
                conn.execute(self.workers.insert().values(id=info.id, **values))  # a worker's id is its own

        await self._transaction(save, durable=False)

    async def remove_member(self, member_id: str) -> None:
        stmt = delete(self.workers).where(self.workers.c.id == member_id)
        await self._statement(lambda conn: conn.execute(stmt), durable=False)

    async def list_members(self) -> list[Member]:
        stmt = select(self.workers.c.info).order_by(self.workers.c.id)
        rows = await self._statement(lambda conn: list(conn.execute(stmt).scalars()))
        return [info for text in rows if (info := read_member(text)) is not None]

    async def drop_members(self, seen_before: float) -> int:
        stmt = delete(self.workers).where(self.workers.c.last_seen < seen_before)
        return await self._statement(lambda conn: int(conn.execute(stmt).rowcount), durable=False)

    def watch(self, callback: Callable[[str], None]) -> None:
        if self._listener is not None:
            return
        if self._notifies:
            self._listener = Listener(self.engine, self.table.name, callback)
        elif self.engine.dialect.name == "sqlite" and self.engine.url.database:
            self._listener = Watcher(self.engine.url.database, callback)

    async def publish(self, message: str) -> None:
        if self._notifies:
            notify = text("SELECT pg_notify(:channel, :message)")
            params = {"channel": f"{self.table.name}_messages", "message": message}
            await self._statement(lambda conn: conn.execute(notify, params), durable=False)
            return
        now = time.time()
        trim = now - self._trimmed_at > sql_messages.KEPT / 6
        insert = self.messages.insert().values(at=now, message=message)
        old = delete(self.messages).where(self.messages.c.at < now - sql_messages.KEPT)

        def store(conn: Connection) -> None:
            conn.execute(insert)
            if trim:
                conn.execute(old)

        await self._transaction(store, durable=False)
        if trim:
            self._trimmed_at = now

    def listen(self, callback: Callable[[str], None]) -> Callable[[], None]:
        self._ensure_schema()
        listener = (Listener(self.engine, f"{self.table.name}_messages", callback) if self._notifies
                    else MessagePoller(self.engine, self.messages, callback))
        self._message_listeners.add(listener)

        def stop() -> None:
            self._message_listeners.discard(listener)
            listener.stop()

        return stop

    async def close(self) -> None:
        for listening in list(self._message_listeners):
            listening.stop()
        if self._listener is not None:
            self._listener.stop()
        self._executor.shutdown(wait=True)
        if self._async is not None:
            self._async.close()
        if self._dispatching is not None:
            self._dispatching.close()
        if self._here is not None:
            self._here.close()
        if self._owns_engine:
            for engine in set(self._engines.values()):
                engine.dispose()


def _run_on(conn: Connection) -> Run:
    """``Run`` (sqlite_here.py) on a SQLAlchemy connection."""
    def run(statement: Any, params: Any) -> list[dict[str, Any]]:
        result = conn.execute(statement, params)
        return [row._asdict() for row in result] if result.returns_rows else []

    return run


def _columns(changes: dict[str, Any]) -> dict[str, Any]:
    """A state change (neonnb.records) as column values: statuses by name, JSON as text."""
    return {name: value.value if isinstance(value, Status) else json.dumps(value) if isinstance(value, dict)
            else value for name, value in changes.items()}


def _settings(text: str | None) -> dict[str, Any]:
    """A queue's stored settings; nothing of a value this version can't read."""
    try:
        settings = json.loads(text) if text else {}
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) else {}
