"""Bad input gets one clear error naming the file and the column, not a traceback from torch."""

import pyarrow as pa

from tests.helpers.data import TINY_SPARSE, write_dataset
from tests.helpers.runs import one_error, run_trainer


def _dataset(tmp_path, table):
    return write_dataset(tmp_path / "d", {s: [table] for s in ("train", "valid", "test")}, TINY_SPARSE, ["d0", "d1"])


def _assert_clear_error(result, *needles):
    line = one_error(result).splitlines()[0]
    for needle in needles:
        assert needle in line, line


def test_missing_dataset_directory(tmp_path):
    _assert_clear_error(run_trainer(["--data", str(tmp_path / "nope")]), str(tmp_path / "nope"), "does not exist")


def test_missing_column(tmp_path, tiny_table):
    schema = _dataset(tmp_path, tiny_table.drop_columns(["d1"]))
    _assert_clear_error(run_trainer(["--data", str(schema.root)]), "part-00000.parquet", "'d1'", "missing")


def test_wrong_column_type(tmp_path, tiny_table):
    table = tiny_table.set_column(3, "a", pa.array(["x", None, "y", "z", "w"]))
    schema = _dataset(tmp_path, table)
    _assert_clear_error(
        run_trainer(["--data", str(schema.root)]), "part-00000.parquet", "'a'", "string", "expected integer"
    )


def test_id_out_of_range_names_row_group(tmp_path, tiny_table):
    table = tiny_table.set_column(3, "a", pa.array([3, None, 0, 99, 1], pa.int64()))
    schema = _dataset(tmp_path, table)
    result = run_trainer(["--data", str(schema.root), "--data.batch_size", "2", "--data.num_workers", "0"])
    _assert_clear_error(result, "part-00000.parquet row group 0", "'a'", "outside [0, 10)")
