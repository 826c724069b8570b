from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

import neonnb
from neonnb import Config, ConfigError, WorkerOptions


def test_defaults_are_the_embedded_sqlite_database() -> None:
    config = Config()
    assert (config.driver, config.connection, config.max_attempts) == ("database", "sqlite:///neonnb.db", 4)


def test_durations_accept_numbers_strings_and_timedeltas() -> None:
    config = Config(retry_delay="1m30s", timeout=timedelta(minutes=5), poll_interval="500ms", lease_timeout=12)
    assert (config.retry_delay, config.timeout, config.poll_interval, config.lease_timeout) == (90, 300, 0.5, 12)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("driver", "kafka", "Config.driver must be one of memory, database, redis, got 'kafka'"),
        ("workers", 0, "Config.workers must be an integer at least 1, got 0"),
        ("max_retries", -1, "Config.max_retries must be an integer 0 or more"),
        ("retry_delay", "soon", "Config.retry_delay must be a duration"),
        ("table_name", "jobs; drop table x", "Config.table_name must be a SQL identifier"),
        ("poll_interval", 0, "Config.poll_interval and Config.lease_timeout must be greater than 0"),
        ("connection", "redis://user:secret@host/0",
         "Config.connection is a redis:// URL, for the redis driver, but Config.driver is 'database': "
         "pass driver='redis', or use Config.for_url(url)"),
        ("connection", "memory://", "for the memory driver, but Config.driver is 'database'"),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config(**{field: value})  # type: ignore[arg-type]


def test_from_yaml_expands_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUEUE_DB", f"sqlite:///{tmp_path}/q.db")
    monkeypatch.delenv("QUEUE_PASSWORD", raising=False)
    path = tmp_path / "queue.yaml"
    path.write_text(
        "queue:\n"
        "  driver: database\n"
        "  connection: ${QUEUE_DB}\n"
        "  password: ${QUEUE_PASSWORD}\n"
        "  default_queue: ${QUEUE_NAME:-reports}\n"
        "  max_retries: 3\n  retry_delay: 5s\n  timeout: 60s\n"
        "  workers: 5\n  max_jobs: 100\n  poll_interval: 1s\n  table_name: jobs\n"
    )
    config = Config.from_yaml(path)
    assert config.connection == f"sqlite:///{tmp_path}/q.db"
    assert config.password is None
    assert (config.default_queue, config.max_jobs, config.table_name, config.retry_delay) == ("reports", 100, "jobs", 5)


def test_from_yaml_rejects_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "queue.yaml"
    path.write_text("queue:\n  worker: 5\n")
    with pytest.raises(ConfigError, match="unknown field\\(s\\) worker"):
        Config.from_yaml(path)


def test_connect_picks_the_driver_from_the_url(tmp_path: Path) -> None:
    with neonnb.connect("memory://") as qm:
        assert qm.config.driver == "memory"
    with neonnb.connect(f"sqlite:///{tmp_path}/x.db", max_retries=7) as qm:
        assert (qm.config.driver, qm.config.max_retries) == ("database", 7)
    with pytest.raises(ConfigError, match=r"give a URL such as sqlite:///jobs\.db"):
        neonnb.connect("jobs.db")
    with pytest.raises(ConfigError, match="in-memory SQLite database can't be shared"):
        neonnb.connect("sqlite://")
    with pytest.raises(ConfigError, match="SQLAlchemy knows no database 'foo'; the database driver takes sqlite:///"):
        neonnb.connect("foo://bar/db")


def test_a_worker_of_no_concurrency_is_refused() -> None:
    with neonnb.connect("memory://") as qm:
        assert qm.worker("q").concurrency == qm.config.workers
        with pytest.raises(ValueError, match="worker concurrency must be an integer of at least 1, got 0"):
            qm.worker("q", 0)


def test_worker_options_fall_back_to_config_and_validate() -> None:
    resolved = WorkerOptions(timeout="2m").resolve(Config(driver="memory", poll_interval=3, max_jobs=9))
    assert (resolved.timeout, resolved.poll_interval, resolved.max_jobs) == (120, 3, 9)
    with pytest.raises(ConfigError, match=r"WorkerOptions\.max_jobs"):
        WorkerOptions(max_jobs=-1).resolve(Config(driver="memory"))


SECRET = "s3cr#t/pw"


@pytest.mark.parametrize("probe", [
    lambda: repr(Config(driver="redis", connection="redis://app:s3cr#t/pw@h:6379/0", password=SECRET)),
    lambda: repr(Config(connection="postgresql://app:s3cr#t/pw@h/db")),
    lambda: repr(neonnb.QueueManager(Config(driver="redis", connection="redis://app:s3cr#t/pw@h:6379/0"))),
    lambda: Config.for_url("postgresql//app:s3cr#t/pw@h/db"),
    lambda: _settings("redis://app:s3cr#t/pw@h:6379/0"),  # the unencoded '/' and '#'
    lambda: _settings("redis://app:s3cr#t@h:6379/0"),
    lambda: _settings("redis://app:s3cr@h:6379/0?bogus=1"),
    lambda: _settings("redis://app:s3cr@h:6379/zero"),
    lambda: _settings("redis://app:s3cr@h:6379/0?socket_timeout=soon"),
    lambda: _settings("redis://app:s3cr@h:99999/0"),
    lambda: repr(_settings("redis://app:s3cr@h:6379/0")),
], ids=["config", "config-sql", "manager", "for_url", "unencoded", "hash", "option", "db", "socket_timeout", "port",
        "settings"])
