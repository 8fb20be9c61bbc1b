"""`recsys prepare tabular` on census-like CSV and Parquet files written here: kinds, vocabularies,
standardisation, crosses, stratified splits, the saved transforms, and the dataset contract."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare.output import FIRST_ID, MISSING_ID, RARE_ID
from data_pipeline.prepare.tabular import assign_splits, read_table
from data_pipeline.prepare.tabular_transforms import apply_transforms, load_transforms
from data_pipeline.reader import ParquetBatches, list_row_groups
from data_pipeline.schema import DatasetSchema, check_files, check_row_group

ROWS = 6000
SEED = 0
TEST_ONLY = "Astronaut"  # an occupation written into test rows only: must map to OOV
OCCUPATIONS = [
    *"Prof-specialty Exec-managerial Craft-repair Sales Adm-clerical Other-service Machine-op Transport".split(),
    *"Handlers Farming Tech-support Protective Priv-house Armed".split(),
]
WORKCLASS = [" Private", " Self-emp", " Local-gov", " State-gov", " Federal-gov", " Without-pay"]


def census_table(n: int = ROWS, seed: int = SEED, test_only: bool = True) -> pa.Table:
    """Adult-census-like rows: string categoricals (padded like the UCI file, one with a rare tail),
    a few-level integer, skewed and plain numerics with nulls, a boolean, a constant column, an
    id-like integer, and an income label that depends on an occupation x education interaction."""
    rng = np.random.default_rng(seed)
    age = rng.integers(17, 91, n)
    workclass = np.array(WORKCLASS, object)[rng.choice(len(WORKCLASS), n, p=[0.6, 0.15, 0.1, 0.08, 0.05, 0.02])]
    workclass[rng.random(n) < 0.05] = None
    occ_index = rng.choice(len(OCCUPATIONS), n, p=np.r_[np.full(6, 0.12), np.full(8, 0.28 / 8)])
    occupation = np.array(OCCUPATIONS, object)[occ_index]
    rare = rng.random(n) < 0.03  # a long tail of values seen 1-3 times
    occupation[rare] = [f"Rare-{k}" for k in rng.integers(0, 400, rare.sum())]
    occupation[rng.random(n) < 0.02] = None
    education = rng.integers(1, 17, n)
    married = rng.random(n) < 0.45
    gain = np.where(rng.random(n) < 0.1, rng.lognormal(8, 1.2, n), 0.0).round(2)
    hours = np.clip(rng.normal(40, 12, n), 1, 99).round(1)
    logit = (
        -2.2
        + 1.3 * married
        + 0.03 * (age - 40)
        + 1.2 * (gain > 0)
        + 0.03 * (hours - 40)
        + 2.5 * (np.isin(occ_index, [0, 1]) & (education >= 13) & ~rare)
        - 0.8 * (education < 9)
    )
    positive = rng.random(n) < 1 / (1 + np.exp(-logit))
    income = np.where(positive, " >50K", " <=50K").astype(object)
    income[rng.random(n) < 0.01] = None
    wage = (20 + 15 * married + 0.3 * age + rng.normal(0, 5, n)).round(2)  # a regression target
    if test_only:  # overwrite the occupation of 20 rows that the default split sends to test
        labelled = np.flatnonzero(income != None)  # noqa: E711 (elementwise)
        split = assign_splits((income[labelled] == " >50K").astype(np.int8), [0.8, 0.1, 0.1], SEED)
        occupation[labelled[split == 2][:20]] = TEST_ONLY
    null = lambda values, p: pa.array(values, mask=rng.random(n) < p)  # noqa: E731
    return pa.table(
        {
            "age": pa.array(age),
            "workclass": pa.array(workclass, pa.string()),
            "fnlwgt": pa.array(rng.permutation(n) + 10_000),  # unique: tells rows apart after the split
            "education num": pa.array(education),  # a name that needs sanitising
            "occupation": pa.array(occupation, pa.string()),
            "married": pa.array(married),
            "capital_gain": null(gain, 0.03),
            "hours_per_week": null(hours, 0.02),
            "country": pa.array(["United-States"] * n),
            "wage": pa.array(wage),
            "income": pa.array(income, pa.string()),
        }
    )


CROSSES = ["--cross", "occupation,education num", "--cross", "workclass,occupation,married"]
KEEP_ID = ["--numeric", "fnlwgt"]  # unique per row, so inferred an id; kept to tell rows apart after the split


def run(input_path, out, *extra: str, positive: str = ">50K") -> int:
    argv = [
        "--input",
        str(input_path),
        "--label",
        "income",
        "--positive",
        positive,
        "--out",
        str(out),
        "--row-group-rows",
        "1000",
        *extra,
    ]
    return prepare_main("tabular", argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("census")
    table = census_table()
    pq.write_table(table, root / "census.parquet")
    pacsv.write_csv(table, root / "census.csv")
    return root


@pytest.fixture(scope="module")
def prepared(files):
    """The Parquet input and the CSV input, each prepared with the same options."""
    for kind in ("parquet", "csv"):
        assert run(files / f"census.{kind}", files / f"out_{kind}", *CROSSES, *KEEP_ID) == 0
    return files


def raw_split(path, split: int) -> pa.Table:
    """The raw rows the preparer puts in a split, recomputed from the labels (input order)."""
    raw = read_table(path)
    raw = raw.filter(pc.is_valid(raw["income"]))
    labels = (pc.utf8_trim_whitespace(raw["income"]).to_numpy(zero_copy_only=False) == ">50K").astype(np.int8)
    return raw.filter(pa.array(assign_splits(labels, [0.8, 0.1, 0.1], SEED) == split))


def read(root, split: str) -> pa.Table:
    return pq.read_table(root / split / "part-00000.parquet")


def test_column_kinds_names_and_schema(prepared):
    schema = DatasetSchema.load(prepared / "out_parquet")
    t = load_transforms(prepared / "out_parquet")
    assert [f.source for f in t.categorical] == ["workclass", "education num", "occupation", "married"]
    # "education num" (1..16) is categorical with a numeric copy; fnlwgt is kept by --numeric
    assert [f.source for f in t.numeric] == ["age", "fnlwgt", "education num", "capital_gain", "hours_per_week", "wage"]
    assert t.dropped == {"country": "constant"}
    assert "education_num" in schema.sparse_names  # sanitised
    num = {f.source: f for f in t.numeric}
    assert num["capital_gain"].log and num["capital_gain"].missing == "capital_gain_missing"  # skewed, nulls
    assert not num["hours_per_week"].log and num["hours_per_week"].missing == "hours_per_week_missing"
    assert not num["age"].log and num["age"].missing is None
    assert schema.dense == [
        *"age fnlwgt education_num_value capital_gain capital_gain_missing hours_per_week".split(),
        *"hours_per_week_missing wage".split(),
    ]
    assert schema.sparse_names == [
        *"workclass education_num occupation married occupation_x_education_num".split(),
        *"workclass_x_occupation_x_married".split(),
    ]
    assert schema.label == "label" and schema.task == "binary" and schema.extra["transforms"] == "transforms.json"
    assert schema.extra["rows_dropped_null_label"] == ROWS - sum(s.rows for s in schema.splits.values()) > 0
    table = read(prepared / "out_parquet", "train")
    assert table.column_names == ["label", *schema.dense, *schema.sparse_names]
    assert table.schema.field("label").type == pa.int8()
    assert all(table.schema.field(c).type == pa.float32() for c in schema.dense)
    assert all(table.schema.field(c).type == pa.int64() and table[c].null_count == 0 for c in schema.sparse_names)


def test_vocabulary_from_train_only_with_oov_and_null_ids(prepared):
    out = prepared / "out_parquet"
    occupation = next(f for f in load_transforms(out).categorical if f.source == "occupation")
    train_raw = raw_split(prepared / "census.parquet", 0)
    counts = pc.value_counts(train_raw["occupation"].drop_null()).to_pylist()
    frequent = sorted((c for c in counts if c["counts"] >= 5), key=lambda c: (-c["counts"], c["values"]))
    assert occupation.vocabulary == [c["values"] for c in frequent]  # by count, then value
    assert TEST_ONLY not in occupation.vocabulary and not any(v.startswith("Rare") for v in occupation.vocabulary)

    test_raw, test = raw_split(prepared / "census.parquet", 2), read(out, "test")
    raw_occ = test_raw["occupation"].to_pylist()
    ids = test["occupation"].to_numpy()
    only_test = np.array([v == TEST_ONLY for v in raw_occ])
    assert only_test.sum() == 20 and (ids[only_test] == RARE_ID).all()
    assert (ids[pc.is_null(test_raw["occupation"]).to_numpy(zero_copy_only=False)] == MISSING_ID).all()
    known = np.array([v in occupation.vocabulary for v in raw_occ])
    assert (ids[known] == [occupation.vocabulary.index(v) + FIRST_ID for v in np.array(raw_occ, object)[known]]).all()
    # workclass values were written padded (" Private"): trimmed, and their nulls get id 1
    workclass = next(f for f in load_transforms(out).categorical if f.source == "workclass")
    assert workclass.vocabulary[0] == "Private" and workclass.num_embeddings == 2 + 6
    assert (test["workclass"].to_numpy() == MISSING_ID).sum() == test_raw["workclass"].null_count > 0


def test_numerics_standardised_with_train_stats_and_missing_indicators(prepared):
    out = prepared / "out_parquet"
    train = read(out, "train")
    for name in ("age", "capital_gain", "hours_per_week"):
        z = train[name].to_numpy()
        present = (
            train[f"{name}_missing"].to_numpy() == 0
            if f"{name}_missing" in train.column_names
            else np.ones(len(z), bool)
        )
        assert abs(z[present].mean()) < 1e-4 and abs(z[present].std() - 1) < 1e-4, name
        assert (z[~present] == 0).all()  # imputed with the train mean
    train_raw, test_raw, test = (
        raw_split(prepared / "census.parquet", 0),
        raw_split(prepared / "census.parquet", 2),
        read(out, "test"),
    )
    assert train["hours_per_week_missing"].to_numpy().sum() == train_raw["hours_per_week"].null_count > 0
    assert (
        test["capital_gain_missing"].to_numpy() == pc.is_null(test_raw["capital_gain"]).to_numpy(zero_copy_only=False)
    ).all()
    # the test split uses the train statistics: recompute them from the raw train rows
    gain = np.log1p(train_raw["capital_gain"].drop_null().to_numpy())
    expected = (np.log1p(test_raw["capital_gain"].fill_null(0).to_numpy()) - gain.mean()) / gain.std()
    present = test["capital_gain_missing"].to_numpy() == 0
    np.testing.assert_allclose(test["capital_gain"].to_numpy()[present], expected[present], rtol=1e-5, atol=1e-5)


def test_crosses_follow_component_ids_with_train_vocabulary(prepared):
    out = prepared / "out_parquet"
    train, test = read(out, "train"), read(out, "test")
    cross = next(f for f in load_transforms(out).crosses if f.name == "occupation_x_education_num")
    occ, edu, ids = (train[c].to_numpy() for c in ("occupation", "education_num", cross.name))
    pairs, inverse, counts = np.unique(np.stack([occ, edu], 1), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    assert ((ids != RARE_ID) == (counts[inverse] >= 5)).all()  # frequent pairs, and only those, get ids
    assert cross.num_embeddings == FIRST_ID + (counts >= 5).sum()
    # one id per pair, different pairs different ids (on the test split too)
    table = pa.table({"o": test["occupation"], "e": test["education_num"], "x": test[cross.name]})
    per_pair = table.group_by(["o", "e"]).aggregate([("x", "count_distinct")])
    assert (per_pair["x_count_distinct"].to_numpy() == 1).all()
    known = table.filter(pc.not_equal(table["x"], RARE_ID))
    assert len(known.group_by(["o", "e"]).aggregate([])) == len(pc.unique(known["x"]))
    three = next(f for f in load_transforms(out).crosses if f.name == "workclass_x_occupation_x_married")
    assert len(three.vocabulary[0]) == 3 and read(out, "valid")[three.name].to_numpy().max() < three.num_embeddings


def test_stratified_split_partitions_rows(prepared):
    out = prepared / "out_parquet"
    schema = DatasetSchema.load(out)
    parts = {s: read(out, s) for s in ("train", "valid", "test")}
    rows = {s: t.num_rows for s, t in parts.items()}
    total = sum(rows.values())
    assert abs(rows["train"] / total - 0.8) < 0.002 and abs(rows["valid"] / total - 0.1) < 0.002
    assert {s: i.rows for s, i in schema.splits.items()} == rows
    rates = {s: t["label"].to_numpy().mean() for s, t in parts.items()}
    overall = sum(t["label"].to_numpy().sum() for t in parts.values()) / total
    assert all(abs(r - overall) < 0.005 for r in rates.values()), rates
    # fnlwgt is unique per row: undo the standardisation to see which input rows went where
    f = next(f for f in load_transforms(out).numeric if f.source == "fnlwgt")
    seen = {
        s: set(np.rint(t["fnlwgt"].to_numpy().astype(np.float64) * f.std + f.mean).astype(int))
        for s, t in parts.items()
    }
    raw = read_table(prepared / "census.parquet")
    labelled = set(raw.filter(pc.is_valid(raw["income"]))["fnlwgt"].to_pylist())
    assert seen["train"] | seen["valid"] | seen["test"] == labelled
    assert sum(len(v) for v in seen.values()) == len(labelled) == total


def test_apply_transforms_on_raw_rows_reproduces_the_splits(prepared):
    for kind in ("csv", "parquet"):
        out = prepared / f"out_{kind}"
        for index, split in ((1, "valid"), (2, "test")):
            rebuilt = apply_transforms(raw_split(prepared / f"census.{kind}", index), out)
            assert rebuilt.equals(read(out, split)), (kind, split)
    # without the label column (prediction), the same features
    raw = raw_split(prepared / "census.csv", 2).drop_columns(["income"])
    features = apply_transforms(raw, json.loads((prepared / "out_csv" / "transforms.json").read_text()))
    assert features.equals(read(prepared / "out_csv", "test").drop_columns(["label"]))


def test_csv_and_parquet_inputs_give_identical_datasets(prepared):
    a, b = prepared / "out_parquet", prepared / "out_csv"
    assert (a / "transforms.json").read_text() == (b / "transforms.json").read_text()
    for split in ("train", "valid", "test"):
        assert read(a, split).equals(read(b, split)), split


def test_dataset_passes_checks_and_loads(prepared):
    schema = DatasetSchema.load(prepared / "out_csv")
    for split in ("train", "valid", "test"):
        groups = list_row_groups(check_files(schema, split))
        assert len(groups) > 1 or split != "train"
        for g in groups:
            check_row_group(schema, pq.ParquetFile(g.file).read_row_group(g.index, columns=schema.columns()), str(g))
    batches = list(ParquetBatches(schema, "train", batch_size=512, shuffle=True))
    assert len(batches) == schema.splits["train"].rows // 512
    batch = batches[0]
    assert batch.dense.shape == (512, len(schema.dense)) and batch.sparse.keys() == schema.sparse_names
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    assert (batch.sparse.lengths() == 1).all()  # every row has an id, missing included


def test_regression_task(files, tmp_path, capsys):
    out = tmp_path / "reg"
    argv = [
        "--input",
        str(files / "census.parquet"),
        *"--label wage --task regression --drop income --out".split(),
        str(out),
        "--seed",
        "3",
    ]
    assert prepare_main("tabular", argv) == 0
    schema = DatasetSchema.load(out)
    assert schema.task == "regression" and "wage" not in schema.dense
    parts = {s: read(out, s) for s in ("train", "valid", "test")}
    assert parts["train"].schema.field("label").type == pa.float32()
    y = parts["train"]["label"].to_numpy()
    assert schema.label_range == [float(y.min()), float(y.max())]
    means = [t["label"].to_numpy().mean() for t in parts.values()]
    assert max(means) - min(means) < 0.5  # stratified by label deciles (label std ~ 14)
    assert sum(t.num_rows for t in parts.values()) == ROWS
    assert "label 'wage' mean" in capsys.readouterr().out
    for split in parts:
        check_files(schema, split)
        check_row_group(schema, parts[split], split)


def test_rerun_is_up_to_date_and_a_different_dataset_needs_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(files / "census.csv", out) == 0
    summary = capsys.readouterr().out
    assert "positive rate" in summary and "capital_gain" in summary and "log1p (auto" in summary
    before = (out / "train" / "part-00000.parquet").stat().st_mtime_ns
    assert run(files / "census.csv", out) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "train" / "part-00000.parquet").stat().st_mtime_ns == before
    assert run(files / "census.csv", out, "--min-frequency", "3") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(files / "census.csv", out, "--min-frequency", "3", "--overwrite") == 0
    assert json.loads((out / "dataset.json").read_text())["extra"]["provenance"]["tabular"]["min_frequency"] == 3


def test_overrides(files, tmp_path):
    out = tmp_path / "out"
    assert (
        run(
            files / "census.parquet",
            out,
            "--categorical",
            "age",
            "--numeric",
            "education num",
            *"--drop fnlwgt,wage --log hours_per_week --min-frequency 1".split(),
        )
        == 0
    )
    t = load_transforms(out)
    assert "age" in [f.source for f in t.categorical] and t.dropped["fnlwgt"] == "--drop"
    num = {f.source: f for f in t.numeric}
    assert "education num" in num and num["hours_per_week"].log
    occupation = next(f for f in t.categorical if f.source == "occupation")
    assert any(v.startswith("Rare") for v in occupation.vocabulary)  # min-frequency 1 keeps the tail


@pytest.mark.parametrize(
    "extra, positive, message",
    [
        (["--label", "salary"], ">50K", "label column 'salary' not found"),
        ([], "rich", "never holds the positive value(s) 'rich'"),
        (["--categorical", "colour"], ">50K", "column 'colour' named in --categorical not found"),
        (["--cross", "occupation,age"], ">50K", "column 'age' is numeric"),
        ([], ">50K,<=50K", "every label in column 'income' is positive"),
    ],
)
def test_clear_errors(files, tmp_path, capsys, extra, positive, message):
    assert run(files / "census.parquet", tmp_path / "out", *extra, positive=positive) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "census.parquet" in err
    assert not (tmp_path / "out").exists()  # nothing written on a bad invocation


def test_missing_input_and_empty_table(tmp_path, capsys):
    assert run(tmp_path / "nope.csv", tmp_path / "out") == 2
    assert "nope.csv not found" in capsys.readouterr().err
    (tmp_path / "empty.csv").write_text("age,income\n")
    assert run(tmp_path / "empty.csv", tmp_path / "out") == 2
    assert "empty" in capsys.readouterr().err
