"""The data contract: `dataset.json` next to Parquet files, and the checks that hold data to it.

Every check that can be made from Parquet metadata alone (files exist, columns exist, column types)
runs before training starts, on every rank, so a bad dataset fails fast with one clear message
instead of a hang or a traceback from inside torch. Checks that need the values (id ranges, nulls
inside lists, labels outside [0, 1]) run on each row group as it is read (`check_row_group`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.atomic import write_text_atomic
from data_pipeline.storage import StorageError, location, parquet_file

SCHEMA_FILE = "dataset.json"
FORMAT_VERSION = 1
TASKS = ("binary", "regression")
SPLITS = ("train", "valid", "test")
"""The splits of a dataset, in the order their rows come in time: train, then valid, then test."""


class DataError(ValueError):
    """Bad input data. The message names the file, column and row group where it can."""


@dataclass(frozen=True)
class SparseFeature:
    name: str
    """Column name; also the KeyedJaggedTensor key and the embedding table's feature name."""
    num_embeddings: int
    """Id space size: ids must lie in [0, num_embeddings)."""
    multi_hot: bool = False
    """True for a `list<int64>` column (several ids per row), False for one id per row."""


@dataclass
class SplitInfo:
    path: str
    """Directory (relative to the dataset root) holding this split's `*.parquet` files, directly or
    in Hive-style partition folders (`dt=2024-01-01/part-0.parquet`; the partition values are not
    columns)."""
    rows: int | None = None
    oracle_auc: float | None = None
    """AUC of the true click probabilities (synthetic data only): the best any model can do."""


