"""Jobs whose arguments and results are data (DataFrames, arrays, NaN, dates), for the tests
of neonnb.codec through workers in other processes (`neonnb worker --import tests.data_jobs`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from neonnb import Context, Job


class Echo(Job):
    """Returns its value as it was given."""

    value: Any

    def handle(self, ctx: Context) -> Any:
        return self.value


class Summarise(Job):
    """Typed data fields: a partition and a factor, checked at dispatch."""

    part: pd.DataFrame
    factor: float
    weights: np.ndarray

    def handle(self, ctx: Context) -> pd.DataFrame:
        totals = self.part.groupby("region", observed=True)["price"].sum() * self.factor
        return totals.to_frame("total").assign(weight=float(self.weights.sum()))


class ReturnsAnObject(Job):
    """Returns what can't be stored."""

    def handle(self, ctx: Context) -> Any:
        return object()


class BigFrame(Job):
    """Returns a frame of ``rows`` rows."""

    rows: int

    def handle(self, ctx: Context) -> pd.DataFrame:
        return frame_of(self.rows)


def frame_of(rows: int) -> pd.DataFrame:
    ids = np.arange(rows, dtype="int64")
    return pd.DataFrame({
        "id": ids,
        "region": pd.Categorical(np.array(["eu", "us", "apac"])[ids % 3]),
        "price": (ids % 1000) / 10.0,
        "when": pd.date_range("2026-01-01", periods=rows, freq="s", tz="UTC"),
    })

