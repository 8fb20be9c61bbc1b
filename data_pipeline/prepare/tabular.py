"""`recsys prepare tabular`: any CSV or Parquet table -> a training dataset plus the transforms that made it.

    recsys prepare tabular --input adult.csv --label income --positive '>50K,>50K.' --out data/adult \\
        --cross education,occupation
    recsys prepare tabular --input houses.parquet --label price --task regression --out data/houses \\
        --categorical zip --log lot_area --drop id

The whole table is read into memory (and the prepared splits are held in memory before writing):
fine up to a few GB of input; larger inputs want a streaming preparer such as `recsys prepare criteo`.

Steps:
  1. read: Parquet with its stored types; CSV with pyarrow.csv, then every string column is trimmed,
     its null tokens ("", "?", "NA", ... see --null-values) made null, and re-typed as int, float or
     bool when all its values are (so " 39" and "?" in a numeric column still give a number column);
  2. label: binary = label in --positive (compared as strings after strip), regression = float;
     rows with a null label are dropped and counted;
  3. split train/valid/test (default 80/10/10) by a seeded shuffle stratified by the binary label, or
     by label deciles for regression (`assign_splits`); valid and test keep the input's row order,
     train is shuffled (row groups of a sorted input would otherwise be correlated);
  4. fit `Transforms` on the train split only: column kinds, vocabularies, means/stds, log flags, crosses;
  5. write every split through `apply_transforms` (the same code a prediction service runs on new
     raw rows) and save the fitted transforms as `transforms.json`, named in `dataset.json`'s extra.

Column kinds (inferred on train; --categorical / --numeric / --drop override; --log implies --numeric):
  categorical: strings, booleans, integers with at most --max-int-levels distinct values;
  numeric: other integers, floats; dropped (and reported): constant or all-null columns, other types.

Ids of a categorical feature (one scalar int64 sparse feature per column, never null):
  0 = missing (null): its own id, so missingness is learnable;
  1 = out of vocabulary: a value seen fewer than --min-frequency times in train, or never;
  2.. = the vocabulary, most frequent first, ties by value.
Numeric features: log1p(max(x, 0)) when asked (--log) or when train values are >= 0 and their
skewness exceeds --auto-log-skew; then standardised with the train mean/std; nulls (and NaN/inf) ->
0 (the train mean); plus a 0/1 dense column `<name>_missing` when the train split has nulls.
Crosses (--cross a,b or a,b,c; repeatable), for a Wide part: a sparse feature `a_x_b` whose value is
the tuple of its components' ids (so rare component values cross as OOV and missing as missing),
with its own train vocabulary and the same id layout (id 0 is unused: a cross is never null).
Feature names are the column names sanitised to [A-Za-z0-9_] (they become KJT keys and `t_<name>`
embedding tables); the label column is written as `label`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_pipeline.prepare.output import DatasetOutput, input_identity, row_group_size, write_json, write_parquet
from data_pipeline.schema import SPLITS, DataError, DatasetSchema, SparseFeature, SplitInfo

VERSION = 1  # bump when the transforms change meaning, so stale datasets are not reported up to date
NULL_ID, OOV_ID, FIRST_ID = 0, 1, 2  # the same layout as criteo.py: 0 missing, 1 rare or unseen
LABEL = "label"
TRANSFORMS_FILE = "transforms.json"
NULL_VALUES = ("", "?", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "#N/A")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
REGRESSION_BINS = 10


@dataclass
class TabularOptions:
    """Everything that decides the dataset's content (recorded as its provenance)."""

    label: str
    positive: list[str] | None = None
    """Label values that mean 1 (binary); None: the label must already be 0/1 or true/false."""
    task: str = "binary"
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    cross: list[list[str]] = field(default_factory=list)
    min_frequency: int = 5
    max_int_levels: int = 50
    auto_log_skew: float = 2.0
    """Log-transform a non-negative numeric column whose train skewness exceeds this (0: never)."""
    max_vocab: int = 0
    """Keep at most this many values per vocabulary (0: no cap)."""
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    row_group_rows: int = 16_384
    null_values: list[str] = field(default_factory=lambda: list(NULL_VALUES))


# ---- reading -----------------------------------------------------------------------------------


