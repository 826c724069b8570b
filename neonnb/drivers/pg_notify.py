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

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Connection, Engine, text

logger = logging.getLogger("neonnb.drivers.database")

WAKE_ALL = "*"


def install_trigger(conn: Connection, table: str) -> None:
    """Create or refresh the notify trigger; safe when several processes do it at once."""
    function = f"{table}_notify"
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": function})
    conn.execute(text(f"""
        CREATE OR REPLACE FUNCTION "{function}"() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify(TG_TABLE_NAME, '*');
            RETURN NULL;
        END $$
    """))
    trigger = f"{table}_notify_insert"
    conn.execute(text(f'DROP TRIGGER IF EXISTS "{trigger}" ON "{table}"'))
    conn.execute(text(
        f'CREATE TRIGGER "{trigger}" AFTER INSERT ON "{table}" FOR EACH STATEMENT EXECUTE FUNCTION "{function}"()'
    ))


def announce(conn: Connection, table: str, queues: set[str]) -> None:
    """Tell listeners that jobs of ``queues`` are due (sent when the transaction commits)."""
    for queue in sorted(queues):
        conn.execute(text("SELECT pg_notify(:channel, :queue)"), {"channel": table, "queue": queue})


class Listener:
    """A daemon thread that LISTENs on the table's channel and calls ``callback(queue)``."""

    def __init__(self, engine: Engine, channel: str, callback: Callable[[str], None]) -> None:
        self.engine = engine
        self.channel = channel
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"neonnb-listen-{channel}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._listen()
                backoff = 0.1
            except Exception as exc:
                logger.warning("LISTEN %s: connection lost (%r); reconnecting in %.1fs", self.channel, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _listen(self) -> None:
        pooled = self.engine.raw_connection()
        conn = pooled.driver_connection
        pooled.detach()  # this connection is ours for as long as we listen
        if conn is None:
            raise RuntimeError("the engine gave no DBAPI connection to LISTEN on")
        try:
            conn.autocommit = True
            conn.execute(f'LISTEN "{self.channel}"')
            self.callback(WAKE_ALL)  # anything sent while we were away is lost: look now
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.5):
                    self.callback(note.payload)
        finally:
            conn.close()
