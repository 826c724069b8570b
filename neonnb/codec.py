"""JSON codec for job arguments, driven by the declared field types. Never pickle.

``encode`` turns a value into plain JSON data and refuses anything it can't round-trip,
naming the field path. ``decode`` rebuilds the declared type from JSON data and validates it
on the way, again naming the path (``report.rows[3].when``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import json
import math
import types
import typing
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import PayloadError, SerializationError

_PRIMITIVES = (str, int, float, bool, type(None))
_EXACT_PRIMITIVES = frozenset(_PRIMITIVES)  # most values are one of these exactly: checked first


MAX_DEPTH = 100  # nesting deeper than this is refused by name, before it meets Python's recursion limit


def encode(value: Any, path: str, depth: int = 0) -> Any:
    """Plain JSON data for ``value``; raises SerializationError naming ``path``."""
    if type(value) in _EXACT_PRIMITIVES:
        if type(value) is float and not math.isfinite(value):
            raise SerializationError(f"{path} is {value!r}, which JSON can't hold; pass a finite number or None")
        return value
    if depth >= MAX_DEPTH:
        raise SerializationError(f"{path} is nested more than {MAX_DEPTH} levels deep; flatten it")
    depth += 1
    if isinstance(value, enum.Enum):
        return encode(value.value, path, depth)
    if isinstance(value, float):  # a float subclass (numpy.float64): checked as a float
        return encode(float(value), path, depth)
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return encode_fields(value, path, depth)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str | int | enum.Enum | uuid.UUID):
                raise SerializationError(f"{path} has a dict key {key!r} of type {type(key).__name__}; use str keys")
            out[str(encode(key, path, depth))] = encode(item, f"{path}[{key!r}]", depth)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [encode(item, f"{path}[{i}]", depth) for i, item in enumerate(items)]
    raise SerializationError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which can't be stored as JSON; "
        "pass plain data (str, numbers, dates, Decimal, UUID, Enum, dataclasses, lists, dicts) and "
        "inject objects such as connections with qm.provide(...) and ctx.deps"
    )


def encode_fields(value: Any, path: str, depth: int = 0) -> dict[str, Any]:
    """A dataclass instance as a JSON object of its fields, each encoded."""
    cls: type = type(value)
    return {name: encode(getattr(value, name), f"{path}.{name}", depth) for name in _fields_of(cls)}


dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
"""Compact JSON text; NaN and infinities are refused (other languages can't read them)."""


def decode(data: Any, hint: Any, path: str) -> Any:
    """Rebuild a value of type ``hint`` from JSON data; raises PayloadError naming ``path``."""
    try:
        return _decode(data, hint, path)
    except PayloadError:
        raise
    except (TypeError, ValueError, InvalidOperation, KeyError) as exc:
        raise PayloadError(f"{path}: can't decode {data!r} as {_name(hint)}: {exc}") from None


def _decode(data: Any, hint: Any, path: str) -> Any:
    if type(data) is hint and hint in _EXACT_PRIMITIVES:  # the common case, before the general checks
        return data
    if hint is Any or hint is typing.Any or hint is object:
        return data
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _decode(data, arg, path)
            except (PayloadError, TypeError, ValueError, InvalidOperation):
                errors.append(_name(arg))
        raise PayloadError(f"{path}: {data!r} matches none of {', '.join(errors)}")
    if origin is typing.Literal:
        if data not in args:
            raise PayloadError(f"{path}: {data!r} is not one of {args!r}")
        return data
    if origin in (list, set, frozenset, tuple) or hint in (list, set, frozenset, tuple):
        _expect(data, list, path, hint)
        container = origin or hint
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(data):
                raise PayloadError(f"{path}: expected {len(args)} items, got {len(data)}")
            return tuple(_decode(item, a, f"{path}[{i}]") for i, (a, item) in enumerate(zip(args, data, strict=True)))
        item_hint = args[0] if args else Any
        return container(_decode(item, item_hint, f"{path}[{i}]") for i, item in enumerate(data))
    if origin is dict or hint is dict:
        _expect(data, dict, path, hint)
        key_hint, value_hint = args if args else (Any, Any)
        return {
            _decode_key(k, key_hint, path): _decode(v, value_hint, f"{path}[{k!r}]") for k, v in data.items()
        }
    if not isinstance(hint, type):
        return data
    if issubclass(hint, enum.Enum):
        return hint(data)
    if hint is bool:
        _expect(data, bool, path, hint)
        return data
    if hint is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise PayloadError(f"{path}: expected int, got {data!r}")
        return data
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise PayloadError(f"{path}: expected float, got {data!r}")
        return float(data)
    if hint is str:
        _expect(data, str, path, hint)
        return data
    if hint is dt.datetime:
        return dt.datetime.fromisoformat(data)
    if hint is dt.date:
        return dt.date.fromisoformat(data)
    if hint is dt.time:
        return dt.time.fromisoformat(data)
    if hint is dt.timedelta:
        return dt.timedelta(seconds=data)
    if hint is Decimal:
        return Decimal(data)
    if hint is uuid.UUID:
        return uuid.UUID(data)
    if dataclasses.is_dataclass(hint):
        return decode_fields(data, hint, path)
    _expect(data, hint, path, hint)
    return data


def decode_fields(data: Any, cls: type, path: str) -> Any:
    """Build dataclass ``cls`` from a JSON object, decoding each field by its type."""
    _expect(data, dict, path, cls)
    fields = _fields_of(cls)
    unknown = data.keys() - fields.keys()
    if unknown:
        raise PayloadError(f"{path}: unknown field(s) {', '.join(sorted(unknown))} for {cls.__qualname__}")
    values = {}
    for name, (hint, required) in fields.items():
        if name in data:
            values[name] = decode(data[name], hint, f"{path}.{name}")
        elif required:
            raise PayloadError(f"{path}: missing field {name!r} of {cls.__qualname__}")
    return cls(**values)


@functools.lru_cache(maxsize=1024)
def _fields_of(cls: type) -> dict[str, tuple[Any, bool]]:
    """Each field's resolved type and whether it is required: resolving string annotations
    is the slow part of decoding, so it happens once per class. Fields with ``init=False``
    are left out: the class computes them (in ``__post_init__``), its constructor refuses them."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: (hints.get(f.name, Any), f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
        if f.init
    }


def _decode_key(key: str, hint: Any, path: str) -> Any:
    if hint is int:
        return int(key)
    return decode(key, hint, f"{path} key")


def _expect(data: Any, kind: type, path: str, hint: Any) -> None:
    if not isinstance(data, kind):
        raise PayloadError(f"{path}: expected {_name(hint)}, got {type(data).__name__} {data!r}")


def _name(hint: Any) -> str:
    return getattr(hint, "__qualname__", None) or repr(hint)