def read_table(path: str | Path, null_values=NULL_VALUES) -> pa.Table:
    """Read a CSV (any pyarrow.csv input, e.g. .csv, .csv.gz, .tsv) or Parquet file, with column
    names stripped. Use it for prediction-time inputs too, so they are typed as at training time."""
    path = Path(path)
    parquet = path.suffix.lower() in PARQUET_SUFFIXES
    try:
        if parquet:
            table = pq.read_table(path)
        else:
            delimiter = "\t" if ".tsv" in (s.lower() for s in path.suffixes) else ","
            table = pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(null_values=list(null_values), strings_can_be_null=True),
            )
            table = _retype_strings(table, null_values)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot be read as {'Parquet' if parquet else 'CSV'} ({e})") from None
    names = [name.strip() for name in table.column_names]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column name(s) {duplicates}")
    return table.rename_columns(names)


def _clean_strings(column, null_values) -> pa.ChunkedArray:
    """Trimmed strings, with the null tokens made null."""
    column = pc.utf8_trim_whitespace(column)
    is_token = pc.is_in(column, value_set=pa.array(list(null_values), pa.string()))
    return pc.if_else(is_token, pa.scalar(None, pa.string()), column)


def _retype_strings(table: pa.Table, null_values) -> pa.Table:
    """CSV string columns -> int64 / float64 / bool when every non-null value (trimmed) is one."""
    for i, name in enumerate(table.column_names):
        column = table.column(i)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        column = _clean_strings(column.cast(pa.string()), null_values)
        if column.null_count < len(column):
            for kind in (pa.int64(), pa.float64()):
                try:
                    column = pc.cast(column, kind)
                    break
                except pa.ArrowInvalid:
                    pass
            else:
                lower = pc.utf8_lower(column)
                if pc.all(pc.is_in(lower.drop_null(), value_set=pa.array(["true", "false"]))).as_py():
                    column = pc.equal(lower, "true")
        table = table.set_column(i, name, column)
    return table


# ---- column values -----------------------------------------------------------------------------


def _category_strings(column, null_values) -> pa.ChunkedArray:
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
    return _clean_strings(column, null_values)


