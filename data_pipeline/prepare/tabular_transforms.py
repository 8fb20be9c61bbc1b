"""The transforms `recsys prepare tabular` learns on the train split and applies to every split
(and to new rows later, `apply_transforms`): which columns are categorical or numeric, their
vocabularies, log and standardisation statistics, crossed features. Saved as transforms.json."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.prepare.output import (
    FIRST_ID,
    MISSING_ID,
    RARE_ID,
)
from data_pipeline.prepare.tabular_schema import BOTH, CATEGORICAL, DROPPED, NUMERIC, infer_kinds
from data_pipeline.schema import DataError, DatasetSchema, SparseFeature

if TYPE_CHECKING:
    from data_pipeline.prepare.tabular import TabularOptions

VERSION = 2  # bump when the transforms change meaning, so stale datasets are not reported up to date
LABEL = "label"
TRANSFORMS_FILE = "transforms.json"
NULL_VALUES = ("", "?", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "#N/A")


def clean_strings(column, null_values) -> pa.ChunkedArray:
    """Trimmed strings, with the null tokens made null."""
    column = pc.utf8_trim_whitespace(column)
    is_token = pc.is_in(column, value_set=pa.array(list(null_values), pa.string()))
    return pc.if_else(is_token, pa.scalar(None, pa.string()), column)


@dataclass
class LabelSpec:
    source: str
    task: str = "binary"
    positive: list[str] | None = None

    def values(self, column, null_values) -> pa.Array:
        """int8 0/1 (binary) or float32 (regression) labels; null where the label is missing."""
        if self.task == "regression":
            y = numbers(column, null_values)
            return pa.array(y.astype(np.float32), pa.float32(), from_pandas=True)
        strings = category_strings(column, null_values).combine_chunks()
        if pa.types.is_boolean(column.type):
            strings = pc.utf8_lower(strings)
        positive = pc.is_in(strings, value_set=pa.array(self.positive, pa.string()))
        return pc.if_else(pc.is_null(strings), pa.scalar(None, pa.int8()), pc.cast(positive, pa.int8()))


# ---- column values -----------------------------------------------------------------------------


def category_strings(column, null_values) -> pa.ChunkedArray:
    """A column's values as trimmed strings (ints "3", bools "true", floats "1.5"), nulls for nulls,
    NaN and the null tokens: the one form vocabularies are built from and looked up in."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_null(column.type):
        return pa.chunked_array([pa.nulls(len(column), pa.string())])
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_finite(column), column, pa.scalar(None, column.type))
    if not pa.types.is_string(column.type):
        try:
            column = column.cast(pa.string())
        except pa.ArrowException as e:
            raise DataError(f"type {column.type} cannot be used as a category ({e})") from None
    return clean_strings(column, null_values)


