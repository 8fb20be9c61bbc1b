"""`recsys prepare criteo` on Criteo-format TSV files written by the tests (missing fields, malformed
lines, gzip, byte-range units), down to a dataset the trainer trains on."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.prepare import criteo
from data_pipeline.prepare.criteo import CriteoOptions, prepare
from data_pipeline.prepare.criteo_parse import fnv1a
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DataError, DatasetSchema
from tests.helpers.data import CRITEO_VOCAB, criteo_lines, read_split, write_tsv
from tests.helpers.runs import ROOT, train


def options(inputs, **kw) -> CriteoOptions:
    defaults = dict(num_embeddings=[1000] * 26, row_group_rows=2048, workers=1)
    return CriteoOptions(inputs=[str(i) for i in inputs], **{**defaults, **kw})


def test_values_exactly(tmp_path):
    lines = [
        "1\t5\t-3\t\t0\t1\t2\t3\t4\t5\t6\t7\t8\t9\t"
        + "\t".join(["0000000a", "", "FFFFFFFF", "zz", "-5", "1_a"] + ["00000001"] * 20),
    ] * 10
    src = write_tsv(tmp_path / "day_0", lines)
    schema = prepare(
        options([src], num_embeddings=[7] * 26, split_fractions=(1 / 3, 1 / 3, 1 / 3)),
        tmp_path / "out",
        log=lambda *_: None,
    )
    row = pq.read_table(tmp_path / "out" / "train").slice(0, 1).to_pylist()[0]
    assert row["label"] == 1
    assert row["int_0"] == pytest.approx(math.log1p(5))
    assert row["int_1"] == 0.0 and row["int_2"] == 0.0  # negative -> log1p(0); missing -> 0
    assert row["int_12"] == pytest.approx(math.log1p(9))
    assert row["cat_0"] == 10 % 7 and row["cat_1"] == 0  # hex 0xa; missing -> 0 (as MLPerf)
    assert row["cat_2"] == 0xFFFFFFFF % 7
    assert row["cat_3"] == fnv1a(b"zz") % 7  # not hex: FNV-1a
    assert row["cat_4"] == fnv1a(b"-5") % 7 and row["cat_5"] == fnv1a(b"1_a") % 7  # int() would take these
    assert sum(s.rows for s in schema.splits.values()) == 10


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    lines = criteo_lines(3000)
    lines[99] = "\t".join(lines[99].split("\t")[:30])  # line 100: too few fields
    lines[1999] = "\t".join(["1", "12x", *lines[1999].split("\t")[2:]])  # line 2000: non-integer count
    lines[2499] = "\t".join(["3", *lines[2499].split("\t")[1:]])  # line 2500: bad label
    src = write_tsv(tmp_path / "day_0", lines)
    # Small units: lines 2000 and 2500 are found by workers reading byte ranges mid-file.
    with pytest.raises(criteo.BadRows, match=r"day_0 line 100: wrong number of fields"):
        prepare(options([src], chunk_bytes=100_000), tmp_path / "strict", log=lambda *_: None)
    assert not (tmp_path / "strict" / "dataset.json").exists()

    schema = prepare(
        options([src], chunk_bytes=100_000, max_bad_rows=3, workers=2), tmp_path / "lenient", log=lambda *_: None
    )
    extra = schema.extra
    assert extra["lines"] == 3000 and extra["malformed_lines"] == 3
    assert sum(s.rows for s in schema.splits.values()) == 2997
    assert any("day_0 line 100: wrong number of fields" in e for e in extra["malformed_examples"])
    assert any("day_0 line 2000: int_0 '12x' is not an integer" in e for e in extra["malformed_examples"])
    assert any("day_0 line 2500: label '3' is not 0 or 1" in e for e in extra["malformed_examples"])


def test_cli_error_is_one_line(tmp_path):
    lines = criteo_lines(200)
    lines[9] = "1\t2"
    src = write_tsv(tmp_path / "day_0.gz", lines)
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "prepare", "criteo", "--input", src, "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "error: 1 malformed lines" in result.stderr and "day_0.gz line 10: wrong number of fields" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "empty").write_text("")
    for missing, message in [
        (str(tmp_path / "nope*"), "no file matches"),
        (str(tmp_path / "empty"), "the file is empty"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "launch.cli", "prepare", "criteo", "--input", missing, "--out", str(tmp_path / "o")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_units_and_workers_do_not_change_the_output(tmp_path):
    src = write_tsv(tmp_path / "day_0", criteo_lines(4000))
    gz = write_tsv(tmp_path / "day_1.gz", criteo_lines(1000, seed=1))
    one = prepare(options([src, gz], chunk_bytes=50_000, workers=1), tmp_path / "one", log=lambda *_: None)
    two = prepare(options([src, gz], chunk_bytes=50_000, workers=2), tmp_path / "two", log=lambda *_: None)
    assert len(os.listdir(tmp_path / "one" / "train")) > 5  # really cut into byte-range units
    for split in ("train", "valid", "test"):
        assert read_split(one.root, split).equals(read_split(two.root, split))
    rows = {s: i.rows for s, i in one.splits.items()}
    assert sum(rows.values()) == 5000 and 0.75 < rows["train"] / 5000 < 0.85


_REAL_WRITE_UNIT = criteo.write_unit


def _crash_on_third_unit(unit, *args):
    """Stands in for `write_unit` (module level, so the process pool can pickle it)."""
    if unit.chunk == 2:
        raise RuntimeError("simulated kill")
    return _REAL_WRITE_UNIT(unit, *args)


def test_interrupted_run_resumes_without_redoing_finished_units(tmp_path, monkeypatch):
    src = write_tsv(tmp_path / "day_0", criteo_lines(4000))
    opts = options([src], chunk_bytes=50_000)
    out = tmp_path / "out"
    monkeypatch.setattr(criteo, "write_unit", _crash_on_third_unit)
    with pytest.raises(RuntimeError, match="simulated kill"):
        prepare(opts, out, log=lambda *_: None)
    monkeypatch.setattr(criteo, "write_unit", _REAL_WRITE_UNIT)
    assert not (tmp_path / "out" / "dataset.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "train").glob("part-*.parquet")}
    assert done and not any(
        p.name.startswith(".") for p in (tmp_path / "out" / "train").iterdir()
    )  # no temp files left
    messages = []
    schema = prepare(opts, out, log=messages.append)
    assert any("resuming" in m for m in messages)
    for name, mtime in done.items():
        assert (tmp_path / "out" / "train" / name).stat().st_mtime_ns == mtime  # finished units kept as they were
    clean = prepare(options([src], chunk_bytes=50_000), tmp_path / "clean", log=lambda *_: None)
    for split in ("train", "valid", "test"):
        assert read_split(schema.root, split).equals(read_split(clean.root, split))
    # Same inputs and options again: up to date. Different options: refused without overwrite.
    assert prepare(opts, out, log=messages.append).root == schema.root and "up to date" in messages[-1]
    with pytest.raises(FileExistsError, match="different dataset"):
        prepare(options([src], chunk_bytes=50_000, seed=1), tmp_path / "out", log=lambda *_: None)
    prepare(options([src], chunk_bytes=50_000, seed=1), tmp_path / "out", overwrite=True, log=lambda *_: None)


def test_vocabulary_mode_on_train_only(tmp_path):
    lines = criteo_lines(3000)
    common = "\t".join(["0"] + ["1"] * 13 + ["0000abcd"] * 26)
    only_in_test = "\t".join(["1"] + ["1"] * 13 + ["12345678"] * 26)
    train = write_tsv(tmp_path / "day_0", lines + [common] * 5)
    test = write_tsv(tmp_path / "day_23", [only_in_test] * 4 + lines[:100])
    schema = prepare(options([train, test], min_count=3, test_files="day_23"), tmp_path / "out", log=lambda *_: None)
    vocab = np.load(tmp_path / "out" / "vocabulary.npz")
    assert 0xABCD in vocab["cat_0"] and 0x12345678 not in vocab["cat_0"]
    assert schema.sparse[0].num_embeddings == len(vocab["cat_0"]) + 2
    both = pq.read_table(tmp_path / "out" / "test").to_pylist() + pq.read_table(tmp_path / "out" / "valid").to_pylist()
    unseen = [
        r
        for r in both
        if r["label"] == 1 and r["int_0"] == pytest.approx(math.log1p(1)) and r["cat_5"] == criteo.RARE_ID
    ]
    assert len(unseen) >= 4  # a value only in the test file is "rare", not given its own id
    train_rows = pq.read_table(tmp_path / "out" / "train")
    assert schema.splits["train"].rows == 3005 and min(schema.splits["valid"].rows, schema.splits["test"].rows) > 30
    ids = train_rows.column("cat_3").to_numpy()
    assert ids.min() >= 0 and ids.max() < schema.sparse[3].num_embeddings
    assert (ids == criteo.MISSING_ID).mean() == pytest.approx(0.05, abs=0.02)


def test_replicas_under_torchrun_match_one_process(tmp_path):
    src = write_tsv(tmp_path / "day_0", criteo_lines(4000))
    gz = write_tsv(tmp_path / "day_1.gz", criteo_lines(1000, seed=1))
    args = [
        "--input",
        src,
        gz,
        *"--num-embeddings 1000 --row-group-rows 2048 --chunk-mb 0.05 --min-count 2 --workers 1".split(),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, *"-m torch.distributed.run --standalone --nproc-per-node=2".split()]
    for launcher, out in ((torchrun, "replicas"), ([sys.executable], "single")):
        command = [*launcher, "-m", "data_pipeline.prepare.criteo", *args, "--out", str(tmp_path / out)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (out, done.stderr[-3000:])
    a, b = DatasetSchema.load(tmp_path / "replicas"), DatasetSchema.load(tmp_path / "single")
    assert [f.num_embeddings for f in a.sparse] == [f.num_embeddings for f in b.sparse]
    for split in ("train", "valid", "test"):
        assert read_split(a.root, split).equals(read_split(b.root, split))


def test_prepared_dataset_trains(tmp_path):
    src = write_tsv(tmp_path / "day_0", criteo_lines(30_000))
    schema = prepare(
        options([src], num_embeddings=[CRITEO_VOCAB] * 26, workers=2), tmp_path / "data", log=lambda *_: None
    )
    batches = ParquetBatches(schema, "train", batch_size=512)
    assert len(batches) == schema.splits["train"].rows // 512
    run_dir = tmp_path / "run"
    flags = "--data.batch_size 256 --model.embedding_dim 8 --model.dense_arch_layer_sizes 32 8 --training.epochs 2"
    summary = train(schema.root, run_dir, *flags.split(), "--optimizer.dense_lr", "0.003", nproc=0)
    assert summary["test"]["auc"] > 0.70, summary["test"]  # the click model is learnable from 3 features


def test_empty_split_is_an_error(tmp_path):
    src = write_tsv(tmp_path / "day_0", criteo_lines(100))
    with pytest.raises(DataError, match="split 'valid' would be empty"):
        prepare(options([src], split_fractions=(1.0, 0.0, 0.0)), tmp_path / "out", log=lambda *_: None)
