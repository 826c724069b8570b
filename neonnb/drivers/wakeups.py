"""The thread behind the PostgreSQL and SQLite drivers' ``watch()`` (their listeners block):
it listens to the store for new jobs and calls ``callback(queue)`` (``"*"``: any queue),
reconnecting with backoff when the store goes away. Each driver says only how to listen
(``listen``). Redis subscribes on the background loop instead (``RedisDriver._subscribe``)."""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger("neonnb.drivers")

WAKE_ALL = "*"


class WakeThread(abc.ABC):
    def __init__(self, name: str, callback: Callable[[str], None]) -> None:
        self.name = name
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"neonnb-wake-{name}", daemon=True)
        self._thread.start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.1
        while not self.stopping:
            try:
                self.listen()
                backoff = 0.1
            except Exception as exc:
                logger.warning("%s: wake-ups lost (%r); reconnecting in %.1fs", self.name, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    @abc.abstractmethod
    def listen(self) -> None:
        """Connect, call ``self.callback(WAKE_ALL)`` once connected (whatever was sent while
        away is lost: workers should look now), then deliver wake-ups until ``stopping``.
        Raising means the connection was lost."""
