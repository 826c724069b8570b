"""neonnb's own Redis client (neonnb/drivers/resp.py), below the driver: URLs, pipelining
order, cancelled callers, a lost connection, cluster slots. The driver's behaviour on Redis is
the conformance suite's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from neonnb.drivers import resp
from neonnb.errors import ConfigError
from tests.services import RedisServer


def test_settings_from_urls() -> None:
    plain = resp.Settings.from_url("redis://127.0.0.1")
    assert (plain.host, plain.port, plain.db, plain.username, plain.password, plain.tls) == (
        "127.0.0.1", 6379, 0, None, None, None)
    acl = resp.Settings.from_url("redis://app:p%40ss@10.0.0.2:7000/4")
    assert (acl.host, acl.port, acl.db, acl.username, acl.password) == ("10.0.0.2", 7000, 4, "app", "p@ss")
    only_password = resp.Settings.from_url("redis://:secret@h/2", database=5)
    assert (only_password.username, only_password.password, only_password.db) == (None, "secret", 5)
    assert resp.Settings.from_url("rediss://h:6380/0?ssl_cert_reqs=none").tls is not None
    assert (plain.reply_timeout, resp.Settings.from_url("redis://h?socket_timeout=2.5").reply_timeout) == (10, 2.5)


@pytest.mark.parametrize(("url", "complaint"), [
    ("http://h:6379", "starts with redis:// or rediss://"),
    ("redis://h/zero", "must be a number"),
    ("redis://h/0?timeout=3", "unknown option"),
    ("redis://h/0?socket_timeout=0", "above 0"),
    ("redis://h/0?socket_timeout=soon", "above 0"),
    ("rediss://h/0?ssl_cert_reqs=maybe", "none, optional or required"),
])
def test_bad_urls_are_refused_saying_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        resp.Settings.from_url(url)


def test_key_slots_match_redis_py() -> None:
    for key in ["neonnb:{q}:job:1", "plain", "neonnb:queues", "{}empty-tag", "a{b}c{d}", "ünï{cödé}"]:
        assert resp.key_slot(key) == redis.crc.key_slot(key.encode())


@pytest.fixture
def server() -> Iterator[RedisServer]:
    started = RedisServer()
    yield started
    started.stop()


def with_client(server: RedisServer, scenario: Callable[[resp.Client], Awaitable[None]]) -> None:
    """Run ``scenario(client)`` on a new loop with a client of the server, closed after."""
    async def run() -> None:
        client = resp.Client(resp.Settings.from_url(server.url()))
        try:
            await scenario(client)
        finally:
            client.close()

    asyncio.run(run())


def test_pipelined_callers_get_their_own_replies_even_when_one_gives_up(server: RedisServer) -> None:
    async def scenario(client: resp.Client) -> None:
        await client.execute("SET", "k", "v")
        # A caller cancelled while its command is in flight must not shift the replies
        # of the commands behind it.
        slow = asyncio.ensure_future(client.execute("BLPOP", "nothing", "0.2"))
        await asyncio.sleep(0.01)
        slow.cancel()
        replies = await asyncio.gather(*(client.execute("ECHO", str(i)) for i in range(100)))
        assert replies == [str(i) for i in range(100)]
        assert await client.execute("GET", "k") == "v"
        with pytest.raises(resp.ReplyError, match="WRONGTYPE"):
            await client.execute("LPUSH", "k", "x")
        assert await client.pipeline([("ECHO", "a"), ("ECHO", "b")]) == ["a", "b"]

    with_client(server, scenario)


def test_a_lost_connection_fails_the_waiting_commands_and_the_next_one_reconnects(server: RedisServer) -> None:
    async def scenario(client: resp.Client) -> None:
        assert await client.execute("PING") == "PONG"
        waiting = asyncio.ensure_future(client.execute("BLPOP", "nothing", "0.5"))
        await asyncio.sleep(0.05)
        server.kill()
        server.start()
        # The command in flight was sent again on a new connection (the driver's commands
        # are safe to repeat) and timed out there; the next one goes through.
        assert await asyncio.wait_for(waiting, 5) is None
        assert await client.execute("PING") == "PONG"
        server.kill()
        with pytest.raises(resp.ConnectionLost):
            await client.execute("PING")  # three more tries, then it says so

    with_client(server, scenario)


def test_a_script_is_loaded_where_it_is_missing(server: RedisServer) -> None:
    async def scenario(client: resp.Client) -> None:
        script = resp.Script("return {KEYS[1], ARGV[1]}")
        assert await client.script(script, ["k"], ["a"]) == ["k", "a"]
        await client.execute("SCRIPT", "FLUSH")
        assert await client.script(script, ["k"], ["b"]) == ["k", "b"]

    with_client(server, scenario)


def moves_large_values(settings: resp.Settings) -> None:
    """A blocking connection (sync dispatch) sends and reads back a value far larger than the
    socket buffers: its non-blocking socket writes and reads it in many pieces."""
    connection = resp.BlockingConnection((settings.host, settings.port), settings)
    try:
        value = secrets.token_hex(4_000_000)  # 8 MB
        assert connection.execute("SET", "big", value) == "OK"
        assert connection.execute("GET", "big") == value
        assert connection.execute("PING") == "PONG"  # in step after the large reply
    finally:
        connection.close()


def test_a_blocking_connection_moves_values_larger_than_the_socket_buffers(server: RedisServer) -> None:
    moves_large_values(resp.Settings.from_url(server.url()))


class CountingSocket:
    """A socket that counts the reads made on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.reads = sock, 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        return self.sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_a_blocking_connection_sleeps_instead_of_spinning_once_replies_are_slow(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 20 ms spin instead of 200 µs: a thread preempted for 200 µs (this VM does that) could
    # otherwise ask the socket only twice in its spin. 50 ms replies still count as slow.
    monkeypatch.setattr(resp, "_SPIN", 0.02 if resp._CPUS > 1 else 0.0)
    settings = resp.Settings.from_url(server.url())
    connection = resp.BlockingConnection((settings.host, settings.port), settings)
    counting = CountingSocket(connection._sock)
    connection._sock = counting  # type: ignore[assignment]
    try:
        connection.execute("PING")
        fast = connection._last_wait < resp._SPIN  # usually; and only with a second core
        counting.reads = 0
        assert connection.execute("BLPOP", "nothing", "0.05") is None  # a reply 50 ms late
        spun = counting.reads
        counting.reads = 0
        assert connection.execute("BLPOP", "nothing", "0.05") is None
        assert counting.reads <= 2, "it spun although the last reply took 50 ms"  # one try, then poll
        if fast:  # after a fast reply the next wait spun before it slept
            assert spun > 2
    finally:
        connection.close()


def test_a_caller_cancelled_while_connecting_leaves_no_connection_behind(server: RedisServer) -> None:
    def clients() -> int:
        with redis.Redis(port=server.port) as admin:
            return len(admin.client_list()) - 1  # all but this one

    async def scenario(client: resp.Client) -> None:
        caller = asyncio.ensure_future(client.execute("PING"))
        await asyncio.sleep(0)  # the connect has begun
        caller.cancel()
        while clients() == 0:  # the connect goes on and succeeds
            await asyncio.sleep(0.01)
        client.close()  # and closes the connection nobody was left waiting for
        for _ in range(500):
            if clients() == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the connection stayed open after close()")

    with_client(server, scenario)


def test_a_dedicated_connection_cancelled_while_it_opens_is_closed() -> None:
    server = RedisServer("--requirepass", "secret")  # the AUTH exchange is a step to be cancelled in
    settings = resp.Settings.from_url(f"redis://:secret@127.0.0.1:{server.port}/3")  # SELECT too

    def connections() -> int:
        with redis.Redis(port=server.port, password="secret") as admin:
            return len(admin.client_list()) - 1

    async def scenario() -> None:
        client = resp.Client(settings)
        await client.is_cluster()  # (its connection to the server is open from here on)
        for steps in range(40):  # cancel after each number of loop turns in turn
            opening = asyncio.ensure_future(client.connect("k"))
            for _ in range(steps):
                await asyncio.sleep(0)
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                (await opening).close()  # it finished opening before the cancel landed
        client.close()
        for _ in range(500):
            if connections() == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{connections()} connection(s) left open")

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_the_reply_timeout_spares_idle_connections_and_blocking_pops(server: RedisServer) -> None:
    async def scenario() -> None:
        client = resp.Client(dataclasses.replace(resp.Settings.from_url(server.url()), reply_timeout=0.25))
        try:
            assert await client.execute("CLIENT", "SETNAME", "first") == "OK"
            popper = await client.connect("k")  # a worker's own connection for its blocking pop
            await asyncio.sleep(0.5)  # idle for twice the reply timeout: nothing is waiting
            assert await client.execute("CLIENT", "GETNAME") == "first"  # the same connection
            assert await popper.send([("BLPOP", "k", "0.6")])[0] is None  # waited it out
            popper.close()
        finally:
            client.close()

    asyncio.run(scenario())
