"""Cross-process wake-ups on SQLite, which has no LISTEN/NOTIFY.

A daemon thread reads ``PRAGMA data_version`` every couple of milliseconds on its own
connection. The number changes whenever another connection commits, so idle workers learn
of a dispatch from another process at once, for the cost of a lock-free read instead of a
claim (which takes the write lock) per poll.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from .wakeups import WAKE_ALL, WakeThread

INTERVAL = 0.002


class Watcher(WakeThread):
    def __init__(self, path: str, callback: Callable[[str], None]) -> None:
        self.path = path
        super().__init__(f"sqlite {path}", callback)

    def listen(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            self.callback(WAKE_ALL)
            while not self._stop.wait(INTERVAL):
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    self.callback(WAKE_ALL)
                last = version
        finally:
            conn.close()
