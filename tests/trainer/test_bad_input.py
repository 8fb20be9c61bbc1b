"""Bad input gets one clear error naming the file and the column, not a traceback from torch."""

import json

import pyarrow as pa
import pytest

from tests.helpers.data import TINY_SPARSE, write_dataset
from tests.helpers.runs import one_error, run_recsys, run_trainer


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


@pytest.mark.parametrize(
    "case, message",
    [
        ("nproc 0", "--nproc-per-node 0: expected a positive number of ranks"),
        ("run dir is a file", "run directory {tmp}/file cannot be written: it is a file"),
        ("tb is a file", "TensorBoard directory {tmp}/run/tb cannot be written: it is a file"),
        ("checkpoint dir under a file", "checkpoint.dir {tmp}/file/ckpt cannot be written"),
        ("run dir under /proc", "run directory /proc/recsys-run cannot be written"),
        ("label is a feature", "column 'label' is listed as the label and as a dense feature"),
        ("lr -1", "optimizer.dense_lr is -1.0; a learning rate must be >= 0"),
        ("unknown model", "--model.name: 'nosuch' is not one of dlrm, dlrm_dcn"),
        ("bad toml", "bad.toml: not valid TOML"),
        ("mlp does not fit", "embedding_dim"),  # a cross-field rule, checked with the derived defaults
    ],
)
def test_recsys_train_refuses_before_any_rank_starts(tmp_path, tiny_table, case, message):
    """Each is one `error:` line from `recsys train` itself: no torchrun, no ranks, no dump."""
    schema = _dataset(tmp_path, tiny_table)
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.toml").write_text("[training\n")
    args = {"run": ["--run-dir", str(tmp_path / "run")]}
    flags = {
        "nproc 0": ["--nproc-per-node", "0"],
        "run dir is a file": ["--run-dir", str(tmp_path / "file")],
        "checkpoint dir under a file": ["--checkpoint.dir", str(tmp_path / "file" / "ckpt")],
        "run dir under /proc": ["--run-dir", "/proc/recsys-run"],
        "lr -1": ["--optimizer.dense_lr", "-1"],
        "unknown model": ["--model", "nosuch"],
        "bad toml": ["--config", str(tmp_path / "bad.toml")],
        "mlp does not fit": ["--derive_defaults", "false", "--model.embedding_dim", "8"],
    }.get(case, [])
    if case == "tb is a file":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "tb").write_text("x")
    if case == "label is a feature":
        raw = json.loads((schema.root / "dataset.json").read_text())
        raw["dense"].append("label")
        (schema.root / "dataset.json").write_text(json.dumps(raw))
    result = run_recsys("train", "--data", str(schema.root), *args["run"], *flags)
    _assert_clear_error(result, message.format(tmp=tmp_path))
    assert "torch.distributed" not in result.stderr and "ChildFailedError" not in result.stderr


def test_bad_rows_found_by_one_of_two_ranks_are_one_error_without_torchruns_report(tmp_path, tiny_table):
    """The rank that reads the bad row group says so; its peer, whose collective lost it, says
    only that it stopped; `recsys train` exits 2 without torchrun's failure report."""
    table = pa.concat_tables([tiny_table] * 8)  # 40 rows, 4 row groups of 10: rank 0 reads 0-1, rank 1 2-3
    table = table.set_column(3, "a", pa.array([1] * 35 + [99] + [1] * 4, pa.int64()))
    tables = {s: [table] for s in ("train", "valid", "test")}
    schema = write_dataset(tmp_path / "d", tables, TINY_SPARSE, ["d0", "d1"], row_group_rows=10)
    args = ["--data", str(schema.root), "--run-dir", str(tmp_path / "run"), "--nproc-per-node", "2"]
    args += ["--data.batch_size", "2", "--data.num_workers", "0", "--data.shuffle", "false"]
    args += ["--derive_defaults", "false"]
    result = run_recsys("train", *args)
    _assert_clear_error(result, "error (rank 1)", "part-00000.parquet row group 3", "'a'", "outside [0, 10)")
    assert "ChildFailedError" not in result.stderr and "Root Cause" not in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "gs://bucket/d"], "gs://bucket/d: reading gs:// needs the gcsfs package (pip install gcsfs)"),
        (["--data", "nosuch://bucket/d"], "nosuch://bucket/d: no file system for nosuch://"),
        (["--data", "s3://no-such-bucket/d"], "dataset directory s3://no-such-bucket/d does not exist"),
        (["--checkpoint.dir", "s3://no-such-bucket/ckpt"], "checkpoint.dir s3://no-such-bucket/ckpt cannot be written"),
        (["--run-dir", "s3://recsys/run"], "run_dir s3://recsys/run: a run directory is local"),
    ],
)
def test_an_object_store_url_that_cannot_be_used_is_one_error(tmp_path, tiny_table, s3, flags, message):
    schema = _dataset(tmp_path, tiny_table)
    data = [] if flags[0] == "--data" else ["--data", str(schema.root)]
    result = run_recsys("train", *data, "--run-dir", str(tmp_path / "run"), *flags)
    _assert_clear_error(result, message)
