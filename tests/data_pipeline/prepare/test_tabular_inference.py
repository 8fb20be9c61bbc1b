"""`recsys prepare tabular`'s column inference on Avazu-shaped data written here: the row id is
dropped (and kept when named), integer codes become categorical, integer quantities stay numeric,
and the inferred schema is printed and saved."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare.tabular_schema import BOTH, CATEGORICAL, DROPPED, NUMERIC
from data_pipeline.prepare.tabular_transforms import load_transforms
from data_pipeline.schema import DatasetSchema
from tests.helpers.runs import ROOT

ROWS = 4000


def _codes(rng, world, n: int, levels: int, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-distributed draws among `levels` distinct integers in [low, high): (values, ranks)."""
    values = world.choice(np.unique(world.integers(low, high, levels * 3)), levels, replace=False)
    p = 1 / np.arange(1, levels + 1) ** 1.1
    rank = rng.choice(levels, n, p=p / p.sum())
    return values[rank], rank


def avazu_table(n: int = ROWS, seed: int = 0, string_id: bool = True) -> pa.Table:
    """Avazu's columns: a unique row id (19-digit decimal strings, beyond int64 like Avazu's, or
    int64), hour as YYMMDDHH, C1, banner_pos, hex site ids, anonymised integer codes C14-C21 with
    tens to hundreds of levels (C20 mostly -1), plus an age-like integer quantity, a 0..4 count, a
    continuous price, and a click that depends on the codes."""
    world, rng = np.random.default_rng(7), np.random.default_rng(seed)
    logit = np.full(n, -1.5)
    ids = rng.permutation(n).astype(np.int64) * 1_000_003 + 10**12
    columns = {
        "id": pa.array([f"1{v:019d}" for v in ids]) if string_id else pa.array(ids),
        "hour": pa.array(14102100 + 100 * rng.integers(0, 3, n) + rng.integers(0, 24, n)),
        "C1": pa.array(rng.choice([1001, 1002, 1005, 1007, 1008, 1010, 1012], n)),
        "banner_pos": pa.array(rng.choice([0, 1, 2, 3, 4, 5, 7], n, p=[0.7, 0.25, 0.01, 0.01, 0.01, 0.01, 0.01])),
    }
    site, rank = _codes(rng, world, n, 200, 0, 2**32)
    columns["site_id"] = pa.array([f"{v:08x}" for v in site])
    logit += world.normal(0, 0.5, 200)[rank]
    for name, levels, low, high in [("C14", 300, 375, 24052), ("C17", 120, 112, 2758), ("C19", 40, 33, 1960)]:
        values, rank = _codes(rng, world, n, levels, low, high)
        columns[name] = pa.array(values)
        logit += world.normal(0, 0.8, levels)[rank]
    columns["C15"] = pa.array(rng.choice([320, 300, 216, 728, 120, 1024], n))
    c20, rank = _codes(rng, world, n, 120, 100000, 100249)
    columns["C20"] = pa.array(np.where(rng.random(n) < 0.47, -1, c20))
    columns["C21"] = pa.array(_codes(rng, world, n, 35, 1, 220)[0])
    age = rng.integers(18, 81, n)
    columns["age"] = pa.array(age)
    columns["children"] = pa.array(rng.integers(0, 5, n))
    columns["price"] = pa.array(np.exp(rng.normal(3, 1, n)))  # continuous: unique values, not an id
    logit += 0.02 * (age - 45)
    columns["click"] = pa.array((rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64))
    return pa.table(columns)


@pytest.fixture(scope="module")
def avazu(tmp_path_factory):
    root = tmp_path_factory.mktemp("avazu")
    pacsv.write_csv(avazu_table(), root / "avazu.csv")
    pq.write_table(avazu_table(string_id=False), root / "avazu.parquet")
    return root


def prepare(input_path, out, *extra: str) -> int:
    return prepare_main("tabular", ["--input", str(input_path), "--label", "click", "--out", str(out), *extra])


