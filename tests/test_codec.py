from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest

from neonnb.codec import decode, decode_fields, dumps, encode
from neonnb.errors import PayloadError, SerializationError


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Point:
    x: float
    y: float


@dataclasses.dataclass
class Everything:
    when: dt.datetime
    day: dt.date
    amount: Decimal
    key: uuid.UUID
    colour: Colour
    points: list[Point]
    by_name: dict[str, Point]
    by_id: dict[int, str]
    maybe: int | None = None
    pair: tuple[int, str] = (0, "")
    tags: set[str] = dataclasses.field(default_factory=set)


def test_round_trip_of_every_supported_type() -> None:
    value = Everything(
        when=dt.datetime(2026, 11, 29, 12, 30, tzinfo=dt.timezone.utc),
        day=dt.date(2026, 1, 2),
        amount=Decimal("10.25"),
        key=uuid.UUID(int=7),
        colour=Colour.BLUE,
        points=[Point(1, 2.5)],
        by_name={"a": Point(0, 0)},
        by_id={3: "three"},
        pair=(4, "four"),
        tags={"b", "a"},
    )
    data = encode(value, "Everything")
    assert dumps(data)  # plain JSON
    assert decode_fields(data, Everything, "Everything") == value


def test_fields_the_class_computes_are_not_stored() -> None:
    @dataclasses.dataclass
    class Box:
        w: int
        h: int
        area: int = dataclasses.field(init=False)

        def __post_init__(self) -> None:
            self.area = self.w * self.h

    data = encode(Box(2, 3), "Box")
    assert data == {"w": 2, "h": 3}  # the constructor would refuse "area"
    assert decode_fields(data, Box, "Box").area == 6


def test_unserialisable_value_names_the_field_path() -> None:
    @dataclasses.dataclass
    class Holder:
        items: list[object]

    with pytest.raises(SerializationError, match=r"Holder\.items\[1\] is a builtins\.object"):
        encode(Holder(items=[1, object()]), "Holder")


def test_decode_errors_name_the_path_and_the_type() -> None:
    with pytest.raises(PayloadError, match=r"Everything\.points\[0\]\.x: expected float, got 'one'"):
        decode_fields(
            {"when": "2026-01-01T00:00:00", "day": "2026-01-01", "amount": "1", "key": str(uuid.UUID(int=1)),
             "colour": "red", "points": [{"x": "one", "y": 1}], "by_name": {}, "by_id": {}},
            Everything,
            "Everything",
        )
    with pytest.raises(PayloadError, match="missing field 'y'"):
        decode({"x": 1}, Point, "p")
    with pytest.raises(PayloadError, match="unknown field"):
        decode({"x": 1, "y": 2, "z": 3}, Point, "p")
    with pytest.raises(PayloadError, match=r"can't decode 'purple' as Colour"):
        decode("purple", Colour, "c")
    with pytest.raises(PayloadError, match="expected int"):
        decode(True, int, "n")


def test_nan_is_data_and_deep_nesting_is_refused_naming_the_field() -> None:
    import math

    from neonnb import QueueManager, SerializationError
    from neonnb.config import Config
    from tests import jobs

    with QueueManager(Config(driver="memory")) as qm:

        @qm.job(queue="q")
        def measure(x: float, rows: list = []) -> float:  # noqa: B006 - never mutated
            return x

        @qm.job(queue="q")
        def echo(row):  # type: ignore[no-untyped-def]
            return row

        handles = [measure.dispatch(v) for v in (float("nan"), float("inf"), float("-inf"))]
        qm.worker("q", 1).start()
        assert [repr(h.result(timeout=10)) for h in handles] == ["nan", "inf", "-inf"]
        [record] = echo.map([{"price": float("nan"), "qty": 2}]).results(timeout=10)
        assert math.isnan(record["price"]) and record["qty"] == 2
        deep: list = []
        for _ in range(500):
            deep = [deep]
        with pytest.raises(SerializationError, match=r"measure\(rows=\.\.\.\)\[0\]\[0\].* nested more than 100 levels"):
            measure.dispatch(1.0, deep)
        with pytest.raises(SerializationError, match=r"Note\.tag: expected str, got float"):
            qm.dispatch("q", jobs.Note(float("nan")))  # type: ignore[arg-type]


def test_a_dict_of_the_callers_with_a_type_key_is_never_read_as_a_tag() -> None:
    value = {"$type": "bytes", "value": "AAEC", "more": [{"$type": "float", "value": "nan"}]}
    data = encode(value, "v")
    assert data["$type"] == "dict"
    assert decode(json.loads(dumps(data)), Any, "v") == value
    assert decode(data, dict[str, Any], "v") == value


def test_damaged_or_foreign_tags_are_payload_errors_that_run_nothing() -> None:
    for bad in [{"$type": "pickle", "value": "gASV"}, {"$type": "bytes", "value": "not base64!"},
                {"$type": "timedelta", "value": "1 day"}, {"$type": "ndarray", "value": "AAAA"},
                {"$type": "dataframe", "value": "UEFSMQ=="}, {"$type": "datetime", "value": "2026", "tz": "Mars/Base"}]:
        with pytest.raises(PayloadError, match=r"^v"):
            decode(bad, Any, "v")
    import base64
    import io

    import numpy as np
    pickled = io.BytesIO()
    np.save(pickled, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(PayloadError, match="ndarray can't be read back"):  # an object array would need pickle
        decode({"$type": "ndarray", "value": base64.b64encode(pickled.getvalue()).decode()}, Any, "v")