def _numbers(column, null_values) -> np.ndarray:
    """A column's values as float64, NaN where null, non-finite or a null token."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    t = column.type
    if pa.types.is_null(t):
        return np.full(len(column), np.nan)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        column = _clean_strings(column.cast(pa.string()), null_values)
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


# ---- labels and splits -------------------------------------------------------------------------


@dataclass
class LabelSpec:
    source: str
    task: str = "binary"
    positive: list[str] | None = None

    def values(self, column, null_values) -> pa.Array:
        """int8 0/1 (binary) or float32 (regression) labels; null where the label is missing."""
        if self.task == "regression":
            y = _numbers(column, null_values)
            return pa.array(y.astype(np.float32), pa.float32(), from_pandas=True)
        strings = _category_strings(column, null_values).combine_chunks()
        if pa.types.is_boolean(column.type):
            strings = pc.utf8_lower(strings)
        positive = pc.is_in(strings, value_set=pa.array(self.positive, pa.string()))
        return pc.if_else(pc.is_null(strings), pa.scalar(None, pa.int8()), pc.cast(positive, pa.int8()))


def _top_values(strings: pa.Array, k: int = 6) -> str:
    counts = pc.value_counts(strings.drop_null())
    values, n = counts.field("values").to_pylist(), counts.field("counts").to_numpy()
    return ", ".join(f"'{values[i]}' ({n[i]:,})" for i in np.argsort(-n, kind="stable")[:k])


def assign_splits(labels: np.ndarray, fractions, seed: int, task: str = "binary") -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of every row: a seeded shuffle inside each stratum
    (the binary label, or the label's decile for regression), cut at the fractions, so every split
    gets the stratum's share up to rounding. Depends only on the labels, their order and the seed."""
    n = len(labels)
    if task == "binary":
        strata = np.asarray(labels, np.int64)
    else:
        edges = np.unique(np.quantile(labels, np.linspace(0, 1, REGRESSION_BINS + 1)[1:-1]))
        strata = np.searchsorted(edges, labels, side="right")
    order = np.lexsort((np.random.default_rng(seed).random(n), strata))
    sorted_strata = strata[order]
    start = np.searchsorted(sorted_strata, sorted_strata, side="left")
    size = np.searchsorted(sorted_strata, sorted_strata, side="right") - start
    position = (np.arange(n) - start + 0.5) / size  # in (0, 1) within the row's stratum
    cuts = np.cumsum(fractions)[:-1] / np.sum(fractions)
    split = np.empty(n, np.int8)
    split[order] = np.searchsorted(cuts, position, side="right")
    return split


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
    def fit(cls, train: pa.Table, options: TabularOptions, where: str = "input") -> Transforms:
        """Learn everything from `train` (raw columns, as `read_table` gives them)."""
        kinds, dropped = infer_kinds(train, options)
        namer = _Namer([LABEL])
        categorical = []
        for source in (c for c, k in kinds.items() if k == "categorical"):
            values = _values(train, source, where, lambda col: _category_strings(col, options.null_values))
            vocabulary = _vocabulary(values, options.min_frequency, options.max_vocab)
            categorical.append(Categorical(source, namer(source), vocabulary))
        numeric = []
        for source in (c for c, k in kinds.items() if k == "numeric"):
            x = _values(train, source, where, lambda col: _numbers(col, options.null_values))
            present = x[~np.isnan(x)]
            skew = _skewness(present) if len(present) else 0.0
            auto = options.auto_log_skew > 0 and len(present) and present.min() >= 0 and skew > options.auto_log_skew
            log = source in options.log or bool(auto)
            if log:
                present = _log1p(present)
            mean = float(present.mean()) if len(present) else 0.0
            std = float(present.std()) if len(present) else 0.0
            name = namer(source)
            missing = namer(f"{name}_missing") if len(present) < len(x) else None
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
        values = _values(table, feature.source, where, lambda col: _category_strings(col, self.null_values))
        index = pc.index_in(values, value_set=pa.array(feature.vocabulary, pa.string()))
        ids = pc.fill_null(pc.add(pc.cast(index, pa.int64()), FIRST_ID), OOV_ID)
        return pc.if_else(pc.is_null(values), NULL_ID, ids).to_numpy()

    def transform(self, table: pa.Table, where: str = "input") -> pa.Table:
        """Raw rows -> exactly the training columns (label first when the label column is present,
        then dense, then sparse). Vectorised; the same call the preparer makes for every split."""
        table = table.rename_columns([n.strip() for n in table.column_names])
        out: dict[str, pa.Array] = {}
        if self.label.source in table.column_names:
            out[LABEL] = _values(table, self.label.source, where, lambda col: self.label.values(col, self.null_values))
        for f in self.numeric:
            x = _values(table, f.source, where, lambda col: _numbers(col, self.null_values))
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
            out[f.name] = pc.fill_null(pc.add(pc.cast(index, pa.int64()), FIRST_ID), OOV_ID)
        return pa.table(out)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "version": VERSION,
            "id_layout": {"oov": OOV_ID, "null": NULL_ID, "first_value": FIRST_ID},
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


def _values(table: pa.Table, source: str, where: str, convert):
    """`convert(column)`, with a missing column or a bad value reported by file and column."""
    if source not in table.column_names:
        raise DataError(f"{where}: column '{source}' is missing (columns: {', '.join(table.column_names)})")
    try:
        return convert(table.column(source))
    except DataError as e:
        raise DataError(f"{where}: column '{source}': {e}") from None


# ---- column kinds ------------------------------------------------------------------------------


def infer_kinds(train: pa.Table, options: TabularOptions) -> tuple[dict[str, str], dict[str, str]]:
    """{column: "categorical" | "numeric"} in table order, and {dropped column: why}."""
    kinds, dropped = {}, {}
    for name in train.column_names:
        column = train.column(name)
        t = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if name == options.label:
            continue
        if name in options.drop:
            dropped[name] = "--drop"
        elif name in options.categorical:
            kinds[name] = "categorical"
        elif name in options.numeric or name in options.log:
            kinds[name] = "numeric"
        elif column.null_count == len(column):
            dropped[name] = "all values missing"
        elif not (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_boolean(t)
            or pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_decimal(t)
        ):
            dropped[name] = f"type {t}: name it in --categorical or --numeric to use it"
        elif column.null_count == 0 and pc.count_distinct(column).as_py() == 1:
            dropped[name] = "constant"
        elif pa.types.is_integer(t):
            levels = pc.count_distinct(column).as_py()
            kinds[name] = "categorical" if levels <= options.max_int_levels else "numeric"
        elif pa.types.is_floating(t) or pa.types.is_decimal(t):
            kinds[name] = "numeric"
        else:
            kinds[name] = "categorical"
    return kinds, dropped