def test_ids_dropped_codes_categorical_quantities_numeric(avazu, capsys):
    out = avazu / "out"
    assert prepare(avazu / "avazu.csv", out) == 0
    printed = capsys.readouterr().out
    schema, transforms = DatasetSchema.load(out), load_transforms(out)
    train_rows = schema.splits["train"].rows
    # the id (19-digit strings, read as float64: beyond int64) is dropped, with the count that says why
    assert transforms.dropped["id"].startswith(f"{train_rows:,} distinct of {train_rows:,} rows")
    assert "id" not in schema.dense and "id" not in schema.sparse_names
    # codes with hundreds of levels and spread-out values are sparse features (plus a numeric copy)
    for code in ("C14", "C17", "C20", "hour"):
        assert code in schema.sparse_names, code
        feature = next(f for f in schema.sparse if f.name == code)
        assert feature.num_embeddings > 20, code
    for code in ("C15", "C19", "C21", "site_id", "banner_pos", "C1"):  # few levels, or strings
        assert code in schema.sparse_names, code
    assert "C14_value" in schema.dense and "C15_value" not in schema.dense  # C15: 6 spread-out widths
    # quantities: age (63 contiguous levels) numeric only; a 0..4 count both; a continuous price numeric
    assert "age" in schema.dense and "age" not in schema.sparse_names
    assert "children" in schema.sparse_names and "children_value" in schema.dense
    assert "price" in schema.dense
    # the ids of a code are its train vocabulary: the raw values map to 2.. by frequency
    c14 = next(f for f in transforms.categorical if f.name == "C14")
    train = pq.read_table(out / "train")
    assert train["C14"].to_numpy().max() < c14.num_embeddings and len(c14.vocabulary) > 50

    # the inferred schema: printed as a table, saved as JSON (named in dataset.json)
    assert schema.extra["inferred_schema"] == "inferred_schema.json"
    saved = json.loads((out / "inferred_schema.json").read_text())
    kinds = {c["column"]: c["kind"] for c in saved["columns"]}
    assert kinds["id"] == DROPPED and kinds["age"] == NUMERIC and kinds["site_id"] == CATEGORICAL
    assert kinds["C14"] == BOTH and kinds["C15"] == CATEGORICAL and kinds["price"] == NUMERIC
    c14_row = next(c for c in saved["columns"] if c["column"] == "C14")
    assert c14_row["features"] == ["C14", "C14_value"] and "a code" in c14_row["why"]
    assert c14_row["rows"] == train_rows and 100 < c14_row["distinct"] <= 300
    assert "id" in saved["rules"] and "integer" in saved["rules"]
    header = next(line for line in printed.splitlines() if line.strip().startswith("column"))
    id_line = next(line for line in printed.splitlines() if line.strip().startswith("id "))
    assert "dropped" in id_line and "an id" in id_line
    assert id_line.index("dropped") == header.index("kind")  # aligned columns


def test_named_id_is_kept_and_kinds_can_be_overridden(avazu):
    out = avazu / "keep"
    argv = ["--numeric", "id", "--categorical", "C14", "--both", "age", "--numeric", "C17"]
    assert prepare(avazu / "avazu.parquet", out, *argv) == 0
    schema, transforms = DatasetSchema.load(out), load_transforms(out)
    assert "id" in schema.dense and "id" not in transforms.dropped  # int64 ids this time, kept by --numeric
    assert "C14" in schema.sparse_names and "C14_value" not in schema.dense  # categorical only
    assert "age" in schema.sparse_names and "age_value" in schema.dense
    assert "C17" in schema.dense and "C17" not in schema.sparse_names
    why = {c["column"]: c["why"] for c in json.loads((out / "inferred_schema.json").read_text())["columns"]}
    assert why["id"] == "--numeric" and why["C14"] == "--categorical" and why["age"] == "--both"
    # without the flag the int64 id is dropped too
    assert prepare(avazu / "avazu.parquet", avazu / "default") == 0
    assert "id" in load_transforms(avazu / "default").dropped


def test_small_tables_and_fractional_floats_are_not_ids(tmp_path):
    rng = np.random.default_rng(0)
    few = pa.table({"key": [f"k{i}" for i in range(60)], "x": rng.normal(size=60), "y": [0, 1] * 30})
    pacsv.write_csv(few, tmp_path / "few.csv")
    assert (
        prepare_main("tabular", ["--input", str(tmp_path / "few.csv"), "--label", "y", "--out", str(tmp_path / "o")])
        == 0
    )
    transforms = load_transforms(tmp_path / "o")
    assert "key" in [f.source for f in transforms.categorical]  # 48 train rows: too few to call anything an id
    assert "x" in [f.source for f in transforms.numeric]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--both", "colour"], "column 'colour' named in --both not found"),
        (["--both", "age", "--numeric", "age"], "named in --numeric/--log and in --both"),
        (["--both", "click"], "column 'click' named in --both is the label"),
    ],
)
def test_bad_flags_are_one_error_line(avazu, tmp_path, extra, message):
    command = [str(ROOT / ".venv" / "bin" / "recsys"), "prepare", "tabular", "--input", str(avazu / "avazu.csv")]
    command += ["--label", "click", "--out", str(tmp_path / "out"), *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_int64_ids_past_two_to_the_53_are_dropped_not_a_crash(tmp_path):
    """Avazu's ids are 19-digit integers: an Arrow cast to float64 refuses them."""
    table = avazu_table()
    table = table.set_column(0, "id", pa.array(np.arange(table.num_rows, dtype=np.int64) + 2**61))
    pq.write_table(table, tmp_path / "big_ids.parquet")
    assert prepare(tmp_path / "big_ids.parquet", tmp_path / "out") == 0
    assert "id" in load_transforms(tmp_path / "out").dropped
