"""Typed configuration: the spec's ``queue.Config`` and ``WorkerOptions``."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeAlias, overload

from .errors import ConfigError

DRIVERS = ("memory", "database", "redis")
DEFAULT_DATABASE_URL = "sqlite:///neonnb.db"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# PostgreSQL cuts identifiers at 63 characters, and the longest name made from the table's
# are its index "<table_name>_finished" and its messages table (and channel) "<table_name>_messages".
MAX_TABLE_NAME = 63 - len("_finished")
_TABLE_NAME = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_TABLE_NAME - 1}}}")
# user:password@ in a URL, also a malformed one (a missing ':' after the scheme, an unencoded
# '/' or '@' in the password): the password is everything up to the last '@' of the URL.
_CREDENTIALS = re.compile(r"((?://|^)[^/\s:@'\"]*:)(?!//)[^\s'\"]*@")


# A secret in a URL's query string: ?password=, &sslpassword=, &auth_token=, &client_secret= ...
_SECRET_PARAMETER = re.compile(
    r"([?&;][^=&;\s'\"#?]*(?:pass|pwd|token|secret|credential|api_?key|access_?key)[^=&;\s'\"#?]*=)[^&;\s'\"#]*",
    re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every secret of any URL in it replaced by ``***`` (the password of
    ``user:password@`` and query parameters such as ``password=``): for reprs, pages, log
    lines and errors, which must never show one."""
    return _SECRET_PARAMETER.sub(r"\1***", _CREDENTIALS.sub(r"\1***@", text))


