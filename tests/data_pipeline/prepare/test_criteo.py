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
from data_pipeline.prepare.criteo_parse import estimated_lines, fnv1a
from data_pipeline.prepare.criteo_sizes import (
    EXACT_LIMIT,
    DistinctCounter,
    auto_min_count,
    fitted_ids,
    merge_distinct,
    mix64,
    table_size,
)
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
        options([src], ids="fixed", num_embeddings=[7] * 26, split_fractions=(1 / 3, 1 / 3, 1 / 3)),
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


@pytest.mark.parametrize("ids", ["", "--hash-space fitted"])  # a vocabulary (default), fitted hashing
def test_replicas_under_torchrun_match_one_process(tmp_path, ids):
    src = write_tsv(tmp_path / "day_0", criteo_lines(4000))
    gz = write_tsv(tmp_path / "day_1.gz", criteo_lines(1000, seed=1))
    args = [
        "--input",
        src,
        gz,
        *f"--num-embeddings 1000 --row-group-rows 2048 --chunk-mb 0.05 {ids} --workers 1".split(),
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


# ---- default vocabulary, fitted hash spaces, automatic row groups ----------------------------------


def _line(label: int, cats: list[str]) -> str:
    return "\t".join([str(label), *["1"] * 13, *cats])


def _row_groups(root, split: str) -> list[int]:
    return [
        pq.ParquetFile(f).metadata.row_group(i).num_rows
        for f in sorted((root / split).glob("*.parquet"))
        for i in range(pq.ParquetFile(f).num_row_groups)
    ]


def test_default_vocabulary_keeps_values_seen_twice_within_the_cap(tmp_path, capsys):
    # cat_j: 2 rows in 3 hold one of j + 1 common values (uneven counts), every third row a value
    # of its own (seen once); cat_25 is always missing
    def value(j: int, r: int) -> str:
        return f"{(j << 24) + (r * r) % (j + 1):08x}" if r % 3 else f"{(j << 24) + 0x100000 + r:08x}"

    train = [_line(r % 2, [value(j, r) for j in range(25)] + [""]) for r in range(3000)]
    files = [write_tsv(tmp_path / "day_0", train), write_tsv(tmp_path / "day_23", train[:600])]
    counts = [np.unique([line.split("\t")[14 + j] for line in train], return_counts=True)[1] for j in range(25)]
    for cap, out in ((10_000_000, tmp_path / "default"), (10, tmp_path / "capped")):
        argv = ["--input", *files, "--test-files", "day_23", "--out", str(out), "--num-embeddings", str(cap)]
        assert prepare_main(argv) == 0
        schema = DatasetSchema.load(out)
        assert schema.extra["ids"] == "vocabulary" and schema.extra["vocabulary"] == "vocabulary.npz"
        thresholds = list(schema.extra["min_count"].values())
        for j in range(25):
            seen = counts[j]
            threshold = thresholds[j]
            assert schema.sparse[j].num_embeddings == 2 + int((seen >= threshold).sum()) <= cap
            if (seen >= 2).sum() <= cap - 2:
                assert threshold == 2  # the default: every value seen twice
            else:  # raised just enough to fit the cap
                assert threshold > 2 and (seen >= threshold - 1).sum() > cap - 2
        assert schema.sparse[25].num_embeddings == 2 and thresholds[25] == 2
        assert list(schema.extra["distinct_train_values"].values()) == [len(c) for c in counts] + [0]
    printed = capsys.readouterr().out
    assert "tables (vocabulary: values seen >= 2 times on train" in printed
    assert f"cat_24 {2 + (counts[24] >= 2).sum()} (>= 2)" in printed
    assert set(thresholds[9:25]) != {2}  # capped at 10 rows: 8 values + missing + rare
    # values seen once, like those the test rows bring, share the rare id
    rows = pq.read_table(tmp_path / "default" / "train")
    once = np.array([r % 3 == 0 for r in range(3000)])
    assert (rows.column("cat_4").to_numpy()[once] == criteo.RARE_ID).all()
    assert (rows.column("cat_4").to_numpy()[~once] >= criteo.FIRST_ID).all()
    assert (rows.column("cat_25").to_numpy() == criteo.MISSING_ID).all()


def test_fitted_tables_are_sized_to_the_train_values(tmp_path, capsys):
    # cat_j takes 7 x j + 1 distinct values on the train file (cat_25: always missing); the test
    # file holds values train never saw: they count for nothing
    distinct = [7 * j + 1 for j in range(25)] + [0]
    train = [
        _line(r % 2, [f"{(j << 24) + r % d:08x}" if d else "" for j, d in enumerate(distinct)]) for r in range(3000)
    ]
    test = [_line(r % 2, [f"{0xF0000000 + r:08x}"] * 26) for r in range(600)]
    files = [write_tsv(tmp_path / "day_0", train), write_tsv(tmp_path / "day_23", test)]
    argv = ["--input", *files, "--test-files", "day_23", "--out", str(tmp_path / "out"), "--hash-space", "fitted"]
    assert prepare_main(argv) == 0
    printed = capsys.readouterr().out
    schema = DatasetSchema.load(tmp_path / "out")
    sizes = [f.num_embeddings for f in schema.sparse]
    assert sizes == [max(16, 1 << (8 * d - 1).bit_length()) for d in distinct]  # 8 x distinct, a power of two
    assert sizes[:3] == [16, 64, 128] and sizes[24] == 2048
    assert schema.extra["ids"] == "fitted hash" and schema.extra["distinct_counted"] == "exactly"
    assert list(schema.extra["distinct_train_values"].values()) == distinct
    assert "tables (fitted hash" in printed and "cat_24 2,048 (169 values)" in printed
    rows = pq.read_table(tmp_path / "out" / "train")
    for j, d in enumerate(distinct[:25]):
        ids = rows.column(f"cat_{j}").to_numpy()
        assert ids.min() >= 1 and ids.max() < sizes[j] and len(np.unique(ids)) <= d  # one id per value
    assert (rows.column("cat_25").to_numpy() == 0).all()  # missing keeps id 0
    raw = np.array([int(line.split("\t")[14 + 24], 16) for line in train], np.uint64)
    expected = fitted_ids(raw, np.zeros(len(raw), bool), sizes[24])  # train keeps the input's row order
    np.testing.assert_array_equal(rows.column("cat_24").to_numpy(), expected)
    unseen = pq.read_table(tmp_path / "out" / "test").column("cat_0").to_numpy()
    assert unseen.min() >= 1 and unseen.max() < sizes[0]  # unseen values still land in the table
    # row groups sized from the split: 3,000 train rows -> 256-row groups, not one 65,536-row group
    assert schema.extra["row_group_rows"] == {"train": 256, "valid": 256, "test": 256}
    assert _row_groups(tmp_path / "out", "train") == [256] * 11 + [3000 - 11 * 256]


def test_a_10k_line_file_with_default_flags(tmp_path):
    src = write_tsv(tmp_path / "day_0_first10k.tsv", criteo_lines(10_000))
    out = tmp_path / "data"
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "recsys"), "prepare", "criteo", "--input", src, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    schema = DatasetSchema.load(out)
    vocab = np.load(out / "vocabulary.npz")
    assert [f.num_embeddings for f in schema.sparse] == [len(vocab[f"cat_{j}"]) + 2 for j in range(26)]
    assert set(schema.extra["min_count"].values()) == {2}
    assert sum(f.num_embeddings for f in schema.sparse) <= 26 * (CRITEO_VOCAB + 2)  # not 26 x 10M
    summary = [line for line in done.stdout.splitlines() if "tables (vocabulary" in line]
    assert len(summary) == 1 and "cat_25" in summary[0]
    for split in ("train", "valid", "test"):  # several row groups a split, for 2 ranks x workers
        assert len(_row_groups(out, split)) >= 4, split


