"""The seam between the Redis driver and redis-py: what a URL means (one server over TCP or
TLS, a unix socket, a Redis Cluster found behind a node's address, a Sentinel-managed
master), the clients made from it, and which of redis-py's errors mean "Redis can't be
reached" (worth sending again) rather than "Redis refused".

    redis://[user:password@]host[:port][/db]        rediss:// for TLS
    unix:///path/to/redis.sock[?db=0]
    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]

Options in the query: ``db``, ``socket_timeout`` (seconds to wait for a reply, 10) and, for
TLS, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``.

Every client answers in text (``decode_responses``; a byte that isn't UTF-8, written by
someone else, turns into U+FFFD in that one value) and never sends a command again by
itself: the driver decides what may be resent (a claim whose reply was lost must not be).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any, cast

from ..config import positive_int, redact
from ..errors import ConfigError, MissingExtra

try:
    import redis
    import redis.asyncio
    import redis.asyncio.retry
    import redis.asyncio.sentinel
    import redis.sentinel
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the install
    raise MissingExtra("the redis driver needs redis-py: pip install 'neonnb[redis]'") from exc

__all__ = ["ERRORS", "NOT_RUN", "NO_REPLY", "TRANSIENT", "AsyncClient", "Settings", "SyncClient", "aclose",
           "close_blocking", "redis"]

AsyncClient = redis.asyncio.Redis | redis.asyncio.RedisCluster
SyncClient = redis.Redis | redis.RedisCluster

_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")

# Redis can't answer now, but may in a moment: a dropped or refused connection, a replica
# that was just demoted, a server still loading. Whether the command ran is not known.
TRANSIENT: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.ReadOnlyError, OSError)
# The command did not run: a cluster is moving its slot (ASK, TRYAGAIN), has moved it
# (MOVED), or has no master for it yet (CLUSTERDOWN). Always safe to send again.
NOT_RUN: tuple[type[BaseException], ...] = (
    redis.exceptions.AskError, redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
)
# Redis did not answer within the reply timeout: sending again would only double the wait.
NO_REPLY: tuple[type[BaseException], ...] = (redis.exceptions.TimeoutError, TimeoutError)
ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)


@dataclass(frozen=True)
class Settings:
    kind: str  # "tcp", "unix" or "sentinel"
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # the unix socket
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None  # the Sentinel service (master) name
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    tls: dict[str, Any] = field(default_factory=dict)  # redis-py's ssl_* options
    connect_timeout: float = 5.0
    reply_timeout: float = 10.0  # longest wait for a command's reply (socket_timeout in the URL)
    replica_acks: int | None = None  # replicas each job write must reach (replica_acks in the URL)

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None, database: int | None = None) -> Settings:
        shown = redact(url)  # errors name the URL, never its password
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ConfigError(f"a Redis URL starts with redis://, rediss:// (TLS), unix:// or redis+sentinel://, "
                              f"got {shown!r}")
        if "@" in parts.path + parts.query + parts.fragment:
            raise ConfigError(f"the Redis URL {shown!r} has a '/', '?', '#' or '@' in its user name or password: "
                              "percent-encode them (urllib.parse.quote(password, safe='')), or pass Config.password")
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
        unknown = set(query) - {"db", "socket_timeout", "replica_acks", *_TLS_OPTIONS}
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} in the Redis URL {shown!r}; "
                              f"known: db, socket_timeout, replica_acks, {', '.join(_TLS_OPTIONS)}")
        netloc = parts.netloc.rpartition("@")[2]
        common: dict[str, Any] = {
            "username": urllib.parse.unquote(parts.username) if parts.username else None,
            "password": password or (urllib.parse.unquote(parts.password) if parts.password else None),
            "reply_timeout": _seconds(query.get("socket_timeout", "10"), shown),
            "replica_acks": None if "replica_acks" not in query else positive_int(
                int(query["replica_acks"]) if query["replica_acks"].isdigit() else query["replica_acks"],
                f"replica_acks in the Redis URL {shown!r}", allow_zero=True),
        }
        if parts.scheme == "unix":
            return cls(kind="unix", path=parts.path, db=_db(database, query.get("db", "0"), shown), **common)
        if parts.scheme == "redis+sentinel":
            service, _, path_db = parts.path.strip("/").partition("/")
            if not service:
                raise ConfigError(f"the Sentinel URL {shown!r} names no service: "
                                  "redis+sentinel://host:port[,host:port...]/service_name[/db]")
            sentinels = tuple(_address(part, shown, 26379) for part in netloc.split(","))
            return cls(kind="sentinel", sentinels=sentinels, service=service,
                       db=_db(database, path_db or query.get("db", "0"), shown), **common)
        host, port = _address(netloc, shown, 6379)
        db = _db(database, parts.path.strip("/") or query.get("db", "0"), shown)
        return cls(kind="tcp", host=host, port=port, db=db, tls=_tls(query) if parts.scheme == "rediss" else {},
                   **common)

    def where(self) -> str:
        """Where Redis is, for messages (never a password)."""
        if self.kind == "unix":
            return f"unix://{self.path}"
        if self.kind == "sentinel":
            return f"{self.service} via Sentinel {','.join(f'{h}:{p}' for h, p in self.sentinels)}"
        return f"{self.host}:{self.port}/{self.db}"

    def _options(self, reply_timeout: float | None, *, blocking: bool = False) -> dict[str, Any]:
        # An asyncio client gets asyncio's Retry: redis-py >= 8.2 warns when given the sync one.
        retry = Retry(NoBackoff(), 0) if blocking else redis.asyncio.retry.Retry(NoBackoff(), 0)
        return {
            "username": self.username, "password": self.password, "decode_responses": True,
            "encoding_errors": "replace", "socket_timeout": reply_timeout,
            "socket_connect_timeout": self.connect_timeout, "retry": retry,
        }

    async def connect(self, *, reply_timeout: float | None = -1.0) -> AsyncClient:
        """A client on this loop: a RedisCluster when the server at the URL is a cluster
        node. ``reply_timeout=None``: no limit (a client that only waits in blocking pops)."""
        options = self._options(self.reply_timeout if reply_timeout == -1.0 else reply_timeout)
        if self.kind == "sentinel":
            # Typed as Any: redis-py's annotations of Sentinel differ between releases.
            sentinel: Any = redis.asyncio.sentinel.Sentinel(
                list(self.sentinels), socket_timeout=self.connect_timeout,
                socket_connect_timeout=self.connect_timeout)
            return cast(AsyncClient, sentinel.master_for(str(self.service), db=self.db, **options))
        if self.kind == "unix":
            return redis.asyncio.Redis(unix_socket_path=self.path, db=self.db, **options)
        client = redis.asyncio.Redis(host=self.host, port=self.port, db=self.db, **self._ssl(), **options)
        if await self._is_cluster(client):
            await client.aclose()
            cluster = redis.asyncio.RedisCluster(host=self.host, port=self.port, **self._ssl(), **options)
            await cluster.initialize()
            return cluster
        return client

    async def _is_cluster(self, client: redis.asyncio.Redis) -> bool:
        try:
            return bool((await client.info("cluster")).get("cluster_enabled"))
        except redis.exceptions.ResponseError:  # INFO not allowed to this ACL user
            return False

    def node(self, host: str, port: int, *, reply_timeout: float | None) -> redis.asyncio.Redis:
        """A client of one cluster node (a subscriber: PUBLISH reaches every node)."""
        return redis.asyncio.Redis(host=host, port=port, **self._ssl(), **self._options(reply_timeout))

    def connect_blocking(self) -> SyncClient:
        """A client for the calling thread, without asyncio (a sync dispatch)."""
        options = self._options(self.reply_timeout, blocking=True)
        if self.kind == "sentinel":
            sentinel: Any = redis.sentinel.Sentinel(list(self.sentinels), socket_timeout=self.connect_timeout,
                                                    socket_connect_timeout=self.connect_timeout)
            return cast(SyncClient, sentinel.master_for(str(self.service), db=self.db, **options))
        # One thread, one command at a time: one connection, without a pool's get and release.
        options["single_connection_client"] = True
        if self.kind == "unix":
            return redis.Redis(unix_socket_path=self.path, db=self.db, **options)
        client = redis.Redis(host=self.host, port=self.port, db=self.db, **self._ssl(), **options)
        try:
            clustered = bool(client.info("cluster").get("cluster_enabled"))
        except redis.exceptions.ResponseError:  # INFO not allowed to this ACL user
            clustered = False
        if not clustered:
            return client
        client.close()
        del options["single_connection_client"]
        return redis.RedisCluster(host=self.host, port=self.port, **self._ssl(), **options)

    def _ssl(self) -> dict[str, Any]:
        return {"ssl": True, **self.tls} if self.tls else {}


async def aclose(client: AsyncClient) -> None:
    """Close a client and every connection it made: a Sentinel master's client does not own
    its pool (redis-py leaves that pool, and the connections to the sentinels, open)."""
    if isinstance(client, redis.asyncio.RedisCluster):
        await client.aclose()
        return
    pool = client.connection_pool
    await client.aclose(close_connection_pool=True)
    for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", ()):
        await sentinel.aclose()


def close_blocking(client: SyncClient) -> None:
    """``aclose`` for a client of the calling thread."""
    client.close()
    if isinstance(client, redis.Redis):
        pool = client.connection_pool
        pool.disconnect()
        for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", ()):
            sentinel.close()


def _address(text: str, url: str, default_port: int) -> tuple[str, int]:
    """(host, port) of "host", "host:port", "[::1]:port"."""
    try:
        parts = urllib.parse.urlsplit(f"//{text}")
        return parts.hostname or "127.0.0.1", parts.port or default_port
    except ValueError:
        raise ConfigError(f"the port in the Redis URL {url!r} must be a number from 1 to 65535") from None


def _db(database: int | None, text: str, url: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"the database in the Redis URL {url!r} must be a number, got {text!r}")
    return database or int(text)  # Config.database, when set, wins over the URL


def _seconds(text: str, url: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigError(f"socket_timeout in the Redis URL {url!r} must be a number of seconds above 0, got {text!r}")
    return seconds


def _tls(query: dict[str, str]) -> dict[str, Any]:
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("none", "optional", "required"):
        raise ConfigError(f"ssl_cert_reqs must be none, optional or required, got {reqs!r}")
    options: dict[str, Any] = {
        "ssl_cert_reqs": reqs,
        # As before: the certificate is verified, its host name only when asked.
        "ssl_check_hostname": query.get("ssl_check_hostname", "false").lower() in ("1", "true", "yes"),
    }
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in query:
            options[name] = query[name]
    return options
