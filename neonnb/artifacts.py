"""Big arguments and results, kept apart from the job's record (fsspec).

A job's encoded payload or result from ``ARTIFACT_BYTES`` on is written to a file under
``Config.artifacts`` (an fsspec URL: ``file:///shared/neonnb``, ``s3://bucket/prefix`` with
s3fs, ``gs://``, ``memory://``), ``<root>/<job id>/payload.json`` or ``result.json``, and the
record holds a reference, itself a tagged value: ``{"$type": "artifact", "value": "<url>",
"bytes": N}``. The URL is whole, so any process that can reach the location reads it (S3
credentials and endpoints come from the environment, as s3fs reads them).

Where nothing is configured: an SQLite store keeps them in a folder beside its file, the memory
store in memory; Redis, PostgreSQL and MariaDB keep values in the store itself up to
``Config.max_value_bytes`` and refuse bigger ones with a message saying to set ``artifacts``.

The file is written before the record that names it. Files go with their job: at once when it
is forgotten, and for every other way a job goes (result_ttl, purge, flush, a store's own
expiry) housekeeping sweeps the folders of jobs the store no longer has, once they are older
than ``SWEEP_AFTER`` (a dispatch writes the file first, then the record).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .errors import ConfigError, MissingExtra, PayloadError, StoreUnavailable

ARTIFACT_BYTES = 256 * 1024  # encoded values from this size on are kept apart when there is a place for them
OFF_LOOP_BYTES = ARTIFACT_BYTES  # stored values from this size on (or kept apart) decode on a thread: ~1 ms of a loop
SWEEP_AFTER = 3600.0  # seconds: a folder younger than this may belong to a job being stored right now
PREFIX = '{"$type":"artifact"'
logger = logging.getLogger("neonnb.artifacts")


def is_reference(text: str | None) -> bool:
    return text is not None and text.startswith(PREFIX)


def resolve(text: str) -> str:
    """A stored payload or result as its full text: read from its artifact if it is a reference."""
    if not is_reference(text):
        return text
    return read(json.loads(text)["value"])


def default_location(driver: str, connection: Any) -> str | None:
    """Where an unconfigured store keeps big values: beside an SQLite file, in memory for the
    memory store; None (in the store, up to max_value_bytes) for the others."""
    if driver == "memory":
        return f"memory://neonnb-artifacts-{uuid.uuid4().hex}"
    if isinstance(connection, str) and connection.startswith("sqlite") and ":memory:" not in connection:
        path = connection.partition("://")[2][1:].partition("?")[0]  # sqlite:///jobs.db is jobs.db
        if path:
            return "file://" + os.path.abspath(path) + "-artifacts"
    return None


class Artifacts:
    """One artifact location."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a dependency
            raise MissingExtra("artifacts need fsspec: pip install fsspec") from exc
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"Config.artifacts {url!r} can't be used: {exc}") from None
        self.url = url.rstrip("/")
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"<neonnb.Artifacts {self.url}>"

    def put(self, job_id: str, part: str, text: str) -> str:
        """Write ``text`` (a job's ``payload`` or ``result``); the reference the record keeps."""
        folder = f"{self.root}/{job_id}"
        path = f"{folder}/{part}.json"
        data = text.encode()
        try:
            self.fs.makedirs(folder, exist_ok=True)
            self.fs.pipe_file(path, data)
        except OSError as exc:
            raise StoreUnavailable(f"can't write to the artifacts at {self.url}: {exc}") from exc
        return json.dumps({"$type": "artifact", "value": f"{self.url}/{job_id}/{part}.json", "bytes": len(data)},
                          separators=(",", ":"))

    def delete(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            try:
                self.fs.rm(f"{self.root}/{job_id}", recursive=True)
            except FileNotFoundError:
                pass
            except OSError as exc:  # the sweep tries again later
                logger.warning("could not delete the artifacts of job %s at %s (%r)", job_id, self.url, exc)

    def job_ids(self) -> list[str]:
        """The jobs that have a folder here."""
        try:
            return [entry.rstrip("/").rpartition("/")[2] for entry in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    async def sweep(self, now: float, stored: Callable[[list[str]], Awaitable[set[str]]],
                    run: Callable[..., Awaitable[Any]]) -> int:
        """Delete the folders of jobs the store no longer has (``stored`` says which of some ids
        it has), older than SWEEP_AFTER by their id's time; ``run`` runs blocking I/O off the loop."""
        old = [job_id for job_id in await run(self.job_ids) if _created(job_id) < now - SWEEP_AFTER]
        gone: list[str] = []
        for start in range(0, len(old), 500):
            chunk = old[start:start + 500]
            kept = await stored(chunk)
            gone += [job_id for job_id in chunk if job_id not in kept]
        if gone:
            await run(self.delete, gone)
        return len(gone)


def read(url: str) -> str:
    """The text of the artifact at ``url`` (a reference's value)."""
    import fsspec

    try:
        return str(fsspec.core.url_to_fs(url)[0].cat_file(url).decode())
    except FileNotFoundError:
        raise PayloadError(f"the value kept apart at {url} is gone (deleted with its job?)") from None
    except OSError as exc:
        raise StoreUnavailable(f"can't read the artifact {url}: {exc}") from exc


def _created(job_id: str) -> float:
    """When a job id was made (its first 16 hex digits are nanoseconds since the epoch);
    infinitely late for a name that isn't an id: a folder neonnb didn't make is never swept."""
    try:
        return int(job_id[:16], 16) / 1e9
    except ValueError:
        return float("inf")
