"""The SQL driver's schema (the jobs table, its indexes, the marks table) and the statements
a busy worker runs, built once."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Column,
    Connection,
    Double,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from ..errors import ConfigError
from ..records import JobRecord, Status

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED = (s.value for s in Status)
# The finished index covers these rows only; a query that names this same condition lets
# SQLite see that the index serves it (it does not infer it from ``status = 'failed'``).
FINISHED_STATES = [SUCCEEDED, FAILED, CANCELLED]


def jobs_table(name: str) -> Table:
    """The jobs table (``name`` comes from ``Config.table_name``); beside it in the same
    MetaData, ``{name}_marks`` holds the driver's ``mark`` sets, ``{name}_workers`` the
    registry (workers, schedulers, listeners), ``{name}_queues`` what is set per queue (paused, rate)
    and ``{name}_messages`` recent messages."""
    metadata = MetaData()
    Table(
        f"{name}_messages", metadata,  # recent messages between processes (sql_messages)
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("at", Double, nullable=False),
        Column("message", Text, nullable=False),
    )
    Table(
        f"{name}_workers", metadata,
        Column("id", String(100), primary_key=True),
        Column("last_seen", Double, nullable=False),
        Column("info", Text, nullable=False),  # the WorkerInfo as JSON
    )
    Table(
        f"{name}_permits", metadata,  # rate limits' permits, each kept for its window (take_permit)
        Column("key", String(400), primary_key=True),
        Column("token", String(36), primary_key=True),
        Column("at", Double, nullable=False),
    )
    Table(
        f"{name}_slots", metadata,  # concurrency per key: the jobs holding a slot (take_slot)
        Column("key", String(400), primary_key=True),
        Column("job_id", String(36), primary_key=True),
    )
    Table(
        f"{name}_queues", metadata,  # what is set for a queue as a whole (paused, rate), as JSON
        Column("queue", String(200), primary_key=True),
        Column("settings", Text, nullable=False),
    )
    Table(
        f"{name}_marks", metadata,
        Column("grp", String(100), primary_key=True),
        Column("member", String(36), primary_key=True),
        Column("created_at", Double, nullable=False),
        Column("value", Text),  # what the member brought (a batch job's result); added in 0.1.x
    )
    t = Table(
        name,
        metadata,
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("id", String(36), nullable=False, unique=True),
        Column("queue", String(200), nullable=False),
        Column("name", String(300), nullable=False),
        Column("payload", Text, nullable=False),
        Column("priority", SmallInteger, nullable=False),
        Column("status", String(10), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("max_attempts", Integer, nullable=False),
        Column("timeout", Double),
        Column("run_at", Double, nullable=False),
        Column("created_at", Double, nullable=False),
        Column("started_at", Double),
        Column("finished_at", Double),
        Column("lease_expires", Double),
        Column("worker_id", String(100)),
        Column("progress", Text),
        Column("result", Text),
        Column("error", Text),
        Column("output", Text),
        Column("flow", Text),
        Column("unique_key", String(300)),
        Column("cancel_requested", SmallInteger),  # 1 once someone asked the running job to stop
    )
    # The claim reads (queue, status) and orders by (priority, run_at, seq): one index serves
    # it. Where the database allows, it covers only queued rows, so it stays small however
    # many finished rows the table keeps.
    queued = t.c.status == "queued"
    Index(f"{name}_claim", t.c.queue, t.c.status, t.c.priority, t.c.run_at, t.c.seq,
          postgresql_where=queued, sqlite_where=queued)
    running = t.c.status == "running"
    finished = t.c.status.in_(FINISHED_STATES)
    Index(f"{name}_lease", t.c.status, t.c.lease_expires, postgresql_where=running, sqlite_where=running)
    Index(f"{name}_finished", t.c.status, t.c.finished_at, postgresql_where=finished, sqlite_where=finished)
    keyed = t.c.unique_key.is_not(None)
    Index(f"{name}_unique", t.c.unique_key, t.c.status, postgresql_where=keyed, sqlite_where=keyed)
    return t


# What a dispatch writes, in this order; the rest of a row starts empty.
ENQUEUED_COLUMNS = (
    "id", "queue", "name", "payload", "priority", "status", "attempts", "max_attempts", "timeout", "run_at",
    "created_at", "flow",
)


def add_missing_columns(conn: Connection, table: Table) -> None:
    """Columns added to ``table`` since an older neonnb created it: ALTER TABLE adds them
    (all nullable), so an existing database keeps working after an upgrade."""
    from sqlalchemy import inspect

    have = {column["name"] for column in inspect(conn).get_columns(table.name)}
    preparer = conn.dialect.identifier_preparer
    for column in table.columns:
        if column.name not in have:
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN "
                              f"{preparer.format_column(column)} {kind}"))


UNCOMPRESSED = ("payload", "result")  # where DataFrames and arrays go, already compressed as Parquet


def store_values_uncompressed(conn: Connection, table: Table) -> None:
    """PostgreSQL only: keep big payloads and results out of line but uncompressed (STORAGE
    EXTERNAL). They are mostly Parquet, compressed already; pglz spent 0.36 s of 0.46 s
    writing a 14 MB result (DECISIONS.md). Altered once: later starts find it done."""
    preparer = conn.dialect.identifier_preparer
    pending = conn.execute(text(
        "SELECT attname FROM pg_attribute WHERE attrelid = CAST(:table AS regclass) "
        "AND attname = ANY(:columns) AND attstorage <> 'e'"),
        {"table": preparer.format_table(table), "columns": list(UNCOMPRESSED)}).scalars().all()
    for column in pending:
        conn.execute(text(f"ALTER TABLE {preparer.format_table(table)} ALTER COLUMN "
                          f"{preparer.quote(column)} SET STORAGE EXTERNAL"))


def insert_ignoring(table: Table, dialect: str) -> Any:
    """An INSERT that skips a row whose key exists."""
    if dialect in ("mysql", "mariadb"):
        return table.insert().prefix_with("IGNORE")
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table).on_conflict_do_nothing()


@contextlib.contextmanager
def mysql_lock(conn: Connection, name: str) -> Iterator[None]:
    """A MySQL/MariaDB named lock (nothing elsewhere). It belongs to the session, not the
    transaction, so it is taken before and released after the transaction's commit."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        yield
        return
    params = {"name": name[:64]}
    conn.execute(text("SELECT GET_LOCK(:name, 60)"), params)
    conn.commit()
    try:
        yield
    finally:
        conn.execute(text("SELECT RELEASE_LOCK(:name)"), params)
        conn.commit()


