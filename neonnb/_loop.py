"""One private asyncio loop in a daemon thread; sync calls submit to it.

A notebook kernel already runs a loop on the main thread, and its tasks starve while a cell
runs sync code, so neonnb keeps its own loop on the ``neonnb-loop`` thread (the pattern of
dask's LoopRunner). Every sync method of the public API is a one-line bridge to it, except
the single-job dispatch family, which stores the job from the calling thread: two thread
wake-ups were most of a dispatch's time (see QueueManager._enqueue_sync).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread  # its exit hook registers now, before ours, and so runs after it
import contextvars
import logging
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
logger = logging.getLogger("neonnb")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="neonnb-loop", daemon=True)
            _thread.start()
            started.wait()
            _loop = loop
        return _loop


def shutdown(timeout: float = 5.0) -> None:
    """Stop the background loop and its thread (``%unload_ext neonnb``); tasks still on it
    are cancelled. The next neonnb call starts a fresh loop."""
    global _loop, _thread
    with _lock:
        loop, thread, _loop, _thread = _loop, _thread, None, None
    if loop is None or thread is None:
        return

    async def cancel_all() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.shutdown_asyncgens()  # as asyncio.run() does (the Redis driver closes its connections there)
        await asyncio.sleep(0)  # transports closed by those tasks close their sockets next turn
        loop.stop()

    asyncio.run_coroutine_threadsafe(cancel_all(), loop)
    thread.join(timeout)
    if not thread.is_alive():
        loop.close()


class Closable(Protocol):
    async def aclose(self) -> None: ...


_open: weakref.WeakSet[Closable] = weakref.WeakSet()
EXIT_TIMEOUT = 5.0  # seconds an interpreter exit waits for open managers to close


def close_at_exit(resource: Closable) -> None:
    """Close ``resource`` when the interpreter exits if it is still open then (a script or a
    kernel that never called ``close()``): its workers unregister and give their jobs back,
    and no task is left pending on a loop that dies with the process."""
    _open.add(resource)


def closed(resource: Closable) -> None:
    _open.discard(resource)


def open_resources() -> list[Any]:
    """What is open in this process now (every QueueManager not closed yet)."""
    return list(_open)


def _close_open_resources() -> None:
    loop = _loop
    if loop is None or not loop.is_running():
        return
    resources = list(_open)

    async def close_all() -> None:
        results = await asyncio.gather(*(r.aclose() for r in resources), return_exceptions=True)
        for resource, result in zip(resources, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("closing %r at exit failed: %r", resource, result)

    try:
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(close_all(), EXIT_TIMEOUT), loop).result()
    except Exception as exc:  # the process is ending either way: say so, don't raise in atexit
        logger.warning("neonnb could not close everything at exit (%r)", exc)
    shutdown(EXIT_TIMEOUT)


# Before the interpreter stops its thread pools (concurrent.futures does so from the same hook,
# registered earlier by the import above; hooks run last registered first): closing a store
# may need its driver's threads.
# Python 3.9+ has the hook; elsewhere, a plain atexit handler.
_register = getattr(threading, "_register_atexit", atexit.register)
_register(_close_open_resources)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def on_loop_thread() -> bool:
    return threading.current_thread() is _thread


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop without waiting for it. It outlives the call,
    so it starts from an empty context: in a kernel it must not keep the parent of the cell that
    started it (ipykernel then sends its displays and widget updates on behalf of the cell
    that runs at the time, which is what nbclient and JupyterLab file them under)."""
    return contextvars.Context().run(asyncio.run_coroutine_threadsafe, coro, get_loop())


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and wait for its result.

    Called from the loop's own thread this would deadlock, so it refuses. A KeyboardInterrupt
    (the notebook's Interrupt button) cancels the coroutine before it propagates.
    """
    if on_loop_thread():
        coro.close()
        raise RuntimeError(
            "a sync neonnb call was made on neonnb's own event loop; inside async code use "
            "the async twin (e.g. `await qm.adispatch(...)` instead of `qm.dispatch(...)`)"
        )
    future = submit(coro)
    try:
        return future.result(timeout)
    except KeyboardInterrupt:
        future.cancel()
        # One line that says what stopped, not a traceback through concurrent.futures' locks.
        raise KeyboardInterrupt("interrupted while waiting; the jobs themselves go on in the background "
                                "(stop workers with worker.stop() or %neonnb stop)") from None
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise
