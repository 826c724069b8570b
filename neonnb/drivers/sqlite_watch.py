"""Cross-process wake-ups on SQLite, which has no LISTEN/NOTIFY.

A daemon thread reads ``PRAGMA data_version`` on its own connection. The number changes
whenever another connection commits, so idle workers learn of a dispatch from another process
at once, for the cost of a lock-free read instead of a claim (which takes the write lock) per
poll. It reads every millisecond while the file is busy (a change in the last second) and half
as often when it is quiet, so an idle notebook's worker costs little CPU.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from .wakeups import WAKE_ALL, WakeThread

BUSY_INTERVAL = 0.001
QUIET_INTERVAL = 0.002
BUSY_FOR = 1.0  # seconds after the last change


class Watcher(WakeThread):
    def __init__(self, path: str, callback: Callable[[str], None]) -> None:
        self.path = path
        super().__init__(f"sqlite {path}", callback)

    def listen(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            self.callback(WAKE_ALL)
            changed_at = time.monotonic()
            interval = BUSY_INTERVAL
            while not self._stop.wait(interval):
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                now = time.monotonic()
                if version != last:
                    self.callback(WAKE_ALL)
                    last, changed_at = version, now
                interval = BUSY_INTERVAL if now - changed_at < BUSY_FOR else QUIET_INTERVAL
        finally:
            conn.close()
