"""SQLAlchemy statements compiled once for running on DBAPI connections of the driver's own
(``pg_async.py``, ``pg_dispatch.py``, ``sqlite_here.py``), where SQLAlchemy's execution path
would cost more than the database takes for a worker's small statements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Dialect


class Compiled:
    """One statement's SQL for the dialect's DBAPI, with the values it fixes itself
    (``status = 'running'``) merged into each call's. A list given for an expanding parameter
    (``IN``) becomes one parameter per item: the SQL is rendered once per list length."""

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        self._compiled = statement.compile(dialect=dialect)
        params = self._compiled.params
        self._fixed = {key: value for key, value in params.items() if not self._compiled.binds[key].required}
        # What rendering needs for the values each call brings; literal-execute ones are fixed.
        self._placeholders = {key: (0 if value is None else value) for key, value in params.items()}
        self._expanding = [key for key, bind in self._compiled.binds.items() if bind.expanding and bind.required]
        self._shapes: dict[tuple[int, ...], tuple[str, dict[str, list[str]], Sequence[str] | None]] = {}

    def render(self, params: Mapping[str, Any]) -> tuple[str, dict[str, Any] | tuple[Any, ...]]:
        """The SQL and the values to run it with, named or positional as the DBAPI takes them."""
        values = {**self._fixed, **params}
        shape = tuple(len(values[key]) for key in self._expanding)
        rendered = self._shapes.get(shape)
        if rendered is None:
            state = self._compiled.construct_expanded_state({**self._placeholders, **params})
            expansion = {key: list(state.parameter_expansion.get(key, ())) for key in self._expanding}
            rendered = self._shapes[shape] = (state.statement, expansion, state.positiontup)
        sql, expansion, positions = rendered
        for key, names in expansion.items():
            values.update(zip(names, values[key], strict=True))
        if positions is None:
            return sql, values
        return sql, tuple(values[name] for name in positions)


class CompiledStatements:
    """The driver's statements, each compiled on first use: the driver builds each statement
    once, so they are known by identity. Shared by every path that runs them raw."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[Any, Compiled] = {}

    def render(self, statement: Any, params: Mapping[str, Any]) -> tuple[str, dict[str, Any] | tuple[Any, ...]]:
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = Compiled(statement, self._dialect)
        return compiled.render(params)