def _check_options(table: pa.Table, options: TabularOptions, where: str) -> None:
    """Every column the options name exists and the options agree with each other."""
    columns = table.column_names
    if options.label not in columns:
        raise DataError(f"{where}: label column '{options.label}' not found (columns: {', '.join(columns)})")
    named = [
        ("--categorical", options.categorical),
        ("--numeric", options.numeric),
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
    both = set(options.categorical) & (set(options.numeric) | set(options.log))
    if both:
        raise DataError(f"column(s) {sorted(both)} named in --categorical and in --numeric/--log")
    for cross in options.cross:
        if len(cross) < 2 or len(set(cross)) != len(cross):
            raise DataError(f"--cross {','.join(cross)}: name two or three different columns")
        for name in cross:
            if name in options.drop or name in options.numeric or name in options.log:
                raise DataError(
                    f"--cross {','.join(cross)}: column '{name}' is dropped or numeric; "
                    "crosses take categorical columns"
                )


# ---- the preparer ------------------------------------------------------------------------------


def _resolve_label(table: pa.Table, options: TabularOptions, where: str) -> LabelSpec:
    """The label spec, with --positive checked against the data (or defaulted for a 0/1 label)."""
    column = table.column(options.label)
    if options.task == "regression":
        if options.positive:
            raise DataError("--positive is for --task binary, not regression")
        return LabelSpec(options.label, "regression")
    strings = _category_strings(column, options.null_values).combine_chunks()
    if pa.types.is_boolean(column.type):
        strings = pc.utf8_lower(strings)
    seen = set(pc.unique(strings.drop_null()).to_pylist())
    positive = options.positive
    if not positive:
        if seen <= {"0", "1"}:
            positive = ["1"]
        elif seen <= {"true", "false"}:
            positive = ["true"]
        else:
            raise DataError(
                f"{where}: label column '{options.label}' is not 0/1: pass --positive VALUE "
                f"(its values: {_top_values(strings)})"
            )
    if pa.types.is_boolean(column.type):
        positive = [p.lower() for p in positive]
    if not seen & set(positive):
        raise DataError(
            f"{where}: label column '{options.label}' never holds the positive value(s) "
            f"{', '.join(repr(p) for p in positive)} (its values: {_top_values(strings)})"
        )
    if seen and seen <= set(positive):
        raise DataError(
            f"{where}: every label in column '{options.label}' is positive ({', '.join(sorted(seen))}): "
            "nothing to learn"
        )
    return LabelSpec(options.label, "binary", list(positive))


def prepare(
    input_path: str | Path, out: str | Path, options: TabularOptions, overwrite: bool = False, log=print
) -> DatasetSchema:
    """Read, split, fit on train, transform every split, write the dataset; see the module docstring."""
    path = Path(input_path)
    if not path.is_file():
        raise DataError(f"input {path} not found")
    if options.task not in ("binary", "regression"):
        raise DataError(f"--task must be binary or regression, not '{options.task}'")
    provenance = {"tabular": asdict(options), "inputs": input_identity([path]), "version": VERSION}
    output = DatasetOutput(out, provenance, overwrite=overwrite)
    existing = output.up_to_date()
    if existing is not None:
        rows = ", ".join(f"{k} {v.rows:,}" for k, v in existing.splits.items())
        log(f"{out}: up to date ({rows}); not redone")
        return existing

    where = str(path)
    table = read_table(path, options.null_values)
    if table.num_rows == 0:
        raise DataError(f"{where}: the table is empty (no rows)")
    _check_options(table, options, where)
    options = TabularOptions(**{**asdict(options), "positive": _resolve_label(table, options, where).positive})
    spec = LabelSpec(options.label, options.task, options.positive)
    labels = _values(table, options.label, where, lambda col: spec.values(col, options.null_values))
    read_rows = table.num_rows
    keep = labels.is_valid()
    table, labels = table.filter(keep), labels.filter(keep)
    if table.num_rows == 0:
        raise DataError(f"{where}: every value of label column '{options.label}' is missing")
    y = labels.to_numpy(zero_copy_only=False)

    split = assign_splits(y, options.split, options.seed, options.task)
    raw = {name: table.filter(pa.array(split == i)) for i, name in enumerate(SPLITS)}
    for name, part in raw.items():
        if part.num_rows == 0:
            raise DataError(
                f"{where}: {table.num_rows} rows with a label are too few for a non-empty "
                f"{name} split (--split {','.join(map(str, options.split))})"
            )
    raw["train"] = raw["train"].take(np.random.default_rng([options.seed, 1]).permutation(raw["train"].num_rows))

    transforms = Transforms.fit(raw["train"], options, where)
    if not transforms.sparse_features:
        raise DataError(
            f"{where}: no categorical column left: the models need at least one sparse feature "
            "(name one in --categorical)"
        )
    parts = {name: transforms.transform(part, where) for name, part in raw.items()}

    resuming = output.start()
    for name, part in parts.items():
        file = output.split_dir(name) / "part-00000.parquet"
        if not (resuming and file.is_file()):  # a finished file of the same dataset is kept
            write_parquet(part, file, row_group_size(part.num_rows, options.row_group_rows))
    write_json(transforms.to_json(), output.root / TRANSFORMS_FILE)
    train_y = parts["train"].column(LABEL).to_numpy()
    schema = DatasetSchema(
        root=output.root,
        name=path.name.split(".")[0],
        label=LABEL,
        dense=transforms.dense_names,
        sparse=transforms.sparse_features,
        splits={name: SplitInfo(path=name, rows=part.num_rows) for name, part in parts.items()},
        task=options.task,
        label_range=[float(train_y.min()), float(train_y.max())] if options.task == "regression" else None,
        extra={
            "transforms": TRANSFORMS_FILE,
            "source": str(path.resolve()),
            "label_source": options.label,
            "rows_read": read_rows,
            "rows_dropped_null_label": read_rows - table.num_rows,
        },
    )
    schema = output.finish(schema)
    for line in summary(transforms, parts, read_rows, options):
        log(line)
    return schema


def summary(transforms: Transforms, parts: dict[str, pa.Table], read_rows: int, options: TabularOptions) -> list[str]:
    """Rows per split, label balance, and each feature's kind, ids, nulls and OOV rate."""
    rows = {name: part.num_rows for name, part in parts.items()}
    kept = sum(rows.values())
    lines = [
        f"  rows: {read_rows:,} read, {read_rows - kept:,} dropped (null label); "
        + " | ".join(f"{k} {v:,}" for k, v in rows.items())
    ]
    means = " | ".join(f"{k} {pc.mean(p.column(LABEL)).as_py():.4f}" for k, p in parts.items())
    if options.task == "binary":
        lines.append(f"  positive rate (label '{options.label}' in {options.positive}): {means}")
    else:
        lines.append(f"  label '{options.label}' mean: {means}")
    train, test = parts["train"], parts["test"]

    def share(table: pa.Table, name: str, value: int) -> float:
        return float((table.column(name).to_numpy() == value).mean())

    width = max([len(f.name) for f in [*transforms.categorical, *transforms.numeric, *transforms.crosses]] + [8])
    lines.append("  features:")
    for f in transforms.categorical:
        renamed = f" (column '{f.source}')" if f.name != f.source else ""
        oov = share(test, f.name, OOV_ID)
        warn = "  <- mostly unseen values: an id column? (--drop it)" if oov > 0.5 else ""
        lines.append(
            f"    {f.name:<{width}}  categorical  {len(f.vocabulary):,} values + OOV + null = "
            f"{f.num_embeddings:,} ids; "
            f"train null {share(train, f.name, NULL_ID):.1%}, test OOV {oov:.1%}{renamed}{warn}"
        )
    for f in transforms.crosses:
        lines.append(
            f"    {f.name:<{width}}  cross        {len(f.vocabulary):,} combinations + OOV = {f.num_embeddings:,} ids; "
            f"test OOV {share(test, f.name, OOV_ID):.1%}"
        )
    for f in transforms.numeric:
        how = ("log1p (--log), " if f.source in options.log else f"log1p (auto: skew {f.skew:.1f}), ") if f.log else ""
        extra = f", missing indicator '{f.missing}'" if f.missing else ""
        renamed = f" (column '{f.source}')" if f.name != f.source else ""
        lines.append(f"    {f.name:<{width}}  numeric      {how}mean {f.mean:.4g} std {f.std:.4g}{extra}{renamed}")
    for name, why in transforms.dropped.items():
        lines.append(f"    {name:<{width}}  dropped      {why}")
    lines.append(
        f"  {len(transforms.dense_names)} dense columns, {len(transforms.sparse_features)} sparse features; "
        f"fitted transforms in {TRANSFORMS_FILE} (apply_transforms for new rows)"
    )
    return lines


# ---- CLI ---------------------------------------------------------------------------------------


def _names(values: list[str] | None) -> list[str]:
    """Flatten repeated / comma-separated column lists."""
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys prepare tabular",
        description=__doc__.split("\n\n")[0],
        epilog="Ids: 0 = missing, 1 = out of vocabulary, 2.. = values by train frequency. "
        "See data_pipeline/prepare/tabular.py.",
    )
    parser.add_argument("--input", required=True, help="CSV (.csv, .csv.gz, .tsv) or Parquet (.parquet) file")
    parser.add_argument("--label", required=True, help="label column")
    parser.add_argument(
        "--positive",
        action="append",
        metavar="VALUE[,VALUE]",
        help="label value(s) meaning 1 (binary); repeatable; default: a 0/1 or true/false label as is",
    )
    parser.add_argument("--task", choices=("binary", "regression"), default="binary")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--categorical", action="append", metavar="COL[,COL]", help="force columns categorical")
    parser.add_argument("--numeric", action="append", metavar="COL[,COL]", help="force columns numeric")
    parser.add_argument("--drop", action="append", metavar="COL[,COL]", help="leave columns out")
    parser.add_argument(
        "--log", action="append", metavar="COL[,COL]", help="log1p(max(x, 0)) before standardising (implies --numeric)"
    )
    parser.add_argument(
        "--cross", action="append", metavar="A,B[,C]", help="crossed categorical feature A_x_B; repeatable"
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=TabularOptions.min_frequency,
        help="train count a value needs for its own id (default %(default)s); rarer values share the OOV id",
    )
    parser.add_argument(
        "--max-int-levels",
        type=int,
        default=TabularOptions.max_int_levels,
        help="an integer column with at most this many distinct values is categorical (default %(default)s)",
    )
    parser.add_argument(
        "--auto-log-skew",
        type=float,
        default=TabularOptions.auto_log_skew,
        help="log-transform non-negative numeric columns with train skewness above this (default %(default)s; 0: off)",
    )
    parser.add_argument("--max-vocab", type=int, default=0, help="cap on each vocabulary (default 0: none)")
    parser.add_argument("--split", default="80,10,10", help="train,valid,test shares (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and the train row order")
    parser.add_argument("--row-group-rows", type=int, default=TabularOptions.row_group_rows)
    parser.add_argument(
        "--null-values",
        default=None,
        help=f"comma-separated strings read as missing after strip (default: {','.join(NULL_VALUES)}; blank always is)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset at --out")
    args = parser.parse_args(argv)

    try:
        split = [float(s) for s in args.split.split(",")]
    except ValueError:
        split = []
    if len(split) != 3 or min(split) <= 0:
        parser.error(f"--split takes three positive shares, e.g. 80,10,10 (got '{args.split}')")
    if args.min_frequency < 1 or args.max_int_levels < 0 or args.row_group_rows < 1 or args.max_vocab < 0:
        parser.error("--min-frequency and --row-group-rows must be >= 1; --max-int-levels and --max-vocab >= 0")
    null_values = NULL_VALUES if args.null_values is None else ["", *(v.strip() for v in args.null_values.split(","))]
    options = TabularOptions(
        label=args.label.strip(),
        positive=[v.strip() for p in args.positive for v in p.split(",") if v.strip()] if args.positive else None,
        task=args.task,
        categorical=_names(args.categorical),
        numeric=_names(args.numeric),
        drop=_names(args.drop),
        log=_names(args.log),
        cross=[_names([c]) for c in args.cross or []],
        min_frequency=args.min_frequency,
        max_int_levels=args.max_int_levels,
        auto_log_skew=args.auto_log_skew,
        max_vocab=args.max_vocab,
        split=[s / sum(split) for s in split],
        seed=args.seed,
        row_group_rows=args.row_group_rows,
        null_values=list(dict.fromkeys(null_values)),
    )
    print(f"tabular dataset {args.input} -> {args.out}")
    try:
        prepare(args.input, args.out, options, overwrite=args.overwrite)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
