"""JSON codec for job arguments and results, driven by the declared field types. Never pickle.

``encode`` turns a value into JSON data and refuses anything it can't round-trip, naming the
field path. Plain JSON stays plain; a value JSON has no type for is a tagged object,
``{"$type": "datetime", "value": "2026-12-07T10:00:00+00:00"}``: NaN and infinities, datetime,
date, time, timedelta, Decimal, UUID, bytes, and (neonnb.codec_data) numpy arrays and scalars
as ``.npy``, pandas frames and series as Parquet. A dict of the caller's that has a ``$type``
key of its own is wrapped in a ``dict`` tag, so no user data is ever read as a tag.

``decode`` rebuilds the declared type from JSON data and validates it on the way, again naming
the path (``report.rows[3].when``); where nothing is declared (a result, an untyped argument)
each tagged value comes back as the type it was. Decoding builds only these types: a stored
value can't run code, whoever wrote it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import enum
import functools
import json
import math
import numbers
import types
import typing
import uuid
import zoneinfo
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from .errors import PayloadError, SerializationError

_PRIMITIVES = (str, int, float, bool, type(None))
_EXACT_PRIMITIVES = frozenset(_PRIMITIVES)  # most values are one of these exactly: checked first


MAX_DEPTH = 100  # nesting deeper than this is refused by name, before it meets Python's recursion limit
TYPE_KEY, VALUE_KEY = "$type", "value"
_DATA_MODULES = ("numpy", "pandas")  # their values go to neonnb.codec_data, imported when one shows up


def is_data_value(value: Any) -> bool:
    """A numpy or pandas value (encoded by neonnb.codec_data)."""
    return type(value).__module__.partition(".")[0] in _DATA_MODULES


def tag(kind: str, raw: Any, **extra: Any) -> dict[str, Any]:
    """The tagged JSON object of a value JSON has no type for; ``extra`` values are encoded."""
    tagged = {TYPE_KEY: kind, VALUE_KEY: raw}
    for name, item in extra.items():
        if item is not None:
            tagged[name] = encode(item, f"{kind}.{name}")
    return tagged


def encode(value: Any, path: str, depth: int = 0) -> Any:
    """JSON data for ``value``; raises SerializationError naming ``path``."""
    if type(value) in _EXACT_PRIMITIVES:
        if type(value) is float and not math.isfinite(value):
            return tag("float", repr(value))  # 'nan', 'inf', '-inf'
        return value
    if depth >= MAX_DEPTH:
        raise SerializationError(f"{path} is nested more than {MAX_DEPTH} levels deep; flatten it")
    depth += 1
    if isinstance(value, enum.Enum):
        return encode(value.value, path, depth)
    if is_data_value(value):
        from . import codec_data

        return codec_data.encode(value, path, tag)
    if isinstance(value, float):  # a float subclass: checked as a float
        return encode(float(value), path, depth)
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, dt.datetime):
        zone = value.tzinfo.key if isinstance(value.tzinfo, zoneinfo.ZoneInfo) else None
        return tag("datetime", value.isoformat(), tz=zone)
    if isinstance(value, dt.date):
        return tag("date", value.isoformat())
    if isinstance(value, dt.time):
        return tag("time", value.isoformat())
    if isinstance(value, dt.timedelta):
        return tag("timedelta", [value.days, value.seconds, value.microseconds])
    if isinstance(value, Decimal):
        return tag("decimal", str(value))
    if isinstance(value, uuid.UUID):
        return tag("uuid", str(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return tag("bytes", base64.b64encode(value).decode("ascii"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return encode_fields(value, path, depth)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str | int | enum.Enum | uuid.UUID):
                raise SerializationError(f"{path} has a dict key {key!r} of type {type(key).__name__}; use str keys")
            name = key.value if isinstance(key, enum.Enum) else key
            out[str(name)] = encode(item, f"{path}[{key!r}]", depth)
        return tag("dict", out) if TYPE_KEY in out else out
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [encode(item, f"{path}[{i}]", depth) for i, item in enumerate(items)]
    raise SerializationError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which can't be stored; pass data "
        "(str, numbers, dates, Decimal, UUID, bytes, Enum, dataclasses, lists, dicts, DataFrames, numpy arrays) "
        "and inject objects such as connections with qm.provide(...) and ctx.deps"
    )


def encode_fields(value: Any, path: str, depth: int = 0) -> dict[str, Any]:
    """A dataclass instance as a JSON object of its fields, each encoded."""
    cls: type = type(value)
    return {name: encode(getattr(value, name), f"{path}.{name}", depth) for name in _fields_of(cls)}


dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
"""Compact JSON text; a bare NaN is refused (other languages can't read it): encode tags it."""


def loads(text: str) -> Any:
    """A stored value (a result), each tagged value back as the type it was."""
    return untag(json.loads(text), "result")


def untag(data: Any, path: str) -> Any:
    """JSON data with every tagged object replaced by its value (nothing declared)."""
    if type(data) is list:
        return [untag(item, path) for item in data] if _has_objects(data) else data
    if type(data) is dict:
        if TYPE_KEY in data:
            return _value_of(data, path)
        return {key: untag(item, path) for key, item in data.items()}
    return data


def _has_objects(items: list[Any]) -> bool:
    return any(type(item) in (dict, list) for item in items)


def shown(data: Any, *, items: int = 20, chars: int = 200, depth: int = 20) -> Any:
    """Stored JSON data made short and plain for a view (a listing, a page, a table): long
    strings and lists cut with a note of what was left out, nesting below ``depth`` levels as
    "…", tagged values as text (a frame as ``<DataFrame 1,000,000 rows x 4 columns: id,
    region, ...>``), without decoding them."""
    if type(data) is str:
        return data if len(data) <= chars else data[:chars - 1] + "…"
    if type(data) in (list, dict) and depth <= 0:
        return "…"
    if type(data) is list:
        head = [shown(item, items=items, chars=chars, depth=depth - 1) for item in data[:items]]
        return [*head, f"… {len(data) - items} more"] if len(data) > items else head
    if type(data) is dict:
        if TYPE_KEY in data:
            return _shown_tag(data, items, chars)
        pairs = list(data.items())
        out = {str(key): shown(item, items=items, chars=chars, depth=depth - 1) for key, item in pairs[:items]}
        if len(pairs) > items:
            out["…"] = f"{len(pairs) - items} more"
        return out
    return data


def shown_payload(payload: str, *, items: int = 20, chars: int = 200) -> Any:
    """A stored payload (a job's arguments) as ``shown`` makes it; the text itself if it is
    not JSON, or nested too deep for Python's reader (a damaged payload is shown as it is)."""
    try:
        return shown(json.loads(payload), items=items, chars=chars)
    except (ValueError, RecursionError):
        return shown(payload, chars=chars)


def _shown_tag(tagged: dict[str, Any], items: int, chars: int) -> Any:
    kind, raw = tagged.get(TYPE_KEY), cast(Any, tagged.get(VALUE_KEY))
    if kind == "dict":
        return shown(raw, items=items, chars=chars)
    if kind in ("float", "datetime", "date", "time", "decimal", "uuid") and isinstance(raw, str):
        return raw
    if kind == "bytes" and isinstance(raw, str):
        return f"<{len(raw) * 3 // 4:,} bytes>"
    if kind == "artifact":
        return f"<{tagged.get('bytes', 0):,} bytes kept apart at {raw}>"
    try:
        if kind == "timedelta":
            return str(_value_of(tagged, "shown"))
        from . import codec_data

        if kind in codec_data.KINDS:
            return codec_data.describe(str(kind), raw)
    except Exception:  # a view shows what it can: a damaged value is said to be so
        pass
    return f"<{kind} that can't be read>"


def _value_of(tagged: dict[str, Any], path: str) -> Any:
    """The value a tagged object holds; PayloadError naming ``path`` for a damaged one."""
    kind, raw = tagged.get(TYPE_KEY), cast(Any, tagged.get(VALUE_KEY))
    try:
        if kind == "dict":
            if type(raw) is not dict:
                raise ValueError("not an object")
            return {key: untag(item, f"{path}[{key!r}]") for key, item in raw.items()}
        if kind == "float" and raw in ("nan", "inf", "-inf"):
            return float(raw)
        if kind == "datetime":
            value = dt.datetime.fromisoformat(raw)
            zone = tagged.get("tz")
            return value.astimezone(zoneinfo.ZoneInfo(zone)) if isinstance(zone, str) else value
        if kind == "date":
            return dt.date.fromisoformat(raw)
        if kind == "time":
            return dt.time.fromisoformat(raw)
        if kind == "timedelta":
            days, seconds, microseconds = raw
            return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)
        if kind == "decimal":
            return Decimal(raw)
        if kind == "uuid":
            return uuid.UUID(raw)
        if kind == "bytes":
            return base64.b64decode(raw, validate=True)
    except (TypeError, ValueError, InvalidOperation, binascii.Error, zoneinfo.ZoneInfoNotFoundError) as exc:
        raise PayloadError(f"{path}: a stored {kind} that can't be read back ({exc})") from None
    if kind == "artifact" and isinstance(raw, str):  # a value kept apart (neonnb.artifacts)
        from . import artifacts

        return untag(json.loads(artifacts.read(raw)), path)
    from . import codec_data

    if kind in codec_data.KINDS:
        extra = {name: untag(item, path) for name, item in tagged.items() if name not in (TYPE_KEY, VALUE_KEY)}
        return codec_data.decode(str(kind), raw, extra, path)
    raise PayloadError(f"{path}: {TYPE_KEY} {kind!r} is not a type neonnb stores")


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
        return untag(data, path)
    if type(data) is dict and TYPE_KEY in data:
        if data[TYPE_KEY] == "dict":  # the caller's own dict with a "$type" key: decode it as declared
            data = data.get(VALUE_KEY)
        else:
            return _fit(_value_of(data, path), hint, path)
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


def _fit(value: Any, hint: Any, path: str) -> Any:
    """A tagged value checked against (and, for numbers, converted to) the declared type."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(hint):
            try:
                return _fit(value, arg, path)
            except PayloadError:
                continue
    elif hint is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)  # NaN, infinities, numpy floats
    elif hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    elif isinstance(origin or hint, type) and isinstance(value, origin or hint):
        return value
    raise PayloadError(f"{path}: expected {_name(hint)}, got {type(value).__name__}")


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
