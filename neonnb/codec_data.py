"""The data values of the codec: numpy arrays and scalars as ``.npy`` (``allow_pickle=False``),
pandas DataFrames and Series as Parquet (pyarrow), pandas Timestamps by their ISO text. Never
pickle: decoding a stored value can't run code, whoever wrote it. Imported only when such a
value shows up, so plain jobs never import numpy, pandas or pyarrow.

Each value is a tagged JSON object (see neonnb.codec): ``{"$type": "dataframe", "value":
"<base64 Parquet>"}``; a Series keeps its name, a frame with column names that aren't text
keeps them beside the Parquet (which only holds text names).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

from .errors import MissingExtra, PayloadError, SerializationError

KINDS = frozenset({"ndarray", "numpy", "dataframe", "series", "timestamp"})
SERIES_COLUMN = "value"


def encode(value: Any, path: str, tag: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """``value`` (a numpy or pandas object) as a tagged JSON object; SerializationError
    naming ``path`` for one that can't be stored without pickle. ``tag(kind, raw, **extra)``
    builds the tagged object; names inside go through ``encode_name``."""
    import numpy as np

    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.hasobject:
            raise SerializationError(
                f"{path} is a numpy {'array' if isinstance(value, np.ndarray) else 'value'} of dtype object, "
                "which can't be stored without pickle; convert it (arr.astype(str), a list, or a DataFrame)")
        buffer = io.BytesIO()
        np.save(buffer, value if isinstance(value, np.ndarray) else np.asarray(value), allow_pickle=False)
        return tag("ndarray" if isinstance(value, np.ndarray) else "numpy", _text(buffer.getvalue()))
    pd = _pandas()
    if isinstance(value, pd.Timestamp):
        if value is pd.NaT:
            raise SerializationError(f"{path} is NaT; pass None for a missing time")
        return tag("timestamp", value.isoformat(), tz=None if value.tz is None else str(value.tz))
    if isinstance(value, pd.Series):
        frame = value.to_frame(SERIES_COLUMN)
        return tag("series", _parquet(frame, path), name=value.name)
    if isinstance(value, pd.DataFrame):
        columns = list(value.columns)
        if all(isinstance(c, str) for c in columns):
            return tag("dataframe", _parquet(value, path))
        if len(set(map(repr, columns))) != len(columns):
            raise SerializationError(f"{path} is a DataFrame with repeated column names; make them unique")
        renamed = value.set_axis([str(i) for i in range(len(columns))], axis="columns")
        return tag("dataframe", _parquet(renamed, path), columns=columns)
    raise SerializationError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which can't be stored; pass a "
        "DataFrame, a Series, a numpy array or scalar, or plain data")


def decode(kind: str, raw: Any, extra: dict[str, Any], path: str) -> Any:
    """The value a tagged object of ``kind`` holds; PayloadError naming ``path`` if it is
    not one this module wrote."""
    try:
        if kind in ("ndarray", "numpy"):
            import numpy as np

            array = np.load(io.BytesIO(base64.b64decode(raw, validate=True)), allow_pickle=False)
            return array if kind == "ndarray" else array[()]
        pd = _pandas()
        if kind == "timestamp":
            stamp = pd.Timestamp(raw)
            return stamp if extra.get("tz") is None else stamp.tz_convert(extra["tz"])
        frame = pd.read_parquet(io.BytesIO(base64.b64decode(raw, validate=True)), engine="pyarrow")
        if kind == "series":
            return frame[SERIES_COLUMN].rename(extra.get("name"))
        if "columns" in extra:
            frame = frame.set_axis(list(extra["columns"]), axis="columns")
        return frame
    except MissingExtra:
        raise
    except Exception as exc:  # a damaged or foreign value: say which, never run anything
        raise PayloadError(f"{path}: the stored {kind} can't be read back ({type(exc).__name__}: {exc})") from None


def describe(kind: str, raw: Any) -> str:
    """A one-line description of a stored value, read from its header (the Parquet footer,
    the ``.npy`` header), without loading it."""
    if kind == "timestamp":
        return str(raw)
    data = io.BytesIO(base64.b64decode(raw, validate=True))
    if kind in ("ndarray", "numpy"):
        import numpy as np

        version = np.lib.format.read_magic(data)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(data)
        return f"<ndarray {dtype.name} {shape}>" if kind == "ndarray" else f"<numpy {dtype.name}>"
    _pyarrow(kind)
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(data)
    names = [n for n in metadata.schema.names if not n.startswith("__index_level_")]
    if kind == "series":
        return f"<Series {metadata.num_rows:,} rows>"
    listed = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
    return f"<DataFrame {metadata.num_rows:,} rows x {len(names)} columns: {listed}>"


def _parquet(frame: Any, path: str) -> str:
    _pyarrow(path)
    buffer = io.BytesIO()
    try:
        frame.to_parquet(buffer, engine="pyarrow")
    except Exception as exc:  # pyarrow refuses a column it can't type (mixed objects, say)
        raise SerializationError(
            f"{path} is a DataFrame that Parquet can't hold ({type(exc).__name__}: {exc}); give each column one "
            "type (df.astype(...)), or convert object columns to str") from None
    return _text(buffer.getvalue())


def _text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pandas() -> Any:
    import pandas

    return pandas


def _pyarrow(path: str) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MissingExtra(f"{path} is a pandas object, stored as Parquet with pyarrow: "
                           "pip install 'neonnb[notebook]' (or pyarrow)") from None
