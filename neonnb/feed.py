"""Job events across processes: ``qm.events`` subscribers see the jobs of every worker on
the store, in any process on any machine, not only this process's.

A process with subscribers listens to the store (``EventFeed``: Redis pub/sub, PostgreSQL
LISTEN/NOTIFY, a table of recent messages that SQLite and MariaDB readers poll) and says so
in the store's registry (a ``ListenerInfo``, refreshed every ``LISTENER_BEAT`` seconds).
Workers look for listeners every ``LOOK_EVERY`` seconds; while there are some in other
processes, a hook gathers their events for ``GATHER`` seconds and publishes them as one
message. With no one listening, workers publish nothing: events cost a job nothing then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from . import _loop
from .drivers.base import MAX_MESSAGE, Driver, EventFeed
from .drivers.wakeups import WAKE_ALL
from .hooks import Events, Hook, Hooks, JobEvent, Outcome, ended_event, event_of
from .records import JobRecord, ListenerInfo

logger = logging.getLogger("neonnb.feed")

GATHER = 0.1  # seconds a worker's events wait to go out together
LOOK_EVERY = 1.0  # seconds between a worker's looks for listeners in other processes
LISTENER_BEAT = 5.0
FLUSH_TIMEOUT = 5.0  # seconds a stopping worker waits for its last events to go out


class Feed:
    """One per core: publishes this process's events while others listen, and brings
    theirs to ``events`` while it has subscribers."""

    def __init__(self, driver: Driver, hooks: Hooks, clock: Callable[[], float],
                 announce: Callable[[Callable[[], ListenerInfo], float], Coroutine[Any, Any, None]],
                 withdraw: Callable[[str], Coroutine[Any, Any, None]]) -> None:
        self.driver, self.hooks, self.clock = driver, hooks, clock
        self._announce, self._withdraw = announce, withdraw
        self.origin = uuid.uuid4().hex
        self.listener_id = f"listener:{socket.gethostname()}:{os.getpid()}:{self.origin[:6]}"
        self.events = Events(hooks, clock, self._listen if isinstance(driver, EventFeed) else None)
        self._publisher = _Publisher(self)
        self._unhook: Callable[[], None] | None = None
        self._stop: Callable[[], None] | None = None  # while listening: stops it

    # --- publishing, in processes that run workers -----------------------------------------

    async def look_for_listeners(self) -> None:
        """Publish this process's events from now on if another process listens. A worker
        looks before its first claim: a short one (``--burst``) would end before a later look."""
        if not isinstance(self.driver, EventFeed):
            return
        try:
            now = self.clock()
            listened = any(isinstance(m, ListenerInfo) and m.id != self.listener_id and m.state(now) != "lost"
                           for m in await self.driver.list_members())
            self._publish_events(listened)
        except Exception as exc:  # the store is away: the next look tries again
            logger.debug("looking for event listeners failed: %r", exc)

    async def follow_listeners(self) -> None:
        """Until cancelled: look again every LOOK_EVERY seconds."""
        while isinstance(self.driver, EventFeed):
            await asyncio.sleep(LOOK_EVERY)
            await self.look_for_listeners()

    async def flush(self) -> None:
        """Send the events still gathering, and wait for those on their way (a worker
        stopping: its last jobs' ends must reach the listeners)."""
        await self._publisher.flush()

    def _publish_events(self, on: bool) -> None:
        if on and self._unhook is None:
            self._unhook = self.hooks.add(self._publisher)
        elif not on and self._unhook is not None:
            self._unhook()
            self._unhook = None

    async def publish(self, events: list[dict[str, Any]]) -> None:
        assert isinstance(self.driver, EventFeed)
        for message in pack(self.origin, events):
            await self.driver.publish(message)

    # --- listening, in processes with subscribers ------------------------------------------

    def _listen(self) -> Callable[[], None]:
        assert isinstance(self.driver, EventFeed)
        stop_listening = self.driver.listen(self._received)
        announcing = _loop.submit(self._announce(self._info, LISTENER_BEAT))

        def stop() -> None:  # the last subscriber left (on any thread)
            self._stopped(stop_listening, announcing)
            _loop.submit(self._withdraw(self.listener_id))

        self._stop = functools.partial(self._stopped, stop_listening, announcing)
        return stop

    def _stopped(self, stop_listening: Callable[[], None], announcing: concurrent.futures.Future[None]) -> None:
        stop_listening()
        announcing.cancel()
        self._stop = None

    async def aclose(self) -> None:
        """Stop listening to other processes, before the manager closes the store (this
        process's subscribers keep its own events)."""
        if self._stop is not None:
            self._stop()
            self.events.forget_remote()
            await self._withdraw(self.listener_id)

    def _info(self) -> ListenerInfo:
        now = self.clock()
        return ListenerInfo(id=self.listener_id, host=socket.gethostname(), pid=os.getpid(), started_at=now,
                            last_seen=now, beat=LISTENER_BEAT)

    def _received(self, message: str) -> None:
        if message == WAKE_ALL:  # the listener (re)connected: nothing to deliver
            return
        origin, events = unpack(message)
        if origin == self.origin:
            return  # this process's own: its subscribers had them from its workers
        for event in events:
            self.events.deliver(event)


class _Publisher(Hook):
    """Gathers the events of this process's workers and publishes them together."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self._pending: list[dict[str, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def before_job(self, job: JobRecord) -> None:
        self._add(event_of("started", job, self.feed.clock()))

    def on_progress(self, job: JobRecord, progress: dict[str, Any]) -> None:
        self._add(event_of("progress", job, self.feed.clock(), progress=progress))

    def after_job(self, job: JobRecord, outcome: Outcome) -> None:
        self._add(ended_event(job, outcome, self.feed.clock()))

    def _add(self, event: JobEvent) -> None:
        self._pending.append(event.as_data())
        if self._timer is None:  # hooks run on a running loop (a worker's, or neonnb's)
            self._timer = asyncio.get_running_loop().call_later(GATHER, self._send)

    async def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._send()
        here = [task for task in self._sending if task.get_loop() is asyncio.get_running_loop()]
        if here:
            await asyncio.wait(here, timeout=FLUSH_TIMEOUT)

    def _send(self) -> None:
        events, self._pending, self._timer = self._pending, [], None
        task = asyncio.get_running_loop().create_task(self.feed.publish(events))
        self._sending.add(task)  # held until done: a task nothing references may be collected
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("publishing job events failed (%r); listeners miss them", task.exception())


def pack(origin: str, events: list[dict[str, Any]]) -> list[str]:
    """``events`` as messages of at most MAX_MESSAGE characters each. An event too big for
    one alone (a long traceback) goes without its traceback and long texts."""
    messages: list[str] = []
    batch: list[str] = []
    size = 0
    head = len(json.dumps({"origin": origin, "events": []}))
    for event in events:
        text = json.dumps(event, separators=(",", ":"), default=str)
        if head + len(text) > MAX_MESSAGE:
            text = json.dumps(_slimmed(event), separators=(",", ":"), default=str)
            if head + len(text) > MAX_MESSAGE:
                logger.warning("job event %s of job %s is too big to publish", event.get("kind"), event.get("job_id"))
                continue
        if batch and head + size + len(text) + 1 > MAX_MESSAGE:
            messages.append(_message(origin, batch))
            batch, size = [], 0
        batch.append(text)
        size += len(text) + 1
    if batch:
        messages.append(_message(origin, batch))
    return messages


def _message(origin: str, events: list[str]) -> str:
    return f'{{"origin":{json.dumps(origin)},"events":[{",".join(events)}]}}'


def _slimmed(event: dict[str, Any]) -> dict[str, Any]:
    error = event.get("error") or {}
    slim = {**event, "progress": None}
    if error:
        slim["error"] = {"type": error.get("type"), "message": str(error.get("message", ""))[:1000]}
    return slim


def unpack(message: str) -> tuple[str, list[JobEvent]]:
    """The origin and events of a message; nothing of one this version can't read."""
    try:
        data = json.loads(message)
        events = [JobEvent.from_data(item) for item in data["events"]]
        return str(data["origin"]), [event for event in events if event is not None]
    except (ValueError, TypeError, KeyError):
        logger.warning("a job event message this version can't read: %.200r", message)
        return "", []