# Characters a terminal or a log reader acts on instead of showing: C0 and C1 controls (ESC
# starts colour codes and cursor moves; a newline could forge a log line) and the bidi controls
# that reorder what follows (RLO). Text from jobs and stores is shown with them escaped.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_CONTROLS_BUT_NEWLINES = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def printable(text: Any, *, lines: bool = False) -> str:
    """``text`` with its control characters escaped (``\\x1b``, ``\\n``, ``\\u202e``), for a
    terminal or a log line; ``lines=True`` keeps newlines (a traceback printed whole)."""
    def escaped(match: re.Match[str]) -> str:
        char = match.group()
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char) or (
            f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
    return (_CONTROLS_BUT_NEWLINES if lines else _CONTROLS).sub(escaped, str(text))


MAX_DURATION = 100 * 365.25 * 86400.0  # longer is a mistake, and sums of such times stay exact enough


def parse_duration(value: Any, name: str) -> float:
    """Seconds from a number, a ``timedelta`` or a string such as ``"1m30s"`` or ``"500ms"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value) if isinstance(value, float) or abs(value) <= 10**300 else math.inf
    elif isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif parts and "".join(n + u for n, u in parts) == text:
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
        else:
            raise ConfigError(
                f"{name} must be a duration such as 5, '5s', '1m30s' or '500ms', got {value!r}"
            )
    else:
        raise ConfigError(f"{name} must be a duration in seconds, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(repr(value))} characters)"
        raise ConfigError(f"{name} must be a finite duration of at most 100 years, got {shown}")
    if seconds < 0:
        raise ConfigError(f"{name} must not be negative, got {value!r}")
    return seconds


DurationInput: TypeAlias = "float | str | timedelta"
"""What a duration setting takes: seconds, a ``timedelta`` or a string such as ``"1m30s"``."""


class Duration:
    """A duration field of a config dataclass: set from any ``DurationInput`` (checked
    then, naming the field), read as seconds, a float."""

    def __init__(self, default: float) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute, self.label = f"_{name}", f"{owner.__name__}.{name}"

    @overload
    def __get__(self, obj: None, owner: type) -> float: ...
    @overload
    def __get__(self, obj: object, owner: type) -> float: ...

    def __get__(self, obj: object | None, owner: type) -> float:
        if obj is None:  # the dataclass asks the class for the field's default
            return self.default
        return float(getattr(obj, self.attribute))

    def __set__(self, obj: object, value: DurationInput) -> None:
        object.__setattr__(obj, self.attribute, parse_duration(value, self.label))


class OptionalDuration:
    """A duration field that may be None ("take it from the Config")."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute, self.label = f"_{name}", f"{owner.__name__}.{name}"

    @overload
    def __get__(self, obj: None, owner: type) -> None: ...
    @overload
    def __get__(self, obj: object, owner: type) -> float | None: ...

    def __get__(self, obj: object | None, owner: type) -> float | None:
        return None if obj is None else getattr(obj, self.attribute)

    def __set__(self, obj: object, value: DurationInput | None) -> None:
        object.__setattr__(obj, self.attribute, None if value is None else parse_duration(value, self.label))


def positive_int(value: Any, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        least = "0 or more" if allow_zero else "at least 1"
        raise ConfigError(f"{name} must be an integer {least}, got {value!r}")
    return value


@dataclass(frozen=True)
class Rate:
    """At most ``count`` starts in any ``window`` seconds (a sliding window)."""

    count: int
    window: float


def parse_rate(text: Any, where: str) -> Rate:
    """``"10/s"``, ``"100/m"``, ``"1000/h"`` or ``"5/30s"`` (a count over a duration)."""
    count, sep, per = str(text).partition("/") if isinstance(text, str) else ("", "", "")
    try:
        window = parse_duration(f"1{per.strip()}" if per.strip().isalpha() else per.strip(), where)
        number = int(count.strip())
    except (ConfigError, ValueError):
        window, number = 0.0, 0
    if not sep or number < 1 or not window > 0:
        raise ConfigError(f"{where} must be a count over a time, such as '10/s', '100/m' or '5/30s', got {text!r}")
    return Rate(number, window)


_OTHER_DRIVERS = {"memory": "memory", "redis": "redis", "rediss": "redis", "unix": "redis"}  # URL scheme -> driver


def _scheme(url: str) -> str:
    return url.partition("://")[0].split("+")[0].lower()


@dataclass
class Config:
    """Queue configuration; every field of the spec's ``queue.Config`` plus leases and backoff.

    ``connection`` is a URL (``sqlite:///jobs.db``, ``postgresql://...``, ``memory://``) or an
    existing SQLAlchemy ``Engine`` for the database driver. Durations are seconds, a
    ``timedelta`` or a string like ``"5s"``. ``max_retries`` counts retries after the first
    attempt, so a job runs at most ``max_retries + 1`` times unless it says otherwise.
    """

    driver: str = "database"
    connection: Any = None
    password: str | None = None
    database: int = 0
    default_queue: str = "default"
    max_retries: int = 3
    retry_delay: Duration = Duration(5.0)
    timeout: Duration = Duration(60.0)
    workers: int = 5
    max_jobs: int = 0
    poll_interval: Duration = Duration(1.0)
    table_name: str = "neonnb_jobs"
    lease_timeout: Duration = Duration(30.0)
    backoff_cap: Duration = Duration(3600.0)
    backoff_jitter: bool = False
    result_ttl: Duration = Duration(86400.0)
    key_prefix: str = "neonnb:"
    # Where big arguments and results go (an fsspec URL: file:///shared/neonnb, s3://bucket/prefix,
    # memory://); None: beside an SQLite file, in memory for the memory store, and in the store
    # itself up to max_value_bytes for Redis, PostgreSQL and MariaDB (see neonnb.artifacts).
    artifacts: str | None = None
    max_value_bytes: int = 16 * 2**20
    # Redis: replicas every job write waits for (WAIT) before it returns; 0: none. The URL's
    # replica_acks query option, where given, wins.
    replica_acks: int = 0

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise ConfigError(f"Config.driver must be one of {', '.join(DRIVERS)}, got {self.driver!r}")
        if self.connection is None and self.driver == "database":
            self.connection = DEFAULT_DATABASE_URL
        if self.driver == "redis" and isinstance(self.connection, str) and "://" not in self.connection:
            self.connection = f"redis://{self.connection}"  # the spec's Connection: "localhost:6379"
        if self.password is not None and not isinstance(self.password, str):
            raise ConfigError(
                f"Config.password must be a string, got a {type(self.password).__name__} (in YAML, quote it: "
                "password: '0123', or YAML reads 0123 as the number 83)"
            )
        scheme = _scheme(self.connection) if isinstance(self.connection, str) else None
        if self.driver == "database" and scheme in _OTHER_DRIVERS:
            raise ConfigError(
                f"Config.connection is a {scheme}:// URL, for the {_OTHER_DRIVERS[scheme]} driver, but "
                f"Config.driver is 'database': pass driver={_OTHER_DRIVERS[scheme]!r}, or use Config.for_url(url)"
            )
        if self.artifacts is not None and (not isinstance(self.artifacts, str) or "://" not in self.artifacts):
            raise ConfigError(f"Config.artifacts must be an fsspec URL such as file:///shared/neonnb or "
                              f"s3://bucket/prefix, got {self.artifacts!r}")
        limit = self.max_value_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1024:
            raise ConfigError(f"Config.max_value_bytes must be an integer of at least 1024, got {limit!r}")
        if not isinstance(self.default_queue, str) or not self.default_queue:
            raise ConfigError(f"Config.default_queue must be a non-empty string, got {self.default_queue!r}")
        if not isinstance(self.key_prefix, str) or not self.key_prefix or any(c.isspace() for c in self.key_prefix):
            raise ConfigError(f"Config.key_prefix must be a non-empty string without spaces, got {self.key_prefix!r}")
        if not isinstance(self.table_name, str) or not _TABLE_NAME.fullmatch(self.table_name):
            raise ConfigError(
                "Config.table_name must be a SQL identifier (letters, digits and _, not starting "
                f"with a digit, at most {MAX_TABLE_NAME} characters), got {self.table_name!r}"
            )
        if self.table_name.lower().endswith(("_marks", "_workers", "_messages")):
            raise ConfigError(
                f"Config.table_name {self.table_name!r} must not end in _marks, _workers or _messages: beside "
                "each jobs table neonnb keeps <table_name>_marks, <table_name>_workers and "
                "<table_name>_messages, which another app's table could then collide with"
            )
        self.database = positive_int(self.database, "Config.database", allow_zero=True)
        self.max_retries = positive_int(self.max_retries, "Config.max_retries", allow_zero=True)
        self.workers = positive_int(self.workers, "Config.workers")
        self.max_jobs = positive_int(self.max_jobs, "Config.max_jobs", allow_zero=True)
        self.replica_acks = positive_int(self.replica_acks, "Config.replica_acks", allow_zero=True)
        if self.poll_interval <= 0 or self.lease_timeout <= 0:
            raise ConfigError("Config.poll_interval and Config.lease_timeout must be greater than 0")

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(shown["connection"], str):
            shown["connection"] = redact(shown["connection"])
        if shown["password"] is not None:
            shown["password"] = "***"
        return f"Config({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1

    def describe_store(self) -> str:
        """Where the jobs live, for people: "SQLite jobs.db", "Redis 127.0.0.1:6379/0",
        "in memory" (never a password)."""
        if self.driver == "memory":
            return "in memory"
        if not isinstance(self.connection, str):
            return f"{self.driver} ({type(self.connection).__name__})"
        scheme, _, rest = redact(self.connection).partition("://")
        kind = "redis+sentinel" if scheme == "redis+sentinel" else scheme.split("+")[0]
        label = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "postgres": "PostgreSQL", "mysql": "MySQL",
                 "mariadb": "MariaDB", "redis": "Redis", "rediss": "Redis (TLS)", "unix": "Redis",
                 "redis+sentinel": "Redis via Sentinel"}.get(kind, kind)
        if kind == "sqlite":
            path = rest[1:] if rest.startswith("/") else rest  # sqlite:///jobs.db is jobs.db
            return f"{label} {path or 'in memory'}"
        return f"{label} {rest.rpartition('@')[2] or rest}"

    @classmethod
    def for_url(cls, url: str, **settings: Any) -> Config:
        """The config for a connection URL, the driver picked from its scheme."""
        if "://" not in url:
            raise ConfigError(
                f"can't connect to {redact(url)!r}: give a URL such as sqlite:///jobs.db, "
                "postgresql://host/db, redis://host:6379/0 or memory://, or a .yaml config file"
            )
        driver = _OTHER_DRIVERS.get(_scheme(url), "database")
        return cls(driver=driver, connection=None if driver == "memory" else url, **settings)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], section: str = "queue") -> Config:
        """Load a config file such as the spec's ``config/queue.yaml``.

        ``${VAR}`` and ``${VAR:-default}`` in a value are replaced from the environment after
        parsing, so what a variable holds stays text (a password ``0123`` or ``yes``, or one with
        ``: #``); fields that are numbers or flags read the text as one.
        """
        import yaml

        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"can't read the config file {str(path)!r}: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if data is None:  # an empty file is a mistake, not a wish for every default (a new ./neonnb.db)
            raise ConfigError(f"{path}: the config file is empty; give at least 'driver:' and 'connection:'")
        if isinstance(data, dict) and section in data:
            data = data[section]
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping under '{section}:'")
        kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # "int", "bool", ...: postponed annotations
        expanded = {key: _expand_value(kinds.get(key), value) for key, value in data.items()}
        return cls.from_dict(expanded, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        # An unset ${VAR} expands to "", which means "not given" for the optional strings.
        values: dict[str, Any] = {
            k: (None if v == "" and k in ("connection", "password") else v) for k, v in data.items()
        }
        return cls(**values)


def _expand_env(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is not None and (value or default is None):
            return value
        if default is not None:
            return default
        return ""

    return _ENV_VAR.sub(replace, text)


_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _expand_value(kind: str | None, value: Any) -> Any:
    """A YAML value with ``${VAR}`` expanded; a field declared ``int`` or ``bool`` (``kind``)
    reads the text as one."""
    if not isinstance(value, str) or not _ENV_VAR.search(value):
        return value
    text = _expand_env(value)
    if kind == "int" and text.strip().isdigit():
        return int(text)
    if kind == "bool" and text.strip().lower() in _FLAGS:
        return _FLAGS[text.strip().lower()]
    return text


@dataclass
class WorkerOptions:
    """Per-worker settings (the spec's ``WorkerOptions``); ``None`` means "take it from Config".

    ``max_jobs`` stops the worker after that many jobs (0 = no limit); ``burst`` stops it when
    nothing is left to run now.
    """

    max_jobs: int | None = None
    timeout: OptionalDuration = OptionalDuration()
    poll_interval: OptionalDuration = OptionalDuration()
    lease_timeout: OptionalDuration = OptionalDuration()
    burst: bool = False
    worker_id: str = field(default="")

    def resolve(self, config: Config) -> WorkerSettings:
        """Every ``None`` filled in from ``config``, all values validated."""
        max_jobs = config.max_jobs if self.max_jobs is None else self.max_jobs
        return WorkerSettings(
            max_jobs=positive_int(max_jobs, "WorkerOptions.max_jobs", allow_zero=True),
            timeout=config.timeout if self.timeout is None else self.timeout,
            poll_interval=config.poll_interval if self.poll_interval is None else self.poll_interval,
            lease_timeout=config.lease_timeout if self.lease_timeout is None else self.lease_timeout,
            burst=self.burst,
            worker_id=self.worker_id,
        )


@dataclass(frozen=True)
class WorkerSettings:
    """A worker's ``WorkerOptions`` resolved against its ``Config``: every value set,
    durations in seconds."""

    max_jobs: int
    timeout: float
    poll_interval: float
    lease_timeout: float
    burst: bool
    worker_id: str