def test_no_password_in_any_repr_or_error(probe: Callable[[], object]) -> None:
    try:
        shown = str(probe())
    except Exception as exc:
        shown = f"{type(exc).__name__}: {exc}"
    assert "s3cr" not in shown, shown


def _settings(url: str) -> object:
    from neonnb.drivers.redis_client import Settings

    return Settings.from_url(url)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**400, "99999999999999d"],
                         ids=["nan", "inf", "-inf", "10**400", "huge-string"])
@pytest.mark.parametrize("field", ["lease_timeout", "retry_delay", "timeout", "result_ttl"])
def test_durations_are_finite(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"Config\.{field} must be a finite duration|must not be negative"):
        Config(**{field: value})  # type: ignore[arg-type]


def test_dispatch_times_are_finite() -> None:
    from tests import jobs

    with neonnb.connect("memory://") as qm:
        with pytest.raises(ConfigError, match="delay must be a finite duration"):
            qm.dispatch_after("q", jobs.Note("x"), float("nan"))
        with pytest.raises(ConfigError, match="dispatch_at takes a datetime or seconds since the epoch, got nan"):
            qm.dispatch_at("q", jobs.Note("x"), float("nan"))
        assert qm.stats() == {}


def test_yaml_environment_values_stay_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "queue.yaml"
    path.write_text("queue:\n  driver: redis\n  connection: ${REDIS_ADDR}\n  password: ${PW}\n"
                    "  workers: ${WORKERS:-7}\n  backoff_jitter: ${JITTER:-yes}\n  default_queue: ${Q}\n")
    monkeypatch.setenv("REDIS_ADDR", "localhost:6379")
    monkeypatch.setenv("Q", "yes")
    for password in ("0123", "yes", "p@ss: #word", "null"):
        monkeypatch.setenv("PW", password)
        config = Config.from_yaml(path)
        assert config.password == password
    assert (config.workers, config.backoff_jitter, config.default_queue) == (7, True, "yes")
    assert config.connection == "redis://localhost:6379"  # the spec's host:port form


def test_a_yaml_number_where_a_password_goes_says_to_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "queue.yaml"
    path.write_text("queue:\n  driver: redis\n  password: 0123\n")
    with pytest.raises(ConfigError, match="quote it: password: '0123'"):
        Config.from_yaml(path)


def test_table_names_within_the_databases_limits() -> None:
    Config(table_name="t" * 54)
    with pytest.raises(ConfigError, match="at most 54 characters"):
        Config(table_name="t" * 55)
    with pytest.raises(ConfigError, match="must not end in _marks, _workers or _messages"):
        Config(table_name="jobs_marks")
    with pytest.raises(ConfigError, match="must not end in _marks, _workers or _messages"):
        Config(table_name="jobs_workers")


def test_a_missing_optional_package_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not MissingDependency, which means a job's ctx.deps lacks a name."""
    from neonnb import MissingDependency, MissingExtra

    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    qm = neonnb.connect("memory://")
    with pytest.raises(MissingExtra, match=r"pip install 'neonnb\[notebook\]'") as raised:
        qm.jobs_df()
    assert isinstance(raised.value, ImportError) and not isinstance(raised.value, MissingDependency)
    qm.close()


@pytest.mark.parametrize(("url", "shown"), [
    ("memory://", "in memory"),
    ("sqlite:///jobs.db", "SQLite jobs.db"),
    ("sqlite:////tmp/q/jobs.db", "SQLite /tmp/q/jobs.db"),
    ("postgresql://app:pw@127.0.0.1:5432/jobs", "PostgreSQL 127.0.0.1:5432/jobs"),
    ("redis://:pw@127.0.0.1:6379/0", "Redis 127.0.0.1:6379/0"),
    ("unix:///run/redis.sock?db=2", "Redis /run/redis.sock?db=2"),
    ("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/jobs/1", "Redis via Sentinel 10.0.0.1:26379,10.0.0.2/jobs/1"),
])
def test_the_store_is_described_for_people_without_its_password(url: str, shown: str) -> None:
    assert Config.for_url(url).describe_store() == shown


def test_durations_are_seconds_once_set() -> None:
    config = Config(driver="memory", retry_delay="5m", lease_timeout=timedelta(seconds=90), timeout=2)
    assert (config.retry_delay, config.lease_timeout, config.timeout) == (300.0, 90.0, 2.0)
    assert all(type(v) is float for v in (config.retry_delay, config.lease_timeout, config.timeout, config.result_ttl))
    assert dataclasses.replace(config, poll_interval="250ms").poll_interval == 0.25
    with pytest.raises(ConfigError, match=r"Config\.backoff_cap must be a duration"):
        Config(driver="memory", backoff_cap="soon")
    config.result_ttl = "1h"  # type: ignore[assignment]  # set later, parsed the same way
    assert config.result_ttl == 3600.0
    options = WorkerOptions(poll_interval="2s")
    assert (options.poll_interval, options.timeout) == (2.0, None)
    settings = options.resolve(config)
    assert (settings.poll_interval, settings.timeout, settings.lease_timeout) == (2.0, 2.0, 90.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.timeout = 5  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"WorkerOptions\.lease_timeout must not be negative"):
        WorkerOptions(lease_timeout=-1)
