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

Column kinds (inferred on train by the rules of `tabular_schema`; --categorical / --numeric / --both /
--drop override; --log implies --numeric), printed as a table and saved in inferred_schema.json:
  dropped (with the reason): constant or all-null columns, other types, and ids: string, integer or
    whole-number columns with a distinct value in >= 95% of the rows (never a fractional float);
  categorical: strings, booleans, integer flags and codes (at most --max-int-levels levels spread
    out, like banner widths);
  categorical plus a numeric copy `<name>_value`: small contiguous integer scales (<= --max-int-levels
    levels filling their range: education-num, children) and codes with many repeated levels (Avazu's
    C14-C21, hours like 14102100);
  numeric: other integers (contiguous quantities like age, mostly unique ones like capital gain), floats.

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
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare.output import (
    DatasetOutput,
    input_identity,
    row_group_size,
    write_json,
    write_parquet,
)
from data_pipeline.prepare.tabular_schema import RULES, SCHEMA_FILE, infer_kinds, schema_rows, schema_table
from data_pipeline.prepare.tabular_transforms import (
    LABEL,
    NULL_VALUES,
    TRANSFORMS_FILE,
    VERSION,
    LabelSpec,
    Transforms,
    category_strings,
    check_options,
    clean_strings,
    column_values,
)
from data_pipeline.schema import SPLITS, DataError, DatasetSchema, SplitInfo

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
REGRESSION_BINS = 10


@dataclass
class TabularOptions:
    """Everything that decides the dataset's content (recorded as its provenance, with the input
    file's identity in place of its path)."""

    input: str
    """The CSV or Parquet file."""
    label: str
    positive: list[str] | None = None
    """Label values that mean 1 (binary); None: the label must already be 0/1 or true/false."""
    task: str = "binary"
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    both: list[str] = field(default_factory=list)
    """Columns made categorical and numeric (`<name>` ids plus `<name>_value`)."""
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


def _retype_strings(table: pa.Table, null_values) -> pa.Table:
    """CSV string columns -> int64 / float64 / bool when every non-null value (trimmed) is one."""
    for i, name in enumerate(table.column_names):
        column = table.column(i)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        column = clean_strings(column.cast(pa.string()), null_values)
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


# ---- labels and splits -------------------------------------------------------------------------


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


# ---- the preparer ------------------------------------------------------------------------------


def _resolve_label(table: pa.Table, options: TabularOptions, where: str) -> LabelSpec:
    """The label spec, with --positive checked against the data (or defaulted for a 0/1 label)."""
    column = table.column(options.label)
    if options.task == "regression":
        if options.positive:
            raise DataError("--positive is for --task binary, not regression")
        return LabelSpec(options.label, "regression")
    strings = category_strings(column, options.null_values).combine_chunks()
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


def prepare(options: TabularOptions, out: str | Path, overwrite: bool = False, log=print) -> DatasetSchema:
    """Read, split, fit on train, transform every split, write the dataset; see the module docstring."""
    path = Path(options.input)
    if not path.is_file():
        raise DataError(f"input {path} not found")
    if options.task not in ("binary", "regression"):
        raise DataError(f"--task must be binary or regression, not '{options.task}'")
    settings = {k: v for k, v in asdict(options).items() if k != "input"}
    provenance = {"tabular": settings, "inputs": input_identity([path]), "version": VERSION}
    output = DatasetOutput(out, provenance, overwrite=overwrite)
    existing = output.up_to_date()
    if existing is not None:
        rows = ", ".join(f"{k} {v.rows:,}" for k, v in existing.splits.items())
        log(f"{out}: up to date ({rows}); not redone")
        return existing

    where = str(path)
    log(f"tabular dataset {path} -> {out}")
    table = read_table(path, options.null_values)
    if table.num_rows == 0:
        raise DataError(f"{where}: the table is empty (no rows)")
    check_options(table, options, where)
    options = TabularOptions(**{**asdict(options), "positive": _resolve_label(table, options, where).positive})
    spec = LabelSpec(options.label, options.task, options.positive)
    labels = column_values(table, options.label, where, lambda col: spec.values(col, options.null_values))
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

    choices = infer_kinds(raw["train"], options)
    transforms = Transforms.fit(raw["train"], options, where, choices)
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
    inferred = schema_rows(transforms, choices, parts, options)
    write_json({"rules": RULES, "columns": inferred}, output.root / SCHEMA_FILE)
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
            "inferred_schema": SCHEMA_FILE,
            "source": str(path.resolve()),
            "label_source": options.label,
            "rows_read": read_rows,
            "rows_dropped_null_label": read_rows - table.num_rows,
        },
    )
    schema = output.finish(schema)
    for line in summary(transforms, inferred, parts, read_rows, options):
        log(line)
    return schema


def summary(
    transforms: Transforms, inferred: list[dict], parts: dict[str, pa.Table], read_rows: int, options: TabularOptions
) -> list[str]:
    """Rows per split, label balance, and the inferred schema: each column's kind, features, ids or
    statistics (nulls, OOV rate) and why."""
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
    lines.append(f"  inferred schema ({SCHEMA_FILE}; override with --categorical/--numeric/--both/--drop):")
    lines += schema_table(inferred)
    lines.append(
        f"  {len(transforms.dense_names)} dense columns, {len(transforms.sparse_features)} sparse features; "
        f"fitted transforms in {TRANSFORMS_FILE} (apply_transforms for new rows)"
    )
    return lines


# ---- CLI ---------------------------------------------------------------------------------------


def _names(values: list[str] | None) -> list[str]:
    """Flatten repeated / comma-separated column lists."""
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def parse(argv: list[str]) -> tuple[TabularOptions, str, bool]:
    """`recsys prepare tabular` flags -> (options, out, overwrite)."""
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
    parser.add_argument(
        "--both",
        action="append",
        metavar="COL[,COL]",
        help="make columns categorical (ids) and numeric (a copy named <name>_value)",
    )
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
        help="an integer column with at most this many distinct values is categorical, with a numeric copy "
        "when its values fill their range (default %(default)s)",
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
        input=args.input,
        label=args.label.strip(),
        positive=[v.strip() for p in args.positive for v in p.split(",") if v.strip()] if args.positive else None,
        task=args.task,
        categorical=_names(args.categorical),
        numeric=_names(args.numeric),
        both=_names(args.both),
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
    return options, args.out, args.overwrite


if __name__ == "__main__":
    sys.exit(prepare_main("tabular", sys.argv[1:]))