def numbers(column, null_values) -> np.ndarray:
    """A column's values as float64, NaN where null, non-finite or a null token."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    t = column.type
    if pa.types.is_null(t):
        return np.full(len(column), np.nan)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        column = clean_strings(column.cast(pa.string()), null_values)
    elif not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)):
        raise DataError(f"type {t} is not numeric")
    try:
        column = pc.cast(column, pa.float64())
    except pa.ArrowInvalid as e:
        raise DataError(f"holds a value that is not a number ({e})") from None
    x = pc.fill_null(column, np.nan).to_numpy()
    return np.where(np.isfinite(x), x, np.nan)


def _log1p(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(x, 0.0))  # NaN stays NaN


def _skewness(x: np.ndarray) -> float:
    std = x.std()
    return float(((x - x.mean()) ** 3).mean() / std**3) if std > 0 else 0.0


def _vocabulary(values: pa.ChunkedArray, min_frequency: int, max_vocab: int) -> list[str]:
    """Non-null values seen at least `min_frequency` times, most frequent first, ties by value."""
    counts = pc.value_counts(values.drop_null())
    table = pa.table({"value": counts.field("values"), "count": counts.field("counts")})
    table = table.filter(pc.greater_equal(table["count"], min_frequency))
    table = table.sort_by([("count", "descending"), ("value", "ascending")])
    vocab = table["value"].to_pylist()
    return vocab[:max_vocab] if max_vocab else vocab


def _sanitise(name: str) -> str:
    clean = re.sub(r"[^0-9A-Za-z_]+", "_", name.strip()).strip("_")
    return clean if clean and not clean[0].isdigit() else f"f_{clean}"


class _Namer:
    """Unique sanitised names (a clash gets `_2`, `_3`, ...)."""

    def __init__(self, taken) -> None:
        self.taken = set(taken)

    def __call__(self, raw: str) -> str:
        base = name = _sanitise(raw)
        i = 2
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


# ---- the transforms ----------------------------------------------------------------------------


@dataclass
class Categorical:
    source: str
    name: str
    vocabulary: list[str]

    @property
    def num_embeddings(self) -> int:
        return FIRST_ID + len(self.vocabulary)


@dataclass
class Numeric:
    source: str
    name: str
    mean: float
    std: float
    log: bool
    skew: float
    """Train skewness before any log (why the log was or was not applied)."""
    missing: str | None
    """Name of the 0/1 missing-indicator column, if the train split had nulls."""


@dataclass
class Cross:
    sources: list[str]
    name: str
    sizes: list[int]
    """num_embeddings of each component when fitted (the radix of the combined code)."""
    vocabulary: list[list[int]]
    """Component id tuples, most frequent first."""

    @property
    def num_embeddings(self) -> int:
        return FIRST_ID + len(self.vocabulary)


@dataclass
class Transforms:
    """What was learned from the train split, and the raw-rows -> training-columns function."""

    label: LabelSpec
    categorical: list[Categorical]
    numeric: list[Numeric]
    crosses: list[Cross]
    null_values: list[str]
    dropped: dict[str, str] = field(default_factory=dict)
    """Input columns not used, and why."""

    @property
    def dense_names(self) -> list[str]:
        return [name for n in self.numeric for name in (n.name, n.missing) if name]

    @property
    def sparse_features(self) -> list[SparseFeature]:
        return [SparseFeature(f.name, f.num_embeddings) for f in [*self.categorical, *self.crosses]]

    # ---- fit -----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, train: pa.Table, options: TabularOptions, where: str = "input", choices=None) -> Transforms:
        """Learn everything from `train` (raw columns, as `read_table` gives them); the column kinds
        are `choices` (`tabular_schema.infer_kinds`, inferred here when not given)."""
        if choices is None:
            choices = infer_kinds(train, options)
        kinds = {c: choice.kind for c, choice in choices.items() if choice.kind != DROPPED}
        dropped = {c: choice.why for c, choice in choices.items() if choice.kind == DROPPED}
        namer = _Namer([LABEL])
        categorical = []
        for source in (c for c, k in kinds.items() if k in (CATEGORICAL, BOTH)):
            values = column_values(train, source, where, lambda col: category_strings(col, options.null_values))
            vocabulary = _vocabulary(values, options.min_frequency, options.max_vocab)
            categorical.append(Categorical(source, namer(source), vocabulary))
        numeric = []
        for source in (c for c, k in kinds.items() if k in (NUMERIC, BOTH)):
            x = column_values(train, source, where, lambda col: numbers(col, options.null_values))
            present = x[~np.isnan(x)]
            skew = _skewness(present) if len(present) else 0.0
            auto = options.auto_log_skew > 0 and len(present) and present.min() >= 0 and skew > options.auto_log_skew
            log = source in options.log or bool(auto)
            if log:
                present = _log1p(present)
            mean = float(present.mean()) if len(present) else 0.0
            std = float(present.std()) if len(present) else 0.0
            copy = kinds[source] == BOTH  # the categorical feature has the name, and id 0 for nulls
            name = namer(f"{source}_value" if copy else source)
            missing = namer(f"{name}_missing") if len(present) < len(x) and not copy else None
            numeric.append(Numeric(source, name, mean, std if std > 0 else 1.0, log, round(skew, 4), missing))
        label = LabelSpec(options.label, options.task, options.positive)
        transforms = cls(label, categorical, numeric, [], list(options.null_values), dropped)
        by_source = {c.source: c for c in categorical}
        for sources in options.cross:
            for s in sources:
                if s not in by_source:
                    why = f"is {kinds[s]}" if s in kinds else f"was dropped ({dropped.get(s)})"
                    raise DataError(
                        f"{where}: --cross {','.join(sources)}: column '{s}' {why}; crosses take "
                        "categorical columns (name it in --categorical)"
                    )
            parts = [by_source[s] for s in sources]
            sizes = [p.num_embeddings for p in parts]
            if np.prod(np.array(sizes, dtype=float)) >= 2.0**62:
                raise DataError(
                    f"--cross {','.join(sources)}: vocabularies too large to cross ({' x '.join(map(str, sizes))})"
                )
            codes = np.ravel_multi_index([transforms._ids(train, p, where) for p in parts], sizes)
            values, counts = np.unique(codes, return_counts=True)
            keep = counts >= options.min_frequency
            values = values[keep][np.lexsort((values[keep], -counts[keep]))]  # by count desc, then code
            values = values[: options.max_vocab] if options.max_vocab else values
            vocabulary = np.stack(np.unravel_index(values, sizes), axis=1).tolist() if len(values) else []
            name = namer("_x_".join(p.name for p in parts))
            transforms.crosses.append(Cross(list(sources), name, sizes, vocabulary))
        return transforms

    # ---- transform -----------------------------------------------------------------------------
    def _ids(self, table: pa.Table, feature: Categorical, where: str) -> np.ndarray:
        values = column_values(table, feature.source, where, lambda col: category_strings(col, self.null_values))
        index = pc.index_in(values, value_set=pa.array(feature.vocabulary, pa.string()))
        ids = pc.fill_null(pc.add(pc.cast(index, pa.int64()), FIRST_ID), RARE_ID)
        return pc.if_else(pc.is_null(values), MISSING_ID, ids).to_numpy()

    def transform(self, table: pa.Table, where: str = "input") -> pa.Table:
        """Raw rows -> exactly the training columns (label first when the label column is present,
        then dense, then sparse). Vectorised; the same call the preparer makes for every split."""
        table = table.rename_columns([n.strip() for n in table.column_names])
        out: dict[str, pa.Array] = {}
        if self.label.source in table.column_names:
            out[LABEL] = column_values(
                table, self.label.source, where, lambda col: self.label.values(col, self.null_values)
            )
        for f in self.numeric:
            x = column_values(table, f.source, where, lambda col: numbers(col, self.null_values))
            missing = np.isnan(x)
            z = ((_log1p(x) if f.log else x) - f.mean) / f.std
            out[f.name] = pa.array(np.where(missing, 0.0, z).astype(np.float32))
            if f.missing:
                out[f.missing] = pa.array(missing.astype(np.float32))
        ids = {}
        for f in self.categorical:
            ids[f.source] = self._ids(table, f, where)
            out[f.name] = pa.array(ids[f.source], pa.int64())
        by_source = {f.source: f for f in self.categorical}
        for f in self.crosses:
            sizes = [by_source[s].num_embeddings for s in f.sources]
            if sizes != f.sizes:
                raise DataError(f"cross '{f.name}': component sizes {sizes} differ from the fitted {f.sizes}")
            codes = np.ravel_multi_index([ids[s] for s in f.sources], sizes)
            known = np.ravel_multi_index(np.array(f.vocabulary, np.int64).reshape(-1, len(sizes)).T, sizes)
            index = pc.index_in(pa.array(codes), value_set=pa.array(known, pa.int64()))
            out[f.name] = pc.fill_null(pc.add(pc.cast(index, pa.int64()), FIRST_ID), RARE_ID)
        return pa.table(out)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "version": VERSION,
            "id_layout": {"oov": RARE_ID, "null": MISSING_ID, "first_value": FIRST_ID},
            "label": asdict(self.label),
            "null_values": self.null_values,
            "categorical": [asdict(f) for f in self.categorical],
            "numeric": [asdict(f) for f in self.numeric],
            "crosses": [asdict(f) for f in self.crosses],
            "dropped": self.dropped,
        }

    @classmethod
    def from_json(cls, raw: dict) -> Transforms:
        if raw.get("version") != VERSION:
            raise DataError(f"transforms version {raw.get('version')} is not {VERSION}: prepare the dataset again")
        return cls(
            label=LabelSpec(**raw["label"]),
            categorical=[Categorical(**f) for f in raw["categorical"]],
            numeric=[Numeric(**f) for f in raw["numeric"]],
            crosses=[Cross(**f) for f in raw["crosses"]],
            null_values=list(raw["null_values"]),
            dropped=dict(raw.get("dropped", {})),
        )


def load_transforms(path: str | Path) -> Transforms:
    """The transforms of a prepared dataset (its directory, or the transforms.json itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / DatasetSchema.load(path).extra.get("transforms", TRANSFORMS_FILE)
    if not path.is_file():
        raise DataError(f"{path} not found (a dataset made by `recsys prepare tabular` has one)")
    return Transforms.from_json(json.loads(path.read_text()))


def apply_transforms(table: pa.Table, transforms: Transforms | dict | str | Path) -> pa.Table:
    """Raw rows (as `read_table` reads them) -> the training columns of the dataset, e.g. at prediction
    time: `apply_transforms(read_table("new.csv"), "data/adult")`. The label column is included when
    the raw table has one."""
    if isinstance(transforms, (str, Path)):
        transforms = load_transforms(transforms)
    elif isinstance(transforms, dict):
        transforms = Transforms.from_json(transforms)
    return transforms.transform(table)


def column_values(table: pa.Table, source: str, where: str, convert):
    """`convert(column)`, with a missing column or a bad value reported by file and column."""
    if source not in table.column_names:
        raise DataError(f"{where}: column '{source}' is missing (columns: {', '.join(table.column_names)})")
    try:
        return convert(table.column(source))
    except DataError as e:
        raise DataError(f"{where}: column '{source}': {e}") from None


def check_options(table: pa.Table, options: TabularOptions, where: str) -> None:
    """Every column the options name exists and the options agree with each other."""
    columns = table.column_names
    if options.label not in columns:
        raise DataError(f"{where}: label column '{options.label}' not found (columns: {', '.join(columns)})")
    named = [
        ("--categorical", options.categorical),
        ("--numeric", options.numeric),
        ("--both", options.both),
        ("--drop", options.drop),
        ("--log", options.log),
        ("--cross", [c for cross in options.cross for c in cross]),
    ]
    for flag, names in named:
        for name in names:
            if name not in columns:
                raise DataError(f"{where}: column '{name}' named in {flag} not found (columns: {', '.join(columns)})")
            if name == options.label:
                raise DataError(f"{where}: column '{name}' named in {flag} is the label")
    kinds = {"--categorical": set(options.categorical), "--numeric/--log": {*options.numeric, *options.log}}
    kinds["--both"] = set(options.both)
    flags = list(kinds)
    for i, a in enumerate(flags):
        for b in flags[i + 1 :]:
            twice = kinds[a] & kinds[b]
            if twice:
                raise DataError(f"column(s) {sorted(twice)} named in {a} and in {b}")
    for cross in options.cross:
        if len(cross) < 2 or len(set(cross)) != len(cross):
            raise DataError(f"--cross {','.join(cross)}: name two or three different columns")
        for name in cross:
            if name in options.drop or name in options.numeric or name in options.log:
                raise DataError(
                    f"--cross {','.join(cross)}: column '{name}' is dropped or numeric; "
                    "crosses take categorical columns"
                )