def enqueued_row(r: JobRecord) -> tuple[Any, ...]:
    return (r.id, r.queue, r.name, r.payload, r.priority.rank, r.status.value, r.attempts, r.max_attempts,
            r.timeout, r.run_at, r.created_at, None if r.flow is None else json.dumps(r.flow))  # ENQUEUED_COLUMNS


class HotStatements:
    """The statements a busy worker runs, built once with bound parameters (``b_*``):
    building a SQLAlchemy construct costs more than executing its cached compiled form."""

    def __init__(self, t: Table, postgres: bool, mysql: bool, paramstyle: str, quoted_table: str) -> None:
        c = t.c
        marker = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(paramstyle)
        if marker is None:
            raise ConfigError(f"Config.connection: DBAPI paramstyle {paramstyle!r} is not supported")
        columns, markers = ", ".join(ENQUEUED_COLUMNS), ", ".join([marker] * len(ENQUEUED_COLUMNS))
        self.insert_one = f"INSERT INTO {quoted_table} ({columns}) VALUES ({markers})"
        # enqueue_once: MySQL and MariaDB lack ON CONFLICT, the others INSERT IGNORE.
        self.insert_new = (
            f"INSERT IGNORE INTO {quoted_table} ({columns}) VALUES ({markers})" if mysql
            else f"{self.insert_one} ON CONFLICT (id) DO NOTHING"
        )


        def one_of(column: Any, name: str) -> Any:
            # PostgreSQL takes the list as one array parameter; an expanding IN would be
            # re-rendered with a parameter per item on every call.
            if postgres:
                return column == any_(bindparam(name, type_=ARRAY(column.type)))
            return column.in_(bindparam(name, expanding=True))

        # "Running and held by this worker". Only running jobs carry a lease, and testing the
        # lease rather than the status keeps PostgreSQL's planner on the id index: offered
        # status = 'running', a young table's planner scans every running row instead.
        self.owned = and_(
            one_of(c.id, "b_ids"),
            c.worker_id == bindparam("b_owner"),
            c.lease_expires.is_not(None),
        )
        def due(queues: Any, *where: Any) -> Any:
            return (
                select(c.seq)
                .where(queues, c.status == queued_in_text, *where)
                .where(c.run_at <= bindparam("b_now"))
                .order_by(c.priority, c.run_at, c.seq)
                .limit(bindparam("b_limit"))
                .with_for_update(skip_locked=True)
            )

        # On PostgreSQL one queue (the usual worker) is named as a plain equality: then the
        # claim index hands the due rows over in claim order and the LIMIT stops after them.
        # Given an array (= ANY), PostgreSQL before 17 reads and sorts every queued row of the
        # queues. (SQLite and MariaDB keep the list, which they already read in index order.)
        # 'queued' written into the SQL, not bound: PostgreSQL caches a prepared statement's plan
        # only if it serves every parameter value, and with the status a parameter the plan
        # can't use the claim index (it covers queued rows only), so every claim was planned
        # anew.
        queued_in_text: Any = bindparam("queued", QUEUED, literal_execute=True)
        several = one_of(c.queue, "b_queues")
        one = c.queue == bindparam("b_queue") if postgres else several
        bands = one_of(c.priority, "b_ranks")  # a worker on "queue:high" claims those in b_ranks
        self.due = {True: due(one), False: due(several)}
        self.due_in_bands = {True: due(one, bands), False: due(several, bands)}
        claim = update(t).values(
            status=RUNNING, attempts=c.attempts + 1, worker_id=bindparam("b_owner"),
            lease_expires=bindparam("b_lease"), started_at=bindparam("b_now"),
        )
        # One statement where UPDATE ... RETURNING exists: a materialised CTE joined on the
        # primary key alone. As an IN-subquery PostgreSQL may re-run the LIMIT ... SKIP LOCKED
        # select and claim more rows than asked for; re-checking status here would tempt its
        # planner (on a young table with no statistics) to scan every queued row. The rows are
        # locked (on SQLite the whole database is), so they are still queued.
        # What a worker needs of a claimed job; the rest it knows (it just set it) or never reads.
        claimed = [c.seq, c.id, c.queue, c.name, c.payload, c.priority, c.attempts, c.max_attempts, c.timeout,
                   c.run_at, c.created_at, c.flow]

        def claim_of(due_select: Any) -> Any:
            due_rows = due_select.cte("due").prefix_with("MATERIALIZED", dialect="postgresql")
            return claim.where(c.seq == due_rows.c.seq).returning(*claimed)

        self.claim = {single: claim_of(select_) for single, select_ in self.due.items()}
        self.claim_in_bands = {single: claim_of(select_) for single, select_ in self.due_in_bands.items()}
        self.claim_seqs = claim.where(c.seq.in_(bindparam("b_seqs", expanding=True)))
        self.rows_by_seq = select(*claimed).where(c.seq.in_(bindparam("b_seqs", expanding=True)))
        self.extend = update(t).where(self.owned).values(lease_expires=bindparam("b_lease"))
        self.extend_returning = self.extend.returning(c.id, c.cancel_requested)  # and which were asked to stop
        self.stopping = select(c.id).where(self.owned, c.cancel_requested == 1)
        self.complete = update(t).where(self.owned).values(
            status=SUCCEEDED, finished_at=bindparam("b_now"), lease_expires=None
        )
        self.complete_returning = self.complete.returning(c.id)
        # PostgreSQL: each job's result (or NULL) beside its id, as two arrays unnested together.
        outcomes = func.unnest(
            bindparam("b_ids", type_=ARRAY(c.id.type)), bindparam("b_results", type_=ARRAY(c.result.type)),
        ).table_valued("id", "result").render_derived(name="outcome")
        self.complete_with_results = update(t).where(
            c.id == outcomes.c.id, c.worker_id == bindparam("b_owner"), c.lease_expires.is_not(None),
        ).values(
            status=SUCCEEDED, finished_at=bindparam("b_now"), lease_expires=None, result=outcomes.c.result,
        ).returning(c.id)
        self.owned_ids = select(c.id).where(self.owned).with_for_update()
        self.set_result = update(t).where(c.id == bindparam("b_id")).values(result=bindparam("b_result"))
        self.by_id = select(t).where(c.id == bindparam("b_id"))
