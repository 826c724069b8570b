"""The async worker pool: reserve -> run -> complete / retry / fail, with leases and timeouts.

One task per worker reserves as many jobs as it has free slots (``loop``), runs each in its
own task (``execute``: async handlers on the loop, sync handlers in a thread pool), keeps
their leases alive with a heartbeat and records every outcome (``outcomes``). Nothing a job
does can kill the worker: every failure becomes a retry or an entry in the failed store.
"""

from .loop import Worker

__all__ = ["Worker"]
