"""PostgreSQL LISTEN/NOTIFY for the database driver: idle workers wake when a job arrives.

A statement-level trigger on the jobs table sends ``NOTIFY <table>, '*'`` after every insert,
so a dispatch costs no extra round trip. It names no queue: reading the inserted rows (a
transition table) cost a third of a 10,000-row batch insert, and a worker woken for another
queue's job only makes one empty claim. The rarer paths that put jobs back (release,
recovery, retry from the failed store) call ``announce`` with their queues. One
listener thread per driver holds a dedicated connection and calls back with the queue name;
after a lost connection it reconnects with backoff and wakes everyone with ``"*"``, since
notifications sent meanwhile are gone.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Engine, text

from .wakeups import WAKE_ALL, WakeThread


def install_trigger(conn: Connection, table: str) -> None:
    """Create the notify trigger unless it is there; safe when several processes do it at
    once. Only when missing: creating it locks the jobs table against every job's traffic,
    and a read-only database (a replica) must still serve reads."""
    function = f"{table}_notify"
    trigger = f"{table}_notify_insert"
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": function})
    installed = conn.execute(
        text("SELECT 1 FROM pg_trigger WHERE tgname = :trigger AND tgrelid = CAST(:table AS regclass)"),
        {"trigger": trigger, "table": f'"{table}"'},
    ).first()
    if installed is not None:
        return
    conn.execute(text(f"""
        CREATE OR REPLACE FUNCTION "{function}"() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify(TG_TABLE_NAME, '*');
            RETURN NULL;
        END $$
    """))
    conn.execute(text(f'DROP TRIGGER IF EXISTS "{trigger}" ON "{table}"'))
    conn.execute(text(
        f'CREATE TRIGGER "{trigger}" AFTER INSERT ON "{table}" FOR EACH STATEMENT EXECUTE FUNCTION "{function}"()'
    ))


def announce(conn: Connection, table: str, queues: set[str]) -> None:
    """Tell listeners that jobs of ``queues`` are due (sent when the transaction commits)."""
    for queue in sorted(queues):
        conn.execute(text("SELECT pg_notify(:channel, :queue)"), {"channel": table, "queue": queue})


class Listener(WakeThread):
    """LISTENs on the table's channel on a connection of its own."""

    def __init__(self, engine: Engine, channel: str, callback: Callable[[str], None]) -> None:
        self.engine = engine
        self.channel = channel
        super().__init__(f"LISTEN {channel}", callback)

    def listen(self) -> None:
        pooled = self.engine.raw_connection()
        conn = pooled.driver_connection
        pooled.detach()  # this connection is ours for as long as we listen
        if conn is None:
            raise RuntimeError("the engine gave no DBAPI connection to LISTEN on")
        try:
            conn.autocommit = True
            conn.execute(f'LISTEN "{self.channel}"')
            self.callback(WAKE_ALL)
            while not self.stopping:
                for note in conn.notifies(timeout=0.5):
                    self.callback(note.payload)
        finally:
            conn.close()
