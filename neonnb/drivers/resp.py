"""A small asyncio Redis client: what the Redis driver needs and nothing more.

Why not redis-py's asyncio client: measured here, one command through it costs ~138 µs where
the round trip itself is ~91 µs (5,000 sequential EVALSHA on loopback); its pool, locks and
pure-Python packing were most of a dispatch. This client keeps one connection per server,
pipelines every caller's commands on it (replies come back in order), and packs and parses
in C with hiredis. It speaks RESP2 to one server or to a Redis Cluster (commands go to the
node that owns their key's slot; MOVED refreshes the slot map), over TCP or TLS, with ACL
users, passwords and database numbers. A command whose reply is later than the reply timeout
fails (NoReply) instead of waiting on TCP. BlockingClient is the same without asyncio, for a
sync dispatch from a thread that is not on an event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import os
import selectors
import socket
import ssl
import time
import typing
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import redact
from ..errors import ConfigError

try:
    import hiredis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError("the redis driver needs hiredis: pip install 'neonnb[redis]'") from exc

ReplyError = hiredis.ReplyError  # an error reply; its message starts with the code (NOSCRIPT, MOVED, ...)
Address = tuple[str, int]
Command = Sequence[str | int | float | bytes]
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_RETRIES = 3  # per command, on a lost connection: 50, 100, 200 ms apart
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_SPIN = 200e-6 if _CPUS > 1 else 0.0  # BlockingConnection._receive


class ConnectionLost(ConnectionError):
    """The connection to Redis closed or could not be made."""


class NoReply(ConnectionError):
    """Redis took longer than the reply timeout to answer (a hung server or a network that
    drops packets, where TCP alone would wait many minutes). Not retried: waiting again
    would only double the wait."""


class SlotMoving(ConnectionError):
    """A Redis Cluster slot took longer than the reply timeout to move to another node."""


def no_reply(timeout: float) -> NoReply:
    return NoReply(f"Redis sent no reply within {timeout:g}s")


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    tls: ssl.SSLContext | None = None
    connect_timeout: float = 5.0
    reply_timeout: float = 10.0  # longest wait for a command's reply (socket_timeout in the URL)

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None, database: int | None = None) -> Settings:
        """``redis://[user:password@]host[:port][/db]`` or ``rediss://`` (TLS), options in the
        query: socket_timeout (seconds to wait for a reply), and for TLS ssl_ca_certs,
        ssl_certfile, ssl_keyfile, ssl_cert_reqs, ssl_check_hostname."""
        shown = redact(url)  # errors name the URL, never its password
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(f"a Redis URL starts with redis:// or rediss:// (TLS), got {shown!r}")
        if "@" in parts.path + parts.query + parts.fragment:
            raise ConfigError(f"the Redis URL {shown!r} has a '/', '?', '#' or '@' in its user name or password: "
                              "percent-encode them (urllib.parse.quote(password, safe='')), or pass Config.password")
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
        unknown = set(query) - {"db", "socket_timeout", *_TLS_OPTIONS}
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} in the Redis URL {shown!r}; "
                              f"known: db, socket_timeout, {', '.join(_TLS_OPTIONS)}")
        path_db = parts.path.strip("/") or query.get("db", "0")
        if not path_db.isdigit():
            raise ConfigError(f"the database in the Redis URL {shown!r} must be a number, got {path_db!r}")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ConfigError(f"the port in the Redis URL {shown!r} must be a number from 1 to 65535") from None
        return cls(
            host=parts.hostname or "127.0.0.1", port=port,
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=password or (urllib.parse.unquote(parts.password) if parts.password else None),
            db=database or int(path_db),  # Config.database, when set, wins over the URL
            tls=_tls_context(query) if parts.scheme == "rediss" else None,
            reply_timeout=_seconds(query.get("socket_timeout", "10"), shown),
        )

    def hello(self) -> list[Command]:
        """What a new connection sends first: AUTH and SELECT, as configured."""
        hello: list[Command] = []
        if self.password:
            hello.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        return hello


def _seconds(text: str, url: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigError(f"socket_timeout in the Redis URL {url!r} must be a number of seconds above 0, got {text!r}")
    return seconds


def _tls_context(query: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    # As redis-py: the certificate is verified, its host name only when asked.
    context.check_hostname = query.get("ssl_check_hostname", "false").lower() in ("1", "true", "yes")
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("none", "optional", "required"):
        raise ConfigError(f"ssl_cert_reqs must be none, optional or required, got {reqs!r}")
    context.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(reqs, ssl.CERT_REQUIRED)
    if "ssl_certfile" in query:
        context.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
    return context


class Connection(asyncio.Protocol):
    """One pipelined connection: each command's reply resolves its future, in order. A
    subscriber connection (``pushes`` given) delivers every reply to that queue instead.
    With ``reply_timeout``, commands waiting that long without a reply end the connection
    and fail with NoReply."""

    def __init__(self) -> None:
        # neonnb stores only text: a byte that isn't UTF-8 was written by someone else, and
        # must turn into U+FFFD in that one value, not make every reply unreadable.
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.reply_timeout: float | None = None
        self.pushes: asyncio.Queue[Any] | None = None
        self.lost: ConnectionError | None = None

    @classmethod
    async def open(cls, address: Address, settings: Settings, pushes: asyncio.Queue[Any] | None = None,
                   reply_timeout: float | None = None) -> Connection:
        loop = asyncio.get_running_loop()
        host, port = address
        try:
            transport, connection = await asyncio.wait_for(
                loop.create_connection(cls, host, port, ssl=settings.tls,
                                       server_hostname=host if settings.tls else None),
                settings.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectionLost(f"can't connect to {host}:{port}: {exc or type(exc).__name__}") from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a peer that vanishes without closing is noticed, eventually
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        connection.reply_timeout = settings.reply_timeout  # AUTH and SELECT get no longer either
        try:
            for reply in await asyncio.gather(*connection.send(settings.hello()), return_exceptions=True):
                if isinstance(reply, BaseException):
                    raise reply
        except ReplyError as exc:
            connection.close()
            raise ConnectionLost(f"Redis at {host}:{port} refused the connection: {exc}") from exc
        except BaseException:  # cancelled, or lost, before it could be handed over
            connection.close()
            raise
        connection.pushes = pushes  # from here on, for a subscriber
        connection.reply_timeout = reply_timeout
        return connection

    def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Write the commands in one go; the futures resolve with their replies."""
        if self.lost is not None or self._transport is None:
            raise self.lost or ConnectionLost("not connected")
        # (hiredis's stub declares a one-element tuple; any length is packed)
        packed = b"".join(hiredis.pack_command(tuple(command)) for command in commands)  # type: ignore[arg-type]
        if self.pushes is not None:  # a subscriber's replies all go to pushes
            self._transport.write(packed)
            return []
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)  # only once packed: a bad argument must not leave a waiter
        self._transport.write(packed)
        if futures and self._watchdog is None:
            self._watch(loop)
        return futures

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the waiting commands if no reply comes within the reply timeout."""
        if self.reply_timeout is not None:
            self._watchdog = loop.call_later(self.reply_timeout, self._no_reply, self.reply_timeout)

    def _no_reply(self, timeout: float) -> None:
        self._watchdog = None
        self._fail(no_reply(timeout))
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, error: ConnectionError) -> None:
        self.lost = self.lost or error
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always a subclass of asyncio.Transport (uvloop's)
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if self.pushes is not None:
                self.pushes.put_nowait(reply)
                continue
            waiter = self._waiting.popleft()
            if waiter.done():  # its caller gave up (cancelled); the reply is not theirs to see
                continue
            if isinstance(reply, ReplyError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)
        if self._watchdog is not None:  # the server answers: the wait starts again for the rest
            self._watchdog.cancel()
            self._watchdog = None
            if self._waiting:
                self._watch(asyncio.get_running_loop())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._fail(ConnectionLost(f"connection to Redis lost: {exc or 'closed'}"))
        if self.pushes is not None:
            assert self.lost is not None
            self.pushes.put_nowait(self.lost)


class BlockingConnection:
    """A plain socket to one node, for BlockingClient. It waits for a reply by spinning
    briefly before it sleeps (see ``_receive``)."""

    def __init__(self, address: Address, settings: Settings) -> None:
        try:
            self._sock = socket.create_connection(address, settings.connect_timeout)
        except TimeoutError as exc:  # accepted by no one: the loop's way would only wait as long again
            raise NoReply(f"Redis did not accept a connection within {settings.connect_timeout:g}s") from exc
        self._reply_timeout = settings.reply_timeout
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self._selector = selectors.DefaultSelector()  # one per connection: ~3 µs less a wait than one per wait
        self._last_wait = 0.0  # how long the last reply took
        try:
            self._sock.settimeout(settings.reply_timeout)  # for the TLS handshake
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if settings.tls:
                self._sock = settings.tls.wrap_socket(self._sock, server_hostname=address[0])
            self._sock.setblocking(False)  # execute does its own waiting
            self._selector.register(self._sock, selectors.EVENT_READ)
            for command in settings.hello():
                self.execute(*command)
        except BaseException:
            self.close()
            raise

    def execute(self, *command: Any) -> Any:
        try:
            sent = time.perf_counter()
            deadline = sent + self._reply_timeout
            self._send(hiredis.pack_command(command), deadline)
            while (reply := self._reader.gets()) is False:
                self._reader.feed(self._receive(sent, deadline))
            self._last_wait = time.perf_counter() - sent
        except BaseException:  # a reply half read, or an interrupt: the stream is out of step
            self.close()
            raise
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._wait(selectors.EVENT_WRITE, deadline)

    def _receive(self, sent: float, deadline: float) -> bytes:
        """The next bytes of the reply. Until _SPIN after sending, this asks the socket again
        and again instead of sleeping: a reply from a Redis on this machine is often back in
        tens of µs, sooner than a sleeping thread is woken for it (on this project's 2-core
        VM a PING took 27 µs spinning, 80 µs sleeping). It spins only while the last reply
        came within that time (so not for a Redis across a slow network), and only where the
        process has a second core (on one, spinning would hold the core Redis needs)."""
        spin_until = sent + _SPIN if self._last_wait < _SPIN else 0.0
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                if time.perf_counter() >= spin_until:
                    self._wait(selectors.EVENT_READ, deadline)
                continue
            if not data:
                raise ConnectionLost("connection to Redis closed")
            return data

    def _wait(self, events: int, deadline: float) -> None:
        if self._selector.get_key(self._sock).events != events:
            self._selector.modify(self._sock, events)
        if not self._selector.select(max(0.0, deadline - time.perf_counter())):
            raise no_reply(self._reply_timeout)

    @property
    def closed(self) -> bool:
        return self._sock.fileno() == -1

    def close(self) -> None:
        self._selector.close()
        self._sock.close()


class BlockingClient:
    """Blocking connections to a server or a cluster's nodes, for one thread that is not on
    an event loop: a sync dispatch from a notebook cell goes straight to Redis instead of
    through neonnb's loop thread (see QueueManager._enqueue_sync). It neither retries nor
    follows a MOVED: on a failure the caller closes it and goes the loop's way, which does."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()  # a forked child makes its own instead of sharing these sockets
        self.seed: Address = (settings.host, settings.port)
        self._nodes: dict[Address, BlockingConnection] = {}
        self.closed = False
        seed = self._connection(self.seed)
        self._slots = (_slot_map(seed.execute("CLUSTER", "SLOTS"), self.seed)
                       if "cluster_enabled:1" in str(seed.execute("INFO", "cluster")) else None)

    def script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        node = self._connection(self.seed if self._slots is None else _owner(self._slots, keys[0]))
        try:
            return node.execute(*script.command(keys, args))
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        node.execute("SCRIPT", "LOAD", script.body)
        return node.execute(*script.command(keys, args))

    def _connection(self, address: Address) -> BlockingConnection:
        connection = self._nodes.get(address)
        if connection is None or connection.closed:
            connection = self._nodes[address] = BlockingConnection(address, self.settings)
        return connection

    def close(self) -> None:
        self.closed = True
        for connection in self._nodes.values():
            connection.close()

    def __del__(self) -> None:  # the thread that held it ended
        self.close()