def test_fixed_hash_space_and_explicit_row_groups(tmp_path):
    lines = criteo_lines(3000)
    src = write_tsv(tmp_path / "day_0", lines)
    out = tmp_path / "fixed"
    argv = ["--input", src, "--out", str(out), "--hash-space", "fixed", "--num-embeddings", "1000"]
    assert prepare_main([*argv, "--row-group-rows", "300"]) == 0
    schema = DatasetSchema.load(out)
    assert [f.num_embeddings for f in schema.sparse] == [1000] * 26 and schema.extra["ids"] == "fixed hash"
    values = {int(line.split("\t")[14], 16) % 1000 for line in lines if line.split("\t")[14]}
    assert set(pq.read_table(out / "train").column("cat_0").to_numpy()) - {0} <= values  # MLPerf: value mod size
    assert set(_row_groups(out, "train")[:-1]) == {300}
    # fixed, auto row groups: split sizes estimated from the file size (no counting pass)
    assert prepare_main(["--input", src, "--out", str(tmp_path / "auto"), "--hash-space", "fixed"]) == 0
    auto = DatasetSchema.load(tmp_path / "auto")
    assert auto.extra["row_group_rows"] == {"train": 256, "valid": 256, "test": 256}
    assert len(_row_groups(tmp_path / "auto", "train")) >= 9
    # 26 sizes: fixed unless --hash-space fitted makes them caps
    sizes = ",".join(str(100 + j) for j in range(26))
    assert prepare_main(["--input", src, "--out", str(tmp_path / "per"), "--num-embeddings-per-feature", sizes]) == 0
    assert [f.num_embeddings for f in DatasetSchema.load(tmp_path / "per").sparse] == [100 + j for j in range(26)]
    capped = tmp_path / "capped"
    assert (
        prepare_main(
            ["--input", src, "--out", str(capped), "--num-embeddings-per-feature", sizes, "--hash-space", "fitted"]
        )
        == 0
    )
    assert [f.num_embeddings for f in DatasetSchema.load(capped).sparse] == [100 + j for j in range(26)]  # all capped
    with pytest.raises(SystemExit) as exit_code:
        prepare_main(["--input", src, "--out", str(tmp_path / "x"), "--min-count", "2", "--hash-space", "fixed"])
    assert exit_code.value.code == 2