@dataclass
class DatasetSchema:
    root: Path
    label: str
    dense: list[str]
    sparse: list[SparseFeature]
    splits: dict[str, SplitInfo]
    weight: str | None = None
    """Optional per-row weight column (float); rows of weight 0 do not count in loss or metrics."""
    task: str = "binary"
    """"binary" (labels 0/1; BCE, AUC) or "regression" (numeric labels; MSE, RMSE)."""
    label_range: list[float] | None = None
    """[min, max] of the label for regression (e.g. [1, 5] stars): predictions are clipped to it."""
    name: str = "dataset"
    extra: dict = field(default_factory=dict)
    """Free-form provenance (generator settings, preprocessing options)."""

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def columns(self) -> list[str]:
        cols = [self.label, *self.dense, *self.sparse_names]
        return cols + ([self.weight] if self.weight else [])

    def split_files(self, split: str) -> list[Path]:
        """The split's Parquet files, sorted; raises DataError if the split or its files are missing."""
        if split not in self.splits:
            raise DataError(f"{self.root / SCHEMA_FILE}: no split '{split}' (splits: {sorted(self.splits)})")
        split_dir = self.root / self.splits[split].path
        files = sorted(split_dir.rglob("*.parquet"), key=lambda f: relative(f, split_dir))
        # Spark's and Hive's bookkeeping (_temporary/, .hive-staging/, _SUCCESS) is not data
        files = [f for f in files if not any(part[0] in "._" for part in relative(f, split_dir).split("/"))]
        if not files:
            raise DataError(f"split '{split}': no *.parquet files in {split_dir}")
        return files

    # ---- dataset.json I/O -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "label": self.label,
            "weight": self.weight,
            "task": self.task,
            "label_range": self.label_range,
            "dense": list(self.dense),
            "sparse": [asdict(f) for f in self.sparse],
            "splits": {k: asdict(v) for k, v in self.splits.items()},
            "extra": self.extra,
        }

    def save(self) -> None:
        """Write `dataset.json` atomically (a reader never sees half a file)."""
        write_text_atomic(self.root / SCHEMA_FILE, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, root: str | Path) -> DatasetSchema:
        """The dataset at `root`: its dataset.json, checked."""
        try:
            root = location(root)
            if not root.is_dir():
                raise DataError(f"dataset directory {root} does not exist")
        except StorageError as e:
            raise DataError(str(e)) from None
        except OSError as e:  # an object store that refuses: credentials, a missing bucket
            raise DataError(f"dataset directory {root} cannot be read ({type(e).__name__}: {e})") from None
        path = root / SCHEMA_FILE
        if not path.is_file():
            raise DataError(f"{path} not found: a dataset is a directory of Parquet files plus {SCHEMA_FILE}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed ({type(e).__name__}: {e})") from None
        return cls.from_json(raw, root, where=str(path))

    @classmethod
    def from_json(cls, raw: dict, root: str | Path, where: str | None = None) -> DatasetSchema:
        """A schema from dataset.json's contents (also as stored in checkpoints and model files),
        checked; `where` names the source in errors."""
        root = location(root)
        where = where or str(root / SCHEMA_FILE)
        try:
            schema = cls(
                root=root,
                label=raw["label"],
                dense=list(raw["dense"]),
                sparse=[SparseFeature(**f) for f in raw["sparse"]],
                splits={k: SplitInfo(**v) for k, v in raw.get("splits", {}).items()},
                weight=raw.get("weight"),
                task=raw.get("task", "binary"),
                label_range=raw.get("label_range"),
                name=raw.get("name", root.name),
                extra=raw.get("extra") or {},
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        _check_contract(schema, where)
        return schema


MAX_EMBEDDINGS = 2**63 - 1
"""Ids are int64: a table of num_embeddings >= 2^63 could not be indexed."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_contract(schema: DatasetSchema, where: str) -> None:
    """The rules of dataset.json that no Parquet file can break: one clear error each, before any
    process starts, for what would otherwise train on a lie (a label among its own features) or
    end in a traceback deep inside torchrec (a float table size, a name torchrec splits on ".")."""
    if schema.task not in TASKS:
        raise DataError(f"{where}: task '{schema.task}' is not one of {', '.join(TASKS)}")
    names = [schema.label, *schema.dense, *schema.sparse_names] + ([schema.weight] if schema.weight else [])
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise DataError(
                f"{where}: column name {name!r} is not usable: names are non-empty strings without '.' "
                "(they become table and module names, which torchrec splits on '.')"
            )
    roles = {}
    for role, columns in (
        ("the label", [schema.label]),
        ("the weight", [schema.weight] if schema.weight else []),
        ("a dense feature", schema.dense),
        ("a sparse feature", schema.sparse_names),
    ):
        for column in columns:
            if column in roles:
                hint = " (the model would be shown the answer)" if "the label" in (roles[column], role) else ""
                again = f"twice as {role}" if roles[column] == role else f"as {roles[column]} and as {role}"
                raise DataError(f"{where}: column '{column}' is listed {again}{hint}")
            roles[column] = role
    if not schema.sparse:
        raise DataError(f"{where}: lists no sparse feature: the models need at least one")
    for f in schema.sparse:
        n = f.num_embeddings
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_EMBEDDINGS:
            raise DataError(
                f"{where}: sparse feature '{f.name}' has num_embeddings {n!r}; expected an integer in [1, 2^63)"
            )
        if not isinstance(f.multi_hot, bool):
            raise DataError(f"{where}: sparse feature '{f.name}' has multi_hot {f.multi_hot!r}; expected true or false")
    if schema.label_range is not None:
        bounds = schema.label_range
        if schema.task != "regression":
            raise DataError(f"{where}: label_range is for regression; task is '{schema.task}'")
        if (
            not (isinstance(bounds, list) and len(bounds) == 2 and all(map(_is_number, bounds)))
            or bounds[0] > bounds[1]
        ):
            raise DataError(f"{where}: label_range {bounds!r} is not [min, max] with min <= max")
    for split, info in schema.splits.items():
        path = PurePosixPath(info.path) if isinstance(info.path, str) else None
        if path is None or path.is_absolute() or ".." in path.parts:
            raise DataError(
                f"{where}: split '{split}' has path {info.path!r}; a split is a folder inside the dataset "
                "(relative, without '..'), so that a dataset is one directory"
            )
        if info.rows is not None and (not isinstance(info.rows, int) or isinstance(info.rows, bool) or info.rows < 0):
            raise DataError(f"{where}: split '{split}' has rows {info.rows!r}; expected a count")


# ---- checks ------------------------------------------------------------------------------------


def _expected_kind(schema: DatasetSchema, column: str) -> str:
    if column == schema.label or column == schema.weight or column in schema.dense:
        return "number"
    feature = next(f for f in schema.sparse if f.name == column)
    return "list<integer>" if feature.multi_hot else "integer"


def _type_ok(kind: str, t: pa.DataType) -> bool:
    if kind == "number":
        return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)
    if kind == "integer":
        return pa.types.is_integer(t)
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def check_files(schema: DatasetSchema, split: str) -> list[Path]:
    """Check every file of a split from its Parquet footer: readable, columns present, types right,
    the same column types in every file, and the row count that `dataset.json` states."""
    files = schema.split_files(split)
    first: tuple[Path, pa.Schema] | None = None
    rows = 0
    for path in files:
        try:
            metadata = parquet_file(path).metadata
            arrow_schema = metadata.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file (truncated or corrupt? {e})") from None
        rows += metadata.num_rows
        for column in schema.columns():
            index = arrow_schema.get_field_index(column)
            if index < 0:
                raise DataError(
                    f"{path}: column '{column}' named in {SCHEMA_FILE} is missing "
                    f"(file has: {', '.join(arrow_schema.names)})"
                )
            kind = _expected_kind(schema, column)
            actual = arrow_schema.field(index).type
            if not _type_ok(kind, actual):
                raise DataError(f"{path}: column '{column}' has type {actual}, expected {kind}")
            if first is not None and first[1].field(column).type != actual:
                raise DataError(
                    f"{path}: column '{column}' has type {actual}, but {first[0].name} has "
                    f"{first[1].field(column).type} (all files of a dataset must share one schema)"
                )
        if first is None:
            first = (path, arrow_schema)
    if rows == 0:
        raise DataError(f"split '{split}' ({schema.root / schema.splits[split].path}) is empty: its files hold 0 rows")
    expected = schema.splits[split].rows
    if expected is not None and expected != rows:
        raise DataError(
            f"{schema.root / SCHEMA_FILE}: split '{split}' should hold {expected:,} rows but its "
            f"{len(files)} files hold {rows:,} (files added or removed after the dataset was made?)"
        )
    return files


def split_identity(schema: DatasetSchema, split: str) -> list[list[str]]:
    """[file name, footer digest] of each file of a split: what tells a resumed run that its data
    changed, without reading the data (a Parquet footer holds the row count and every row
    group's size and column statistics, so rewritten contents change it)."""
    out = []
    split_dir = schema.root / schema.splits[split].path
    for path in schema.split_files(split):
        with path.open("rb") as f:
            f.seek(-8, 2)
            length = int.from_bytes(f.read(4), "little")
            f.seek(-8 - length, 2)
            out.append([relative(path, split_dir), hashlib.sha256(f.read(length)).hexdigest()[:16]])
    return out


def relative(path: Path, folder: Path) -> str:
    """`path` below `folder` as a/b/c: the file's name in a flat split, its partition folders too."""
    return str(path)[len(str(folder)) :].strip("/")


def split_digest(schema: DatasetSchema, split: str) -> str:
    """One short digest of `split_identity`."""
    return hashlib.sha256(json.dumps(split_identity(schema, split)).encode()).hexdigest()[:16]


def _first_bad_row(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first true value of a boolean mask (nulls count as false)."""
    return int(pc.index(pc.fill_null(mask, False), True).as_py())


def check_row_group(schema: DatasetSchema, table: pa.Table, where: str) -> None:
    """Value checks on one row group; `where` names it ("file.parquet row group 3").

    Errors name the column and the first offending row (counted from the row group's start).
    """
    label = table.column(schema.label)
    if label.null_count:
        row = _first_bad_row(pc.is_null(label))
        raise DataError(f"{where}: column '{schema.label}' (label) has {label.null_count} nulls (first at row {row})")
    if schema.task == "binary":
        if pa.types.is_boolean(label.type):
            label = pc.cast(label, pa.int8())
        bad = pc.and_(pc.not_equal(label, 0), pc.not_equal(label, 1))
        if pc.any(bad).as_py():
            row = _first_bad_row(bad)
            raise DataError(
                f"{where}: column '{schema.label}' (label) must be 0 or 1 for a binary task, "
                f"row {row} holds {label[row].as_py()!r}"
            )
    for column in ([schema.label] if schema.task == "regression" else []) + list(schema.dense):
        values = table.column(column)
        if pa.types.is_floating(values.type):
            bad = pc.invert(pc.is_finite(values))
            if pc.any(bad).as_py():
                row = _first_bad_row(bad)
                raise DataError(
                    f"{where}: column '{column}' has a non-finite value ({values[row].as_py()}) at row {row}"
                )
    for f in schema.sparse:
        col = table.column(f.name)
        if f.multi_hot:
            col = pc.list_flatten(col)
            if col.null_count:
                raise DataError(f"{where}: column '{f.name}' has null ids inside lists")
        lo, hi = pc.min_max(col).values()
        if lo.as_py() is not None and (lo.as_py() < 0 or hi.as_py() >= f.num_embeddings):
            bad = pc.or_(pc.less(col, 0), pc.greater_equal(col, f.num_embeddings))
            first = _first_bad_row(bad)
            at = f", first at row {first}" if not f.multi_hot else f", first at list element {first}"
            raise DataError(
                f"{where}: column '{f.name}' has ids outside [0, {f.num_embeddings}): min {lo}, max {hi}{at}"
            )
