"""A table's rows as the student's features: reading a CSV or Parquet table, and the encoding
fitted on the teacher split that travels with the exported student.

A numeric column is standardised, a missing value becomes the column's median with a 0/1
"missing" feature beside it, and a one-hot of its quantile bin follows (`numeric_bins`: an
MLP finds thresholds in it that it cannot find on the standardised value alone, as a tree
does); a text, boolean or listed categorical column is one-hot over its values in the
teacher split (at most `max_categories`, the rarer ones and missing values sharing one
"other" slot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.config import ConfigError, require

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
OTHER = "<other>"  # the one-hot slot of values outside a column's categories, and of missing ones

@dataclass
class TableConfig:
    """Where the table is and how to read it (task.data)."""

    path: str | None = None  # a .csv or .parquet file (required)
    label: str = "label"     # the label column, by name
    categorical: list[str] = field(default_factory=list)  # numeric-looking columns to read as categories
    drop: list[str] = field(default_factory=list)  # columns that are not features (ids); unnamed ones always are
    max_categories: int = 32  # per categorical column; rarer values share the "other" slot
    numeric_bins: int = 32    # quantile bins per numeric column, one-hot beside its value (0: none)

    def validate(self) -> None:
        require(self.path is not None, "task=tabular needs a table: task.data.path=/path/to/table.csv (CSV or Parquet, "
                                       "with a header and a label column named by task.data.label)")
        require(self.max_categories >= 1, f"task.data.max_categories must be >= 1, got {self.max_categories}")
        require(self.numeric_bins >= 0, f"task.data.numeric_bins must be >= 0 (0: no bins), got {self.numeric_bins}")
        require(self.label not in self.drop, f"task.data.drop holds the label column {self.label!r}")



def read_table(path: Path) -> pd.DataFrame:
    """The table at `path` (.csv with a header, or .parquet), or ConfigError naming the fix."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"table {path}: the suffix {path.suffix!r} is not one of {', '.join(FORMATS)}: give a CSV "
                          "file with a header row, or a Parquet file")
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except ImportError as err:
        raise ConfigError(f"table {path}: reading Parquet needs pyarrow ({err}): pip install pyarrow, "
                          "or give the table as CSV") from None
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ConfigError(f"table {path} cannot be read ({str(err).splitlines()[0]}): give a CSV file with a header "
                          "row, or a Parquet file") from None


@dataclass
class Encoding:
    """Table rows -> float features, fitted on the teacher split; saved with the student."""

    numeric: dict[str, list[float]]  # column -> [median, mean, std] (of the teacher split)
    flagged: list[str]               # numeric columns with a 0/1 "missing" feature beside them
    bins: dict[str, list[float]]     # numeric column -> the inner edges of its quantile bins
    categorical: dict[str, list[str]]  # column -> its categories; the OTHER slot follows them
    label: str
    classes: list[str]

    @classmethod
    def fit(cls, rows: pd.DataFrame, config: TableConfig, classes: list[str]) -> Encoding:
        numeric, flagged, bins, categorical = {}, [], {}, {}
        for column in feature_columns(rows, config):
            values = rows[column]
            if column in config.categorical or not pd.api.types.is_numeric_dtype(values) \
                    or pd.api.types.is_bool_dtype(values):
                counts = values.dropna().astype(str).value_counts()
                categorical[column] = sorted(counts.index[:config.max_categories].tolist())
                continue
            present = values.dropna().astype(float)
            median = float(present.median()) if len(present) else 0.0
            numeric[column] = [median, float(present.mean()) if len(present) else 0.0,
                               float(present.std(ddof=0)) if len(present) > 1 else 1.0]
            if values.isna().any():
                flagged.append(column)
            quantiles = np.arange(1, config.numeric_bins) / config.numeric_bins
            bins[column] = np.unique(np.quantile(present, quantiles)).tolist() if len(present) and len(quantiles) else []
        return cls(numeric, flagged, bins, categorical, config.label, classes)

    @property
    def width(self) -> int:
        return sum(self._numeric_size(column) for column in self.numeric) + \
            sum(len(c) + 1 for c in self.categorical.values())

    def _numeric_size(self, column: str) -> int:
        return 1 + (column in self.flagged) + (len(self.bins[column]) + 1 if self.bins[column] else 0)

    def blocks(self) -> list[slice]:
        """The features of each column (a numeric one's value, its missing flag, its bin; a one-hot group)."""
        spans, start = [], 0
        for column in self.numeric:
            size = self._numeric_size(column)
            spans.append(slice(start, start + size))
            start += size
        for categories in self.categorical.values():
            spans.append(slice(start, start + len(categories) + 1))
            start += len(categories) + 1
        return spans

    def features(self, rows: pd.DataFrame, *, where: str) -> torch.Tensor:
        """[N, width] float features of `rows`; ConfigError naming a missing or non-numeric column."""
        missing = [c for c in [*self.numeric, *self.categorical] if c not in rows.columns]
        if missing:
            raise ConfigError(f"{where} lacks the columns {missing} that the task's table has: a site's table has "
                              "the same columns as task.data.path")
        parts = []
        for column, (median, mean, std) in self.numeric.items():
            values = pd.to_numeric(rows[column], errors="coerce")
            bad = values.isna() & rows[column].notna()
            if bad.any():
                raise ConfigError(f"{where}: column {column!r} holds {int(bad.sum())} values that are not numbers "
                                  f"(e.g. {rows[column][bad].iloc[0]!r}); fix them, or list {column!r} in "
                                  "task.data.categorical")
            filled = values.fillna(median).to_numpy(np.float64)
            parts.append(((filled - mean) / (std or 1.0))[:, None])
            if column in self.flagged:
                parts.append(values.isna().to_numpy(np.float64)[:, None])
            if self.bins[column]:
                parts.append(one_hot(np.searchsorted(self.bins[column], filled, side="right"), len(self.bins[column]) + 1))
        for column, categories in self.categorical.items():
            index = {c: i for i, c in enumerate(categories)}
            slots = [index.get(v, len(categories)) for v in rows[column].astype(str).where(rows[column].notna(), None)]
            parts.append(one_hot(np.asarray(slots, dtype=np.int64), len(categories) + 1))
        return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))

    def labels(self, rows: pd.DataFrame, *, where: str) -> torch.Tensor:
        """[N] class indices of `rows`' labels; ConfigError for a label outside the task's classes."""
        if self.label not in rows.columns:
            raise ConfigError(f"{where} has no label column {self.label!r} (task.data.label)")
        index = {c: i for i, c in enumerate(self.classes)}
        raw = rows[self.label].astype(str)
        unknown = sorted(set(raw) - set(index))
        if unknown or rows[self.label].isna().any():
            raise ConfigError(f"{where}: labels {unknown or ['(missing)']} are not among the task's classes "
                              f"{self.classes}: fix or drop those rows")
        return torch.tensor([index[v] for v in raw], dtype=torch.int64)


def one_hot(slots: np.ndarray, width: int) -> np.ndarray:
    encoded = np.zeros((len(slots), width))
    encoded[np.arange(len(slots)), slots] = 1.0
    return encoded


def feature_columns(rows: pd.DataFrame, config: TableConfig) -> list[str]:
    """Every column but the label, the dropped ones and unnamed ones (a row number written by R or pandas)."""
    return [c for c in rows.columns
            if c != config.label and c not in config.drop and not (str(c) == "" or str(c).startswith("Unnamed:"))]
