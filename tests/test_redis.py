"""What only Redis has: Cluster slots, TLS, ACL users, database numbers. (Job behaviour on
Redis and on a Redis Cluster is the conformance suite's.)"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from neonnb import Config, ConfigError, QueueManager, Status, StoreUnavailable, WorkerOptions
from tests import jobs
from tests.conftest import FakeClock
from tests.services import RedisClusterServer, RedisServer, free_port


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


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=neonnb test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
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
    qm = QueueManager(Config.for_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certificates / 'ca.crt'}"))
    try:
        run_one(qm)
    finally:
        qm.close()
        server.stop()


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
