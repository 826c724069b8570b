"""Cross-process wake-ups on SQLite, which has no LISTEN/NOTIFY.

A daemon thread reads ``PRAGMA data_version`` every couple of milliseconds on its own
connection. The number changes whenever another connection commits, so idle workers learn
of a dispatch from another process at once, for the cost of a lock-free read instead of a
claim (which takes the write lock) per poll.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable

logger = logging.getLogger("neonnb.drivers.database")

INTERVAL = 0.002


class Watcher:
    def __init__(self, path: str, callback: Callable[[str], None]) -> None:
        self.path = path
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neonnb-sqlite-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False)
        except sqlite3.Error as exc:
            logger.warning("can't watch %s for new jobs (%s); workers will poll", self.path, exc)
            return
        try:
            last = None
            while not self._stop.wait(INTERVAL):
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if last is not None and version != last:
                    self.callback("*")
                last = version
        except sqlite3.Error as exc:
            logger.warning("stopped watching %s for new jobs (%s); workers will poll", self.path, exc)
        finally:
            conn.close()