class Script:
    """A Lua script called by its SHA1 (loaded on a node the first time it is missing there)."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


class Client:
    """Commands to one Redis server or to a cluster's nodes, one pipelined connection each.
    A command whose connection is lost is sent again on a new one, up to three times, then
    fails with ConnectionLost: the driver's scripts are safe to repeat, except a claim
    (``resend=False``), which the server may have run with its reply lost."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seed: Address = (settings.host, settings.port)
        self.cluster: bool | None = None  # asked of the server on first use
        self._slots: SlotMap = []
        self._nodes: dict[Address, Connection] = {}
        self._opening: dict[Address, asyncio.Task[Connection]] = {}
        self.closed = False

    async def execute(self, *command: Any, key: str | None = None) -> Any:
        """Run one command; ``key`` (on a cluster) picks the node."""
        return (await self.pipeline([command], key=key))[0]

    async def script(self, script: Script, keys: Sequence[str], args: Sequence[Any], resend: bool = True) -> Any:
        command = script.command(keys, args)
        node = keys[0] if keys else None
        try:
            return (await self.pipeline([command], key=node, resend=resend))[0]
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script.body, key=node)
        return (await self.pipeline([command], key=node, resend=resend))[0]

    async def pipeline(self, commands: Sequence[Command], key: str | None = None, resend: bool = True) -> list[Any]:
        """Run commands, pipelined: on a cluster each goes to the node of its first key
        (``key``, or the command's own first argument after its name). ``resend=False``: a
        lost connection fails at once (the commands may have run)."""
        attempt, moving_since = 0, None
        while True:
            try:
                return await self._send(commands, key)
            except ReplyError as exc:
                code = str(exc).split(" ", 1)[0]
                if code == "MOVED" and attempt < _RETRIES:  # the slot has a new owner: the map says which
                    self._slots = []
                    attempt += 1
                elif code in ("ASK", "TRYAGAIN"):
                    # The slot is moving to another node (resharding). A script names only
                    # its queue's base key and finds the others as it goes, so it can't run
                    # on either node while the keys are split between them (on the new one,
                    # after ASKING, it would see half a queue): wait for the move to end,
                    # as long as for a reply; MOVED then names the new owner.
                    now = time.monotonic()
                    moving_since = moving_since or now
                    if now - moving_since > self.settings.reply_timeout:
                        raise SlotMoving(f"Redis Cluster has been moving the slot of these keys to another node "
                                         f"for over {self.settings.reply_timeout:g}s ({exc})") from exc
                    await asyncio.sleep(0.05)
                else:
                    raise
            except ConnectionLost:
                if attempt == _RETRIES or not resend:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
                attempt += 1

    async def _send(self, commands: Sequence[Command], key: str | None) -> list[Any]:
        cluster = await self.is_cluster()
        by_node: dict[Address, list[int]] = {}
        for i, command in enumerate(commands):
            address = await self._node_for(key if key is not None else str(command[1])) if cluster else self.seed
            by_node.setdefault(address, []).append(i)
        replies: list[Any] = [None] * len(commands)
        sent = []
        for address, indexes in by_node.items():
            connection = await self._connection(address)
            sent.append((indexes, connection.send([commands[i] for i in indexes])))
        # Awaited one by one, not gathered: replies come in order, and a gather would cost
        # every command an extra turn of the loop.
        for indexes, futures in sent:
            for i, future in zip(indexes, futures, strict=True):
                try:
                    replies[i] = await future
                except (ReplyError, ConnectionError) as exc:
                    replies[i] = exc
        error = next((reply for reply in replies if isinstance(reply, BaseException)), None)
        if error is not None:
            raise error
        return replies

    async def is_cluster(self) -> bool:
        if self.cluster is None:
            connection = await self._connection(self.seed)
            self.cluster = "cluster_enabled:1" in str(await connection.send([("INFO", "cluster")])[0])
        return self.cluster

    async def _node_for(self, key: str) -> Address:
        if not self._slots:
            seed = await self._connection(self.seed)
            self._slots = _slot_map(await seed.send([("CLUSTER", "SLOTS")])[0], self.seed)
        return _owner(self._slots, key)

    async def _connection(self, address: Address) -> Connection:
        connection = self._nodes.get(address)
        if connection is not None and connection.lost is None:
            return connection
        # One connect per node at a time: concurrent callers share it. The connection is
        # kept when it opens, not when a caller resumes: callers cancelled meanwhile must not
        # leave it open and unowned.
        opening = self._opening.get(address)
        if opening is None:
            opening = self._opening[address] = asyncio.ensure_future(
                Connection.open(address, self.settings, reply_timeout=self.settings.reply_timeout))

            def opened(task: asyncio.Task[Connection]) -> None:
                self._opening.pop(address, None)
                if not task.cancelled() and task.exception() is None:
                    self._nodes[address] = task.result()
                    if self.closed:
                        task.result().close()

            opening.add_done_callback(opened)
        return await asyncio.shield(opening)

    async def connect(self, key: str) -> Connection:
        """A connection of its own to the node that serves ``key``, for a blocking command
        (which holds its connection until it returns)."""
        address = await self._node_for(key) if await self.is_cluster() else self.seed
        return await Connection.open(address, self.settings)

    async def subscribe(self, channel: str, on_subscribed: Callable[[], None]) -> AsyncIterator[str]:
        """The messages published on ``channel`` (a cluster forwards every PUBLISH to all nodes,
        so the seed node hears them all), until the connection is lost; ``on_subscribed()``
        runs once the server confirms."""
        pushes: asyncio.Queue[Any] = asyncio.Queue()
        connection = await Connection.open(self.seed, self.settings, pushes)
        try:
            connection.send([("SUBSCRIBE", channel)])
            while True:
                push = await pushes.get()
                if isinstance(push, (ConnectionLost, ReplyError)):
                    raise push
                if push[0] == "subscribe":
                    on_subscribed()
                elif push[0] == "message":
                    yield str(push[2])
        finally:
            connection.close()

    def close(self) -> None:
        self.closed = True
        for connection in self._nodes.values():
            connection.close()
        self._nodes.clear()


SlotMap = list[tuple[int, int, Address]]


def _slot_map(reply: list[Any], seed: Address) -> SlotMap:
    """CLUSTER SLOTS' reply as (first slot, last slot, master's address) ranges."""
    return sorted((int(s[0]), int(s[1]), (str(s[2][0]) or seed[0], int(s[2][1]))) for s in reply)


def _owner(slots: SlotMap, key: str) -> Address:
    slot = key_slot(key)
    for first, last, address in slots:
        if first <= slot <= last:
            return address
    raise ConnectionLost(f"no Redis Cluster node serves slot {slot}")


def key_slot(key: str) -> int:
    """The Redis Cluster slot of ``key``: CRC16 of its {hash tag} if it has one, modulo 16384."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return _slot(key)


@functools.lru_cache(maxsize=4096)  # every key of a queue shares its tag: few distinct inputs
def _slot(tag: str) -> int:
    crc = 0
    for byte in tag.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384
