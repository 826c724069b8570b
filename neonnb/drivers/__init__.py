"""Storage drivers behind one protocol (``base.Driver``); a new driver is one file."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from .base import Driver


def create_driver(config: Config) -> Driver:
    """The driver that ``config.driver`` names."""
    if config.driver == "memory":
        from .memory import MemoryDriver

        return MemoryDriver()
    if config.driver == "database":
        from .database import DatabaseDriver

        return DatabaseDriver(config.connection, table_name=config.table_name)
    from .redis import RedisDriver

    return RedisDriver(
        config.connection or "redis://127.0.0.1:6379/0", password=config.password,
        database=config.database, prefix=config.key_prefix, replica_acks=config.replica_acks,
    )
