"""Throwaway database servers for the tests, started from the installed binaries on free
loopback ports. Where a binary is missing the test skips with the reason, and with
NEONNB_REQUIRE_SERVICES=1 (CI) that skip becomes a failure."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REQUIRED = os.environ.get("NEONNB_REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> None:
    """Skip, or fail where services are required."""
    if REQUIRED:
        pytest.fail(f"NEONNB_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def answers(url: str) -> bool:
    """Whether an HTTP server answers ``url`` now (any status: it is up)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose Redis Cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port} after {timeout}s")


def _as_user(user: str, argv: list[str]) -> list[str]:
    """PostgreSQL and MariaDB refuse to run as root: drop to their system user."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", user, "--", *argv]


def _owned_tempdir(prefix: str, user: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        shutil.chown(path, user, user)
    return path


class PostgresServer:
    """`initdb` + `pg_ctl` on a free port; `restart()` is `pg_ctl restart -m fast`."""

    def __init__(self, fsync: bool = False, **settings: str) -> None:
        self.fsync = fsync  # off for tests (speed); on for benchmarks (what production runs)
        self.settings = settings  # more `-c name=value` server settings
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        bindir = bindirs[-1] if bindirs else None
        if bindir is None and shutil.which("pg_ctl"):
            bindir = str(Path(shutil.which("pg_ctl") or "").parent)
        if bindir is None:
            unavailable("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
        self.bin = Path(bindir or "")
        self.dir = _owned_tempdir("neonnb-pg-", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(_as_user("postgres", [str(self.bin / tool), *args]), check=True, capture_output=True)

    def _ctl(self, action: str, *extra: str) -> None:
        fsync = "on" if self.fsync else "off"
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync={fsync} -c max_connections=200"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, "-w", action, *extra)

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def crash_and_restart(self) -> None:
        """`pg_ctl restart -m immediate`: the server stops as if it crashed and recovers from its WAL."""
        self._ctl("restart", "-m", "immediate")

    def down(self) -> None:
        """Stopped as if it crashed (its data kept): ``start()`` brings it back."""
        self._ctl("stop", "-m", "immediate")

    def stop(self) -> None:
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = f"t{os.urandom(6).hex()}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)


class MariaDBServer:
    """`mariadb-install-db` + `mariadbd` on a free port."""

    def __init__(self) -> None:
        install, server = shutil.which("mariadb-install-db"), shutil.which("mariadbd") or shutil.which("mysqld")
        if install is None or server is None:
            unavailable("MariaDB's mariadb-install-db/mariadbd are not installed (apt-get install mariadb-server)")
        self.dir = _owned_tempdir("neonnb-maria-", "mysql")
        self.port = free_port()
        data = self.dir / "data"
        subprocess.run(
            _as_user("mysql", [str(install), "--no-defaults", f"--datadir={data}",
                               "--auth-root-authentication-method=normal", "--skip-test-db"]),
            check=True, capture_output=True,
        )
        self.process = subprocess.Popen(
            _as_user("mysql", [str(server), "--no-defaults", f"--datadir={data}", f"--port={self.port}",
                               "--bind-address=127.0.0.1", f"--socket={self.dir / 'sock'}", "--skip-log-bin",
                               "--innodb-flush-log-at-trx-commit=2", f"--log-error={self.dir / 'log'}"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def new_database(self) -> str:
        import pymysql

        name = f"t{os.urandom(6).hex()}"
        conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root")
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{name}"



class RedisServer:
    """`redis-server` on a free port, started and stopped (even killed) by the tests."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed (apt-get install redis-server)")
        self.binary = str(binary)
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="neonnb-redis-"))
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"


class RedisClusterServer:
    """Three `redis-server --cluster-enabled yes` masters on loopback, each with ``replicas``
    replicas, joined by `redis-cli --cluster create`."""

    def __init__(self, replicas: int = 0) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            unavailable("redis-cli is not installed (apt-get install redis-tools)")
        self.cli = str(cli)
        self.nodes = [
            RedisServer("--cluster-enabled", "yes", "--cluster-node-timeout", "2000", port=free_cluster_port())
            for _ in range(3 * (1 + replicas))
        ]
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run([self.cli, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas),
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_until_ok(self.nodes)

    def wait_until_ok(self, nodes: list[RedisServer], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes:
            while b"cluster_state:ok" not in subprocess.run(
                [self.cli, "-p", str(node.port), "cluster", "info"], capture_output=True, timeout=10
            ).stdout:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis Cluster on {[n.port for n in nodes]} did not reach cluster_state:ok")
                time.sleep(0.1)

    def master_of(self, key: str, asking: RedisServer | None = None) -> RedisServer:
        import redis

        slot = redis.crc.key_slot(key.encode())
        with redis.Redis(port=(asking or self.nodes[0]).port) as client:
            port = next(int(s[2][1]) for s in client.execute_command("CLUSTER", "SLOTS") if s[0] <= slot <= s[1])
        return next(node for node in self.nodes if node.port == port)

    def wait_for_failover(self, key: str, dead: RedisServer, timeout: float = 30) -> RedisServer:
        """Once the survivors have seen ``dead`` gone and promoted a replica for ``key``'s slot."""
        alive = [node for node in self.nodes if node is not dead]
        deadline = time.monotonic() + timeout
        while (master := self.master_of(key, asking=alive[0])) is dead:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica of {dead.port} took over within {timeout}s")
            time.sleep(0.1)
        self.wait_until_ok(alive)
        return master

    def url(self) -> str:
        return self.nodes[0].url()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelServer:
    """A master, its replica and one `redis-server --sentinel` watching them as service
    "jobs" (quorum 1), on loopback, failing over a second after the master stops answering."""

    def __init__(self) -> None:
        self.master = RedisServer()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.master.port))
        self.dir = Path(tempfile.mkdtemp(prefix="neonnb-sentinel-"))
        self.port = free_port()
        config = self.dir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor jobs 127.0.0.1 {self.master.port} 1\n"
            "sentinel down-after-milliseconds jobs 1000\nsentinel failover-timeout jobs 5000\n"
        )
        self.process = subprocess.Popen([self.master.binary, str(config), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def url(self, database: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/jobs/{database}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        for server in (self.master, self.replica):
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
