"""What only Redis has: Cluster slots, TLS, ACL users, database numbers. (Job behaviour on
Redis and on a Redis Cluster is the conformance suite's.)"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from neonnb import Config, ConfigError, QueueManager, Status, StoreError, StoreUnavailable, WorkerOptions, _loop
from neonnb.drivers.redis_client import Settings
from neonnb.job import decode_job
from tests import jobs
from tests.conftest import FakeClock, wait_until
from tests.services import RedisClusterServer, RedisSentinelServer, RedisServer, free_port


def test_settings_from_urls() -> None:
    plain = Settings.from_url("redis://127.0.0.1")
    assert (plain.kind, plain.host, plain.port, plain.db, plain.username, plain.password, plain.tls) == (
        "tcp", "127.0.0.1", 6379, 0, None, None, {})
    acl = Settings.from_url("redis://app:p%40ss@10.0.0.2:7000/4")
    assert (acl.host, acl.port, acl.db, acl.username, acl.password) == ("10.0.0.2", 7000, 4, "app", "p@ss")
    only_password = Settings.from_url("redis://:secret@h/2", database=5)
    assert (only_password.username, only_password.password, only_password.db) == (None, "secret", 5)
    assert Settings.from_url("rediss://h:6380/0?ssl_cert_reqs=none").tls["ssl_cert_reqs"] == "none"
    assert (plain.reply_timeout, Settings.from_url("redis://h?socket_timeout=2.5").reply_timeout) == (10, 2.5)
    unix = Settings.from_url("unix:///run/redis.sock?db=3")
    assert (unix.kind, unix.path, unix.db) == ("unix", "/run/redis.sock", 3)
    sentinel = Settings.from_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/jobs/2")
    assert (sentinel.kind, sentinel.sentinels, sentinel.service, sentinel.db, sentinel.password) == (
        "sentinel", (("10.0.0.1", 26379), ("10.0.0.2", 26379)), "jobs", 2, "pw")
    assert "pw" not in repr(sentinel) and "pw" not in sentinel.where()
    assert (plain.replica_acks, Settings.from_url("redis://h?replica_acks=2").replica_acks) == (None, 2)


@pytest.mark.parametrize(("url", "complaint"), [
    ("http://h:6379", "starts with redis://, rediss:// .TLS., unix:// or redis.sentinel://"),
    ("redis://h/zero", "must be a number"),
    ("redis://h/0?timeout=3", "unknown option"),
    ("redis://h/0?socket_timeout=0", "above 0"),
    ("redis://h/0?socket_timeout=soon", "above 0"),
    ("rediss://h/0?ssl_cert_reqs=maybe", "none, optional or required"),
    ("redis+sentinel://h:26379", "names no service"),
    ("redis://h:99999/0", "from 1 to 65535"),
    ("redis://h/0?replica_acks=some", "replica_acks in the Redis URL .* must be an integer 0 or more"),
])
def test_bad_urls_are_refused_saying_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        Settings.from_url(url)


def run_one(qm: QueueManager, queue: str = "q") -> None:
    """Dispatch a job, run it on a worker woken by the driver, and check it succeeded."""
    worker = qm.worker(queue, 1, WorkerOptions(poll_interval=30)).start()  # woken by Redis, not the poll
    try:
        handle = qm.dispatch(queue, jobs.Note("over-the-wire"))
        assert handle.result(timeout=10) == "over-the-wire"
    finally:
        worker.stop()


def test_cluster_spreads_queues_over_the_nodes_and_promotes_delayed_jobs(
    redis_cluster_server: RedisClusterServer, clock: FakeClock
) -> None:
    qm = QueueManager(Config(driver="redis", connection=redis_cluster_server.url(), key_prefix="smoke:"), clock=clock)
    try:
        queues = [f"queue-{i}" for i in range(12)]
        for queue in queues:
            qm.dispatch(queue, jobs.Note(queue))
        later = qm.dispatch_after("queue-0", jobs.Note("later"), 60)
        holders = set()
        for node in redis_cluster_server.nodes:
            with redis.Redis(port=node.port) as client:
                if client.keys("smoke:{queue-*}:job:*"):
                    holders.add(node.port)
        assert len(holders) >= 2, "every queue landed on one node: the hash tags don't spread them"

        worker = qm.worker(queues, 1)
        while worker.run_once():
            pass
        assert sorted(jobs.RECORD.order[-12:]) == sorted(queues)
        assert later.status is Status.QUEUED
        clock.advance(61)
        assert worker.run_once()
        assert later.result(timeout=1) == "later"
    finally:
        qm.close()


class SlotMove:
    """Moves a queue's slot to another node of the cluster by hand, as `redis-cli --cluster
    reshard` does: both nodes mark the slot, the keys go over, every node learns the owner."""

    def __init__(self, cluster: RedisClusterServer, queue: str) -> None:
        self.clients = {node.port: redis.Redis(port=node.port) for node in cluster.nodes}
        self.slot = redis.crc.key_slot(("{" + queue + "}").encode())
        any_node = next(iter(self.clients.values()))
        [(self.source, self.source_id)] = [(int(s[2][1]), s[2][2].decode()) for s in
                                           any_node.execute_command("CLUSTER", "SLOTS") if s[0] <= self.slot <= s[1]]
        self.target = next(port for port in self.clients if port != self.source)
        self.target_id = self.clients[self.target].execute_command("CLUSTER", "MYID").decode()

    def begin(self) -> None:
        self.clients[self.target].execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.source_id)
        self.clients[self.source].execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id)

    def finish(self) -> None:
        keys = self.clients[self.source].execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100_000)
        if keys:
            self.clients[self.source].execute_command("MIGRATE", "127.0.0.1", self.target, "", 0, 5000, "KEYS", *keys)
        for client in self.clients.values():
            client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)

    def cancel(self) -> None:
        for port in (self.source, self.target):
            self.clients[port].execute_command("CLUSTER", "SETSLOT", self.slot, "STABLE")

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def test_a_queue_whose_slot_moves_to_another_node_loses_nothing(redis_cluster_server: RedisClusterServer) -> None:
    # While the slot moves its keys answer ASK: the driver waits for the move to end.
    qm = QueueManager(Config(driver="redis", connection=redis_cluster_server.url(), key_prefix="move:"))
    move = SlotMove(redis_cluster_server, "moving")
    worker = qm.worker("moving", 2).start()
    try:
        assert qm.dispatch("moving", jobs.Note("before")).result(timeout=10) == "before"
        delayed = qm.dispatch_after("moving", jobs.Note("delayed"), 1)
        move.begin()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            during = pool.submit(qm.dispatch, "moving", jobs.Note("during"))
            time.sleep(0.5)
            assert not during.done(), f"the dispatch did not wait for the move: {during.exception()}"
            move.finish()
            assert during.result(timeout=15).result(timeout=15) == "during"
        assert delayed.result(timeout=15) == "delayed"
        assert qm.dispatch("moving", jobs.Note("after")).result(timeout=10) == "after"
        clients = move.clients
        assert clients[move.target].keys("move:{moving}:job:*") and not clients[move.source].keys("move:{moving}:*")
    finally:
        worker.stop()
        qm.close()
        move.close()


def test_a_dispatch_waits_for_a_slot_move_no_longer_than_the_reply_timeout(
    redis_cluster_server: RedisClusterServer,
) -> None:
    qm = QueueManager(Config(driver="redis", connection=f"{redis_cluster_server.url()}?socket_timeout=1",
                             key_prefix="stuck:"))
    move = SlotMove(redis_cluster_server, "stuck")
    move.begin()
    try:
        moving = r"moving the slot of these keys to another node \(or electing its master\) for over 1s"
        with pytest.raises(StoreUnavailable, match=moving):
            qm.dispatch("stuck", jobs.Note("never stored"))
    finally:
        move.cancel()
        move.close()
    assert qm.size("stuck") == 0
    qm.close()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    # With the extensions Python 3.13's strict verification (VERIFY_X509_STRICT) asks of a CA
    # and of the certificates it signs.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=neonnb test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "1", "-extfile", "san.ext")
    return folder


def test_rediss_url_runs_jobs_over_tls(certificates: Path) -> None:
    port = free_port()
    server = RedisServer(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certificates / "server.crt"),
        "--tls-key-file", str(certificates / "server.key"), "--tls-ca-cert-file", str(certificates / "ca.crt"),
        "--tls-auth-clients", "no", port=port,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certificates / 'ca.crt'}"
    qm = QueueManager(Config.for_url(url))
    try:
        run_one(qm)
        big = qm.dispatch("q", jobs.Note("x" * 300_000))  # the sync dispatch's own connection, over TLS
        assert jobs.Note("x" * 300_000) == decode_job(big.fetch())
    finally:
        qm.close()
        server.stop()


def test_each_asyncio_run_closes_the_connections_it_opened(redis_server: RedisServer) -> None:
    """A script (or a test suite) that calls asyncio.run() again and again with one manager:
    each run's loop gets its own connection, which must close with that loop, not pile up."""
    qm = QueueManager(Config(driver="redis", connection=redis_server.url(), key_prefix="runs:"))
    try:
        with redis.Redis(port=redis_server.port) as outside:
            before = len(outside.client_list())
            for n in range(5):
                asyncio.run(qm.adispatch("q", jobs.Note(f"run-{n}")))
            gc.collect()  # an unclosed transport would warn here, which the suite makes an error
            assert len(outside.client_list()) == before
        assert qm.size("q") == 5
    finally:
        qm.close()


def test_closing_while_a_connect_is_in_flight_leaves_no_connection_open(redis_server: RedisServer) -> None:
    """The first worker's wake-up watcher connects as the manager may already be closing (a
    short script, a test): the client that connect makes must be closed too, not left open."""
    qm = QueueManager(Config(driver="redis", connection=redis_server.url(), key_prefix="inflight:"))

    async def close_during_connect() -> bool:
        connecting = asyncio.ensure_future(qm.driver._client())  # type: ignore[attr-defined]
        await asyncio.sleep(0)  # the connect has started
        await qm.driver.close()
        return bool((await connecting).closed)

    with redis.Redis(port=redis_server.port) as outside:
        before = len(outside.client_list())
        assert _loop.run_sync(close_during_connect()), "the connect in flight left its client open"
        assert len(outside.client_list()) == before
    qm.close()


def test_acl_user_in_the_url_and_the_database_number() -> None:
    server = RedisServer("--user", "default", "off", "--user", "app", "on", ">s3cret", "~*", "&*", "+@all")
    try:
        qm = QueueManager(Config.for_url(f"redis://app:s3cret@127.0.0.1:{server.port}/3"))
        try:
            run_one(qm)
        finally:
            qm.close()
        with redis.Redis(port=server.port, username="app", password="s3cret", db=3) as client:
            assert client.keys("neonnb:{q}:job:*"), "the jobs are not in database 3"

        wrong = QueueManager(Config.for_url(f"redis://app:wrong@127.0.0.1:{server.port}/3"))
        try:
            with pytest.raises(StoreUnavailable, match="invalid username-password"):
                wrong.dispatch("q", jobs.Note("refused"))
        finally:
            wrong.close()
    finally:
        server.stop()


def test_password_and_database_config_fields() -> None:
    server = RedisServer("--requirepass", "hunter2")
    try:
        config = Config(driver="redis", connection=f"redis://127.0.0.1:{server.port}", password="hunter2",
                        database=5)
        qm = QueueManager(config)
        try:
            run_one(qm)
        finally:
            qm.close()
        with redis.Redis(port=server.port, password="hunter2", db=5) as client:
            assert client.keys("neonnb:{q}:job:*")
    finally:
        server.stop()


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru"])
def test_a_redis_that_may_evict_jobs_is_warned_about(policy: str, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer("--maxmemory-policy", policy)
    qm = QueueManager(Config(driver="redis", connection=server.url()))
    try:
        with caplog.at_level(logging.WARNING, logger="neonnb.drivers.redis"):
            qm.dispatch("q", jobs.Note("first"))
            qm.dispatch("other", jobs.Note("second"))
        warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        if policy == "noeviction":
            assert warnings == []
        else:
            assert len(warnings) == 1 and "maxmemory-policy allkeys-lru" in warnings[0]
    finally:
        qm.close()
        server.stop()


def test_a_prefix_with_braces_is_refused() -> None:
    with pytest.raises(ConfigError, match="must not contain braces"):
        QueueManager(Config(driver="redis", key_prefix="{app}:"))



def test_an_idle_worker_is_woken_again_after_redis_restarts() -> None:
    server = RedisServer()
    qm = QueueManager(Config.for_url(server.url()))
    worker = qm.worker("q", 1, WorkerOptions(poll_interval=60)).start()  # only a wake-up can start the job
    try:
        qm.dispatch("q", jobs.Note("before")).result(timeout=10)
        server.kill()
        time.sleep(0.3)
        server.start()
        with QueueManager(Config.for_url(server.url())) as other:  # another process, in effect
            # Sent before or after the worker resubscribed: either the wake-up or the "look
            # now" that follows a resubscription starts it.
            assert other.dispatch("q", jobs.Note("after the restart")).result(timeout=15) == "after the restart"
    finally:
        worker.stop()
        qm.close()
        server.stop()


def test_a_burst_worker_waits_out_an_outage_instead_of_reporting_an_empty_queue() -> None:
    server = RedisServer("--appendonly", "yes", "--appendfsync", "always")
    qm = QueueManager(Config.for_url(server.url(), poll_interval=0.2))
    try:
        handles = qm.dispatch_batch("q", [jobs.Note(f"n{i}") for i in range(5)])
        server.kill()
        worker = qm.worker("q", 2, WorkerOptions(burst=True))
        running = threading.Thread(target=worker.run)
        running.start()
        time.sleep(1)  # several claims fail meanwhile
        assert running.is_alive(), "the burst worker stopped although it could not ask Redis for jobs"
        server.start()
        running.join(30)
        assert not running.is_alive()
        assert [h.result(timeout=5) for h in handles] == [f"n{i}" for i in range(5)]
    finally:
        qm.close()
        server.stop()


# --- hand-off: an idle worker gets a job claimed for it as it is dispatched ---------------

def fresh_manager(server: RedisServer, clock: FakeClock | None = None, **settings: object) -> QueueManager:
    config = Config(driver="redis", connection=server.url(), key_prefix=f"h{time.monotonic_ns()}:", **settings)
    return QueueManager(config, clock=clock or time.time)


def job_hash(server: RedisServer, qm: QueueManager, queue: str, job_id: str) -> dict[bytes, bytes]:
    with redis.Redis(port=server.port) as client:
        return client.hgetall(f"{qm.config.key_prefix}{{{queue}}}:job:{job_id}")


def idle_workers(server: RedisServer, qm: QueueManager, queue: str) -> list[bytes]:
    with redis.Redis(port=server.port) as client:
        return client.zrange(f"{qm.config.key_prefix}{{{queue}}}:idle", 0, -1)


def test_an_idle_worker_is_handed_a_job_claimed_for_it_in_the_dispatch_itself(redis_server: RedisServer) -> None:
    qm = fresh_manager(redis_server)
    worker = qm.worker(["other", "q"], 1, WorkerOptions(poll_interval=30)).start()
    try:
        # One script registers the wait on each of its queues (the wait may end and start
        # again meanwhile: a wake-up when its subscription begins).
        wait_until(lambda: idle_workers(redis_server, qm, "q") and idle_workers(redis_server, qm, "other"), 10,
                   "the worker to wait on each of its queues")
        handle = qm.dispatch("q", jobs.Note("handed"))
        # Claimed by the dispatch's own script, not by a claim after a wake-up: the worker
        # holds it when dispatch returns.
        fields = job_hash(redis_server, qm, "q", handle.id)
        assert fields[b"worker_id"] == worker.id.encode() and fields[b"status"] in (b"running", b"succeeded")
        assert handle.result(timeout=10) == "handed"
    finally:
        worker.stop()
    assert not idle_workers(redis_server, qm, "q") and not idle_workers(redis_server, qm, "other")
    qm.close()


def test_a_job_handed_to_a_worker_that_died_waiting_is_recovered_after_its_lease(redis_server: RedisServer) -> None:
    qm = fresh_manager(redis_server, lease_timeout=1.0)
    with redis.Redis(port=redis_server.port) as client:  # a worker that registered, then died
        client.zadd(f"{qm.config.key_prefix}{{q}}:idle", {"1.0 ghost": time.time() + 60})
    handle = qm.dispatch("q", jobs.Note("orphan"))
    assert job_hash(redis_server, qm, "q", handle.id)[b"worker_id"] == b"ghost"
    worker = qm.worker("q", 1, WorkerOptions(poll_interval=0.2)).start()
    try:
        assert handle.result(timeout=15) == "orphan"  # the lease ran out; the live worker ran it
        assert handle.fetch().attempts == 2
    finally:
        worker.stop()
        qm.close()


def test_hand_off_skips_expired_waiters_and_never_jumps_a_due_job_of_higher_priority(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    qm = fresh_manager(redis_server, clock)
    idle = f"{qm.config.key_prefix}{{q}}:idle"
    with redis.Redis(port=redis_server.port) as client:
        client.zadd(idle, {"30 gone": clock() - 1})
        assert qm.dispatch("q", jobs.Note("a")).status is Status.QUEUED  # its wait had ended
        qm.dispatch_with_priority("q", jobs.Note("urgent"), "high")  # queued: nobody waits
        client.zadd(idle, {"30 waiting": clock() + 60})
        # A waiting worker takes this one only if nothing due of its priority or higher is queued.
        assert qm.dispatch_with_priority("q", jobs.Note("late"), "low").status is Status.QUEUED
        assert client.zrange(idle, 0, -1) == [b"30 waiting"]
    qm.close()


# --- sync dispatch: straight from the calling thread to Redis ---------------------------
def test_a_sync_dispatch_reconnects_when_redis_drops_the_connection(redis_server: RedisServer) -> None:
    qm = fresh_manager(redis_server)
    handles = [qm.dispatch("q", jobs.Note(str(n))) for n in range(3)]
    with redis.Redis(port=redis_server.port) as client:
        assert client.client_kill_filter(_type="normal", skipme=True) >= 1  # neonnb's connections
    handles += [qm.dispatch("q", jobs.Note(str(n))) for n in range(3, 6)]
    assert [job_hash(redis_server, qm, "q", h.id)[b"payload"] for h in handles] == [
        f'{{"tag":"{n}"}}'.encode() for n in range(6)]
    qm.close()


def test_a_hung_redis_fails_dispatch_after_the_reply_timeout_and_workers_carry_on() -> None:
    server = RedisServer()
    assert server.process is not None
    qm = QueueManager(Config.for_url(f"{server.url()}?socket_timeout=0.5"))
    worker = qm.worker("q", 1, WorkerOptions(poll_interval=0.2)).start()
    try:
        assert qm.dispatch("q", jobs.Note("before")).result(timeout=10) == "before"
        server.process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing: a partition
        try:
            with pytest.raises(StoreUnavailable, match=r"no reply within 0\.5s"):
                qm.dispatch("q", jobs.Note("sync"))  # from this thread
            with pytest.raises(StoreUnavailable, match=r"no reply within 0\.5s"):
                _loop.run_sync(qm.adispatch("q", jobs.Note("async")))  # through the loop's client
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert qm.dispatch("q", jobs.Note("after")).result(timeout=15) == "after"
    finally:
        worker.stop()
        qm.close()
        server.stop()


# --- beyond one server: failover, Sentinel, unix sockets -----------------------------------
def _replicated(server: RedisServer) -> None:
    """Wait until the master's writes reached its replica (replication is asynchronous: a
    master killed sooner may take its last writes with it, whatever the client)."""
    with redis.Redis(port=server.port) as client:
        assert client.execute_command("WAIT", 1, 5000) >= 1


def _runs_every_job_across(qm: QueueManager, failover: Callable[[], None], n: int = 30) -> None:
    """Jobs run before ``failover()``, jobs queued when it starts and jobs dispatched after it
    all run, on the worker started before it (no restart)."""
    worker = qm.worker("fo", 4, WorkerOptions(poll_interval=0.2)).start()
    try:
        before = [qm.dispatch("fo", jobs.Note(f"before-{i}")) for i in range(n)]
        assert [h.result(timeout=30) for h in before] == [f"before-{i}" for i in range(n)]
        queued = [qm.dispatch("fo", jobs.Note(f"queued-{i}")) for i in range(n)]
        failover()
        after = [qm.dispatch("fo", jobs.Note(f"after-{i}")) for i in range(n)]  # no error, no restart
        assert [h.result(timeout=60) for h in queued + after] == [f"queued-{i}" for i in range(n)] + [
            f"after-{i}" for i in range(n)]
        assert worker.is_running
    finally:
        worker.stop()
        qm.close()


def test_a_cluster_that_loses_a_master_mid_run_runs_every_job_without_a_worker_restart() -> None:
    cluster = RedisClusterServer(replicas=1)

    def failover() -> None:
        master = cluster.master_of("{fo}")
        _replicated(master)
        master.kill()  # its replica takes over once the others see it gone (cluster-node-timeout 2 s)
        cluster.wait_for_failover("{fo}", master)

    try:
        _runs_every_job_across(QueueManager(Config.for_url(cluster.url(), key_prefix="failover:")), failover)
    finally:
        cluster.stop()


def test_a_sentinel_managed_master_fails_over_and_jobs_go_on() -> None:
    sentinel = RedisSentinelServer()
    qm = QueueManager(Config.for_url(sentinel.url(), key_prefix="sentinel:"))

    def failover() -> None:
        _replicated(sentinel.master)
        sentinel.master.kill()
        with redis.Redis(port=sentinel.port) as watcher:
            wait_until(lambda: int(watcher.sentinel_get_master_addr_by_name("jobs")[1]) == sentinel.replica.port,
                       timeout=30, what="Sentinel to promote the replica")
        wait_until(lambda: _dispatches(qm), timeout=30, what="a dispatch to reach the new master")

    try:
        _runs_every_job_across(qm, failover)
    finally:
        sentinel.stop()


def _dispatches(qm: QueueManager) -> bool:
    try:
        qm.dispatch("probe", jobs.Note("probe"))
    except StoreUnavailable:
        return False
    return True


def test_a_redis_on_a_unix_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisServer("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    qm = QueueManager(Config.for_url(f"unix://{socket_path}?db=2"))
    try:
        run_one(qm)
        with redis.Redis(unix_socket_path=str(socket_path), db=2) as client:
            assert client.keys("neonnb:{q}:job:*")
    finally:
        qm.close()
        server.stop()


def test_a_command_redis_refuses_raises_neonnbs_store_error() -> None:
    """An ACL user that may not run scripts: redis-py's NoPermissionError must not reach the
    caller, neonnb's StoreError says what Redis said."""
    server = RedisServer("--user", "default", "off", "--user", "app", "on", ">s3cret", "~*", "&*", "+@all",
                         "-evalsha", "-eval", "-script")
    qm = QueueManager(Config.for_url(f"redis://app:s3cret@127.0.0.1:{server.port}/0"))
    try:
        with pytest.raises(StoreError, match=r"refused a command: .*no permissions to run the 'evalsha' command"):
            qm.dispatch("q", jobs.Note("refused"))
    finally:
        qm.close()
        server.stop()


_QUIET_SCRIPT = """
import sys, neonnb
qm = neonnb.connect(sys.argv[1])

@qm.job(queue="quiet")
def echo(x):
    return x

qm.worker("quiet", 2).start()
assert echo.dispatch(7).result(timeout=30) == 7
echo.dispatch(8)
qm.size("quiet"), qm.stats()
if sys.argv[2] == "close":
    qm.close()
"""


@pytest.mark.parametrize("ending", ["close", "exit without close"])
def test_a_script_on_redis_prints_nothing_with_warnings_as_errors(
        redis_server: RedisServer, tmp_path: Path, ending: str) -> None:
    """The newest redis-py warns when an asyncio client is given a sync Retry; a loop that
    dies with the process leaves "Task was destroyed but it is pending" for its subscriber."""
    script = tmp_path / "quiet.py"
    script.write_text(_QUIET_SCRIPT)
    done = subprocess.run([sys.executable, "-W", "error", str(script), redis_server.url(11), ending],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    left = redis.Redis.from_url(redis_server.url(11), decode_responses=True)
    try:  # the worker unregistered at exit: no hand-off reaches a dead worker's inbox
        assert not [key for key in left.scan_iter("*") if key.endswith("idle") and left.zcard(key)]
    finally:
        left.close()


def test_with_replica_acks_a_planned_sentinel_failover_loses_no_dispatch_that_returned() -> None:
    """`SENTINEL FAILOVER` while dispatching: the old master takes writes until it is demoted,
    and replication is asynchronous, so without replica_acks those writes are lost. With
    replica_acks=1 a dispatch returns only once a replica holds it (else it raises): every
    dispatch that returned runs."""
    sentinel = RedisSentinelServer()
    qm = QueueManager(Config.for_url(sentinel.url() + "?socket_timeout=2&replica_acks=1", key_prefix="planned:"))
    returned: list[Any] = []
    stop = threading.Event()

    def dispatch() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            with contextlib.suppress(StoreError):  # the failover: it said so, the caller knows
                returned.append(qm.dispatch("fo", jobs.Note(f"n{i}")))
            time.sleep(0.05)

    try:
        _replicated(sentinel.master)
        dispatcher = threading.Thread(target=dispatch)
        dispatcher.start()
        time.sleep(1)
        with redis.Redis(port=sentinel.port) as watcher:
            watcher.execute_command("SENTINEL", "FAILOVER", "jobs")
            wait_until(lambda: int(watcher.sentinel_get_master_addr_by_name("jobs")[1]) == sentinel.replica.port,
                       timeout=30, what="Sentinel to promote the replica")
        time.sleep(3)  # dispatches go on against the new master
        stop.set()
        dispatcher.join(30)
        assert len(returned) > 20
        worker = qm.worker("fo", 8).start()
        try:
            for handle in returned:
                handle.wait(timeout=30)
            lost = [h.id for h in returned if h.status is not Status.SUCCEEDED]
            assert not lost, f"{len(lost)} of {len(returned)} dispatches that returned were lost"
        finally:
            worker.stop()
    finally:
        stop.set()
        qm.close()
        sentinel.stop()
