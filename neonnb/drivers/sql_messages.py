"""The SQL driver's messages between processes (``EventFeed``) where there is no NOTIFY
(SQLite, MariaDB, PostgreSQL without psycopg 3): a table of recent messages that each
listener's thread polls.

Rows are read by their ``seq`` above the highest one the listener is sure of. A row may
commit after a later one (MariaDB hands out auto-increments before commit), so a gap below
the newest row seen is read again until it fills, or for ``GAP_WAIT`` seconds (a rolled-back
insert leaves a gap for good). Publishers delete rows older than ``KEPT`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Engine, Table, func, select

from .wakeups import WakeThread

INTERVAL = 0.2
GAP_WAIT = 5.0
KEPT = 60.0


class MessagePoller(WakeThread):
    def __init__(self, engine: Engine, table: Table, callback: Callable[[str], None]) -> None:
        self.engine, self.table = engine, table
        self._floor: int | None = None  # every message up to this seq is delivered (or given up on)
        super().__init__(f"messages {table.name}", callback)

    def listen(self) -> None:
        t = self.table.c
        with self.engine.connect() as conn:
            if self._floor is None:  # from now on: messages sent before this listener are not its
                self._floor = int(conn.execute(select(func.coalesce(func.max(t.seq), 0))).scalar_one())
                conn.commit()
            seen: set[int] = set()
            gaps: dict[int, float] = {}  # missing seq -> when it was first missed
            while not self._stop.wait(INTERVAL):
                rows = conn.execute(select(t.seq, t.message).where(t.seq > self._floor).order_by(t.seq)).all()
                conn.commit()  # end the read: the next one sees what commits meanwhile
                for seq, message in rows:
                    if seq not in seen:
                        seen.add(seq)
                        self.callback(message)
                self._advance(seen, gaps, time.monotonic())

    def _advance(self, seen: set[int], gaps: dict[int, float], now: float) -> None:
        assert self._floor is not None
        top = max(seen, default=self._floor)
        for seq in range(self._floor + 1, top):
            if seq not in seen:
                gaps.setdefault(seq, now)
        while self._floor < top:
            following = self._floor + 1
            if following not in seen and now - gaps.get(following, now) < GAP_WAIT:
                break
            self._floor = following
            seen.discard(following)
            gaps.pop(following, None)
