"""How `recsys prepare tabular` decides what each input column becomes, and the table that shows it.

The rules, applied to the train split in this order (n = train rows, k = distinct non-null values):

  1. the options first: --drop, --categorical, --numeric (and --log), --both (categorical plus a
     numeric copy) take the column as named, whatever the rules below would say;
  2. dropped: all values missing; a type that is neither string, boolean nor number; constant;
  3. dropped as an id: n >= ID_MIN_ROWS and k >= ID_SHARE x n (0.95: unique or nearly unique per
     row) for a string column, an integer column, or a float column that holds whole numbers only
     (an id too large for int64 is read as a float, e.g. Avazu's 19-digit ids). A float column with
     fractions (a price, a measurement) is never taken for an id: its values are unique because
     they are continuous;
  4. whole numbers (integer columns, and float columns that hold whole numbers only, as pandas
     writes an integer column with nulls) are codes or quantities:
       - k <= 2: categorical (a flag);
       - contiguous values (max - min + 1 <= CONTIGUOUS x k: the values fill at least half of their
         range, as counts, ages, scales and years do):
           k <= --max-int-levels (50): categorical plus a numeric copy `<name>_value` (a small count
           or scale: the Wide part sees each level, the Deep part the order), else numeric;
       - spread-out values (gaps between them, as ids and codes have: C14=15704, banner widths):
           k <= --max-int-levels: categorical;
           levels that repeat (>= REPEATED_SHARE = 50% of the "rows on repeated values": of the
           rows outside the commonest value, those whose value is seen >= --min-frequency times on
           train): categorical plus the numeric copy (codes such as Avazu's C14-C21 with hundreds
           of levels; a repeated quantity such as a rounded price keeps its order in the copy);
           else numeric (mostly unique values: a quantity, e.g. a capital gain);
  5. other floats and decimals: numeric; strings and booleans: categorical.

Every decision comes with its reason, printed as an aligned table and saved in
`inferred_schema.json` (named in dataset.json's extra), so a user sees the choices and can override
any of them with the flags of rule 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.prepare.output import MISSING_ID, RARE_ID

if TYPE_CHECKING:
    from data_pipeline.prepare.tabular import TabularOptions

ID_SHARE = 0.95
ID_MIN_ROWS = 100
CONTIGUOUS = 2
REPEATED_SHARE = 0.5
SCHEMA_FILE = "inferred_schema.json"
RULES = {
    "id": f"string, integer or whole-number column with >= {ID_SHARE:.0%} distinct values "
    f"(of >= {ID_MIN_ROWS} rows): dropped",
    "integer": "<= 2 levels: categorical; levels filling >= half their range: categorical + numeric copy up to "
    "--max-int-levels levels, else numeric; spread-out levels: categorical up to --max-int-levels, categorical + "
    f"numeric copy when >= {REPEATED_SHARE:.0%} of the rows off the commonest value repeat >= --min-frequency "
    "times, else numeric",
    "other": "fractional floats: numeric; strings, booleans: categorical",
}

CATEGORICAL, NUMERIC, BOTH, DROPPED = "categorical", "numeric", "categorical+numeric", "dropped"


@dataclass
class Choice:
    """What one input column becomes, and why."""

    column: str
    type: str
    kind: str
    """categorical, numeric, categorical+numeric or dropped."""
    why: str
    distinct: int | None = None
    rows: int | None = None


def _base_type(column) -> pa.DataType:
    return column.type.value_type if pa.types.is_dictionary(column.type) else column.type


def _whole_numbers(column, t: pa.DataType) -> np.ndarray | None:
    """The non-null values as float64 if the column holds whole numbers only (integers, or floats
    without fractions), else None."""
    if pa.types.is_integer(t):
        # numpy, not an Arrow cast: Arrow refuses integers past 2^53 (19-digit ids), numpy rounds them
        return column.drop_null().to_numpy().astype(np.float64)
    if pa.types.is_floating(t):
        x = pc.cast(column, pa.float64()).drop_null().to_numpy()
        x = x[np.isfinite(x)]
        if len(x) and np.all(x == np.round(x)):
            return x
    return None


def _spread(x: np.ndarray) -> str:
    return f"{_number(x.min())}..{_number(x.max())}"


def _number(v: float) -> str:
    return f"{int(v)}" if abs(v) < 1e15 else f"{v:.4g}"


def _integer_kind(x: np.ndarray, k: int, options: TabularOptions) -> tuple[str, str]:
    """(kind, why) of a whole-number column with `k` distinct values `x` (rule 4)."""
    if k <= 2:
        return CATEGORICAL, f"{k} values: a flag"
    span = float(x.max()) - float(x.min()) + 1
    where = _spread(x)
    if span <= CONTIGUOUS * k:
        if k <= options.max_int_levels:
            return BOTH, f"{k} levels filling {where} (<= --max-int-levels {options.max_int_levels}): a count or scale"
        return NUMERIC, f"{k:,} levels filling {where}: a quantity"
    if k <= options.max_int_levels:
        return CATEGORICAL, f"{k} levels spread over {where} (<= --max-int-levels {options.max_int_levels}): a code"
    values, counts = np.unique(x, return_counts=True)
    rest = counts.sum() - counts.max()
    repeated = (counts[counts >= options.min_frequency].sum() - counts.max()) / rest if rest else 1.0
    share = f"{k:,} levels spread over {where}, {repeated:.0%} of rows on repeated values"
    if repeated >= REPEATED_SHARE:
        return BOTH, f"{share}: a code"
    return NUMERIC, f"{share} (< {REPEATED_SHARE:.0%}): a quantity"


def infer_kinds(train: pa.Table, options: TabularOptions) -> dict[str, Choice]:
    """{column: Choice} in table order for every column but the label (see the module docstring)."""
    choices = {}
    for name in train.column_names:
        if name == options.label:
            continue
        column = train.column(name)
        t = _base_type(column)
        choice = Choice(name, str(t), DROPPED, "")
        choices[name] = choice
        if name in options.drop:
            choice.why = "--drop"
            continue
        for flag, names, kind in (
            ("--categorical", options.categorical, CATEGORICAL),
            ("--numeric", options.numeric, NUMERIC),
            ("--log", options.log, NUMERIC),
            ("--both", options.both, BOTH),
        ):
            if name in names:
                choice.kind, choice.why = kind, flag
                break
        if choice.why:
            continue
        n = len(column)
        choice.rows = n
        if column.null_count == n:
            choice.why = "all values missing"
            continue
        is_string = pa.types.is_string(t) or pa.types.is_large_string(t)
        is_number = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        if not (is_string or is_number or pa.types.is_boolean(t)):
            choice.why = f"type {t}: name it in --categorical or --numeric to use it"
            continue
        k = pc.count_distinct(column).as_py()
        choice.distinct = k
        if column.null_count == 0 and k == 1:
            choice.why = "constant"
            continue
        whole = _whole_numbers(column, t) if is_number else None
        if (is_string or whole is not None) and n >= ID_MIN_ROWS and k >= ID_SHARE * n:
            choice.why = (
                f"{k:,} distinct of {n:,} rows (>= {ID_SHARE:.0%}): an id; "
                "name it in --categorical or --numeric to keep it"
            )
        elif whole is not None:
            choice.kind, choice.why = _integer_kind(whole, k, options)
        elif is_number:
            choice.kind, choice.why = NUMERIC, "fractional numbers"
        else:
            choice.kind, choice.why = CATEGORICAL, f"{k:,} {'strings' if is_string else 'booleans'}"
    return choices


def schema_rows(transforms, choices: dict[str, Choice], parts: dict[str, pa.Table], options) -> list[dict]:
    """The inferred schema: per input column its kind, the features made from it, their fitted
    statistics (with the train null and test OOV rates of the ids) and why: what
    `inferred_schema.json` holds and `schema_table` prints."""
    train, test = parts["train"], parts["test"]

    def share(table: pa.Table, name: str, value: int) -> float:
        return float((table.column(name).to_numpy() == value).mean())

    rows = []
    for source, choice in choices.items():
        features, details = [], []
        for f in transforms.categorical:
            if f.source == source:
                oov = share(test, f.name, RARE_ID)
                warn = " <- mostly unseen values: an id column? (--drop it)" if oov > 0.5 else ""
                features.append(f.name)
                details.append(
                    f"{len(f.vocabulary):,} values + OOV + null = {f.num_embeddings:,} ids, "
                    f"train null {share(train, f.name, MISSING_ID):.1%}, test OOV {oov:.1%}{warn}"
                )
        for f in transforms.numeric:
            if f.source == source:
                features.append(f.name)
                how = ""
                if f.log:
                    how = "log1p (--log), " if f.source in options.log else f"log1p (auto: skew {f.skew:.1f}), "
                details.append(f"{how}mean {f.mean:.4g} std {f.std:.4g}")
                if f.missing:
                    features.append(f.missing)
        rows.append({**asdict(choice), "features": features, "transform": "; ".join(details)})
    for f in transforms.crosses:
        rows.append(
            {
                "column": " x ".join(f.sources),
                "type": "cross",
                "kind": "cross",
                "why": "--cross",
                "distinct": None,
                "rows": None,
                "features": [f.name],
                "transform": f"{len(f.vocabulary):,} combinations + OOV = {f.num_embeddings:,} ids, "
                f"test OOV {share(test, f.name, RARE_ID):.1%}",
            }
        )
    return rows


def schema_table(rows: list[dict]) -> list[str]:
    """The inferred schema as aligned text lines: column, kind, features, transform, why."""
    header = ["column", "kind", "features", "transform", "why"]
    cells = [[r["column"], r["kind"], ", ".join(r["features"]) or "-", r["transform"] or "-", r["why"]] for r in rows]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header) - 1)]
    return [
        "    " + "  ".join(f"{str(c):<{w}}" for c, w in zip(line[:-1], widths)) + "  " + line[-1]
        for line in [header, *cells]
    ]
