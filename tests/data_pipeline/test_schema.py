"""Every kind of bad dataset gets a DataError that names the file, the column and the row group/row.

Footer-level problems are caught by `check_files` (run by `recsys train` before any process starts);
value-level problems by `check_row_group` as the reader streams each row group.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.prepare.output import DatasetOutput
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DataError, DatasetSchema, check_files
from tests.helpers.data import TINY_SPARSE, write_dataset


def _dataset(tmp_path, table, files=1):
    return write_dataset(
        tmp_path / "d",
        {s: [table] * files for s in ("train", "valid", "test")},
        TINY_SPARSE,
        ["d0", "d1"],
        row_group_rows=2,
    )


def _read_all(schema, split="train"):
    for _ in ParquetBatches(schema, split, batch_size=2, drop_last=False):
        pass


# ---- footer level --------------------------------------------------------------------------------


def test_dataset_json_missing_or_malformed(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table)
    (schema.root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset.json: malformed"):
        DatasetSchema.load(schema.root)
    (schema.root / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"dataset.json not found"):
        DatasetSchema.load(schema.root)
    with pytest.raises(DataError, match="does not exist"):
        DatasetSchema.load(tmp_path / "nowhere")


def _mutated(raw: dict, change) -> dict:
    raw = json.loads(json.dumps(raw))
    change(raw)
    return raw


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["dense"].append("label"), "'label' is listed as the label and as a dense feature"),
        (lambda r: r.update(weight="label"), "'label' is listed as the label and as the weight"),
        (lambda r: r["sparse"].append({"name": "label", "num_embeddings": 2}), "as the label and as a sparse"),
        (lambda r: r["sparse"].append(dict(r["sparse"][0])), "'a' is listed twice as a sparse feature"),
        (lambda r: r.update(sparse=[]), "lists no sparse feature"),
        (lambda r: r["sparse"][0].update(num_embeddings="10"), "num_embeddings '10'; expected an integer"),
        (lambda r: r["sparse"][0].update(num_embeddings=10.5), "num_embeddings 10.5"),
        (lambda r: r["sparse"][0].update(num_embeddings=2**63), "num_embeddings 9223372036854775808"),
        (lambda r: r["sparse"][0].update(num_embeddings=True), "num_embeddings True"),
        (lambda r: r["sparse"][0].update(multi_hot="yes"), "multi_hot 'yes'"),
        (lambda r: r["dense"].append("d.x"), "'d.x' is not usable"),
        (lambda r: r.update(task="regression", label_range=[5, 1]), r"label_range \[5, 1\] is not \[min, max\]"),
        (lambda r: r.update(task="regression", label_range=[1, math.nan]), "label_range"),
        (lambda r: r.update(label_range=[0, 1]), "label_range is for regression"),
        (lambda r: r["splits"]["valid"].update(path="../other/valid"), "split 'valid' has path '../other/valid'"),
        (lambda r: r["splits"]["valid"].update(path="/data/other/valid"), "split 'valid' has path"),
        (lambda r: r["splits"]["valid"].update(rows=-1), "split 'valid' has rows -1"),
        (lambda r: r.update(task="ranking"), "task 'ranking' is not one of"),
    ],
)
def test_dataset_json_that_would_train_on_a_lie_or_crash_is_refused(tmp_path, tiny_table, change, message):
    schema = _dataset(tmp_path, tiny_table)
    raw = json.loads((schema.root / "dataset.json").read_text())
    DatasetSchema.from_json(raw, schema.root)  # the unchanged one is fine
    (schema.root / "dataset.json").write_text(json.dumps(_mutated(raw, change)))
    with pytest.raises(DataError, match=message) as error:
        DatasetSchema.load(schema.root)
    assert str(error.value).startswith(str(schema.root / "dataset.json"))


def test_a_constant_regression_label_has_a_one_point_range(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table)
    raw = json.loads((schema.root / "dataset.json").read_text())
    raw.update(task="regression", label_range=[3, 3])
    assert DatasetSchema.from_json(raw, schema.root).label_range == [3, 3]


def test_dataset_json_inconsistent_with_files(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table, files=2)
    (schema.root / "train" / "part-00001.parquet").unlink()
    with pytest.raises(DataError, match=r"split 'train' should hold 10 rows but its 1 files hold 5"):
        check_files(schema, "train")
    raw = json.loads((schema.root / "dataset.json").read_text())
    raw["splits"]["valid"]["path"] = "elsewhere"
    (schema.root / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"split 'valid': no \*.parquet files in .*elsewhere"):
        check_files(DatasetSchema.load(schema.root), "valid")
    with pytest.raises(DataError, match=r"no split 'eval'"):
        check_files(schema, "eval")


def test_truncated_parquet_file(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table)
    path = schema.root / "test" / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"test/part-00000.parquet: not a readable Parquet file"):
        check_files(schema, "test")


def test_corrupt_row_group_names_it(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table)
    path = schema.root / "train" / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    data[4:200] = b"\xff" * 196  # the footer survives, the first column chunks do not
    path.write_bytes(bytes(data))
    check_files(schema, "train")
    with pytest.raises(DataError, match=r"train/part-00000.parquet row group 0: cannot be read"):
        _read_all(schema)


def test_file_with_a_different_schema(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table, files=2)
    other = tiny_table.set_column(1, "d0", tiny_table.column("d0").cast(pa.float64()))
    pq.write_table(other, schema.root / "valid" / "part-00001.parquet")
    with pytest.raises(
        DataError, match=r"part-00001.parquet: column 'd0' has type double, but part-00000.parquet has float"
    ):
        check_files(schema, "valid")


def test_empty_split(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table)
    pq.write_table(tiny_table.slice(0, 0), schema.root / "valid" / "part-00000.parquet")
    schema.splits["valid"].rows = None
    with pytest.raises(DataError, match=r"split 'valid' .* is empty"):
        check_files(schema, "valid")


def test_missing_column_and_wrong_type(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table.drop_columns(["m"]))
    with pytest.raises(DataError, match=r"train/part-00000.parquet: column 'm' named in dataset.json is missing"):
        check_files(schema, "train")
    schema = _dataset(tmp_path / "2", tiny_table.set_column(0, "label", pa.array(["1", "0", "1", "0", "1"])))
    with pytest.raises(DataError, match=r"column 'label' has type string, expected number"):
        check_files(schema, "train")


# ---- value level (streamed) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "column, values, message",
    [
        (
            "a",
            pa.array([3, None, -1, 9, 1], pa.int64()),
            r"row group 1: column 'a' has ids outside \[0, 10\): min -1, max 9, first at row 0",
        ),
        (
            "a",
            pa.array([3, None, 0, 10, 1], pa.int64()),
            r"row group 1: column 'a' has ids outside \[0, 10\): min 0, max 10, first at row 1",
        ),
        (
            "m",
            pa.array([[1], [], None, [4, 8], [5]], pa.list_(pa.int64())),
            r"row group 1: column 'm' has ids outside \[0, 8\)",
        ),
        (
            "d0",
            pa.array([0.5, 1.0, 2.0, math.nan, 4.0], pa.float32()),
            r"row group 1: column 'd0' has a non-finite value \(nan\) at row 1",
        ),
        (
            "d1",
            pa.array([0.5, 1.0, 2.0, 3.0, math.inf]),
            r"row group 2: column 'd1' has a non-finite value \(inf\) at row 0",
        ),
        (
            "label",
            pa.array([1, 0, None, 0, 1], pa.int8()),
            r"row group 1: column 'label' \(label\) has 1 nulls \(first at row 0\)",
        ),
        (
            "label",
            pa.array([1, 0, 1, 2, 1], pa.int8()),
            r"row group 1: column 'label' \(label\) must be 0 or 1 for a binary task, row 1 holds 2",
        ),
    ],
)
def test_bad_values_name_file_column_and_row(tmp_path, tiny_table, column, values, message):
    table = tiny_table.set_column(tiny_table.schema.get_field_index(column), column, values)
    schema = _dataset(tmp_path, table)
    with pytest.raises(DataError, match=r"train/part-00000.parquet " + message):
        _read_all(schema)


def test_boolean_labels_are_binary(tmp_path, tiny_table):
    table = tiny_table.set_column(0, "label", pa.array([True, False, True, False, True]))
    _read_all(_dataset(tmp_path, table))


def test_regression_labels_may_be_any_finite_number(tmp_path, tiny_table):
    table = tiny_table.set_column(0, "label", pa.array([3.5, 1.0, 5.0, 2.0, 4.0], pa.float32()))
    schema = _dataset(tmp_path, table)
    schema.task, schema.label_range = "regression", [1.0, 5.0]
    _read_all(schema)
    table = tiny_table.set_column(0, "label", pa.array([3.5, 1.0, math.nan, 2.0, 4.0], pa.float32()))
    schema = _dataset(tmp_path / "2", table)
    schema.task = "regression"
    with pytest.raises(DataError, match=r"row group 1: column 'label' has a non-finite value"):
        _read_all(schema)


# ---- output directories ------------------------------------------------------------------------------


def test_output_directory_with_another_dataset_is_refused(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table)
    with pytest.raises(FileExistsError, match="already holds a different dataset; pass --overwrite"):
        DatasetOutput(schema.root, {"mine": 1}).start()
    assert (schema.root / "dataset.json").exists()  # nothing touched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already holds other files"):
        DatasetOutput(tmp_path / "other", {"mine": 1}).start()
    assert DatasetOutput(tmp_path / "other", {"mine": 1}, overwrite=True).start() is False
    assert not (tmp_path / "other" / "notes.txt").exists()