def prepare_main(argv: list[str]) -> int:
    from data_pipeline.prepare import main

    return main("criteo", [*argv, "--workers", "1"])


def test_distinct_counts_exact_then_estimated():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**63, 3 * EXACT_LIMIT // 2).astype(np.uint64)
    small = [values[:600], values[300:1000], values[:10]]  # overlapping parts: 1,000 distinct
    parts = []
    for part in small:
        counter = DistinctCounter()
        for block in np.array_split(part, 3):
            counter.add(block)
        parts.append(counter.arrays(0))
    assert merge_distinct(parts, 0) == (1000, True)
    # more than EXACT_LIMIT: the HyperLogLog estimate, the same however the values are cut
    cuts = [np.array_split(values, 2), np.array_split(values, 5)]
    estimates = set()
    for cut in cuts:
        parts = []
        for part in cut:
            counter = DistinctCounter()
            counter.add(part)
            parts.append(counter.arrays(3))
        estimates.add(merge_distinct(parts, 3))
    ((count, exact),) = estimates
    assert not exact and count == pytest.approx(len(values), rel=0.03)


def test_auto_min_count():
    counts = np.array([9, 7, 7, 5, 3, 2, 2, 1, 1])
    assert auto_min_count(counts, 7) == 2  # the 7 values seen twice fit
    assert auto_min_count(counts, 6) == 3 and auto_min_count(counts, 4) == 4
    assert auto_min_count(counts, 2) == 8  # the two 7s tie: both out, not one


def test_table_size_rule_and_fitted_ids():
    assert [table_size(d, 10**7) for d in (0, 1, 2, 3, 8, 9, 500, 4096)] == [16, 16, 16, 32, 64, 128, 4096, 32768]
    assert table_size(10**7, 10**7) == 10**7 and table_size(100, 50) == 50
    aligned = np.arange(0, 1 << 30, 1 << 20, dtype=np.uint64)  # 1,024 values sharing their low 20 bits
    ids = fitted_ids(aligned, np.zeros(len(aligned), bool), 2048)
    assert ids.min() >= 1 and ids.max() < 2048 and len(np.unique(ids)) > 700  # spread, not one row
    assert len(np.unique(aligned % np.uint64(2048))) == 1  # what plain `mod` would have done
    assert (fitted_ids(aligned, np.ones(len(aligned), bool), 2048) == 0).all()
    assert len(np.unique(mix64(np.arange(10_000, dtype=np.uint64)))) == 10_000  # a bijection


def test_line_count_estimates(tmp_path):
    lines = criteo_lines(6000)
    plain, gz = write_tsv(tmp_path / "a.tsv", lines), write_tsv(tmp_path / "b.tsv.gz", lines)
    assert estimated_lines(gz) == 6000  # under 1 MB compressed: read whole
    assert estimated_lines(plain) == pytest.approx(6000, rel=0.05)  # 1.5 MB: from the first MB
