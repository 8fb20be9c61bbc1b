"""Real datasets the tests write: Parquet files plus dataset.json, small synthetic click data with a
known answer, and Criteo-shaped raw lines."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from data_pipeline.schema import DatasetSchema, SparseFeature, SplitInfo

TINY_SPARSE = [SparseFeature("a", 10), SparseFeature("m", 8, multi_hot=True)]
"""The features of `tiny_table`: a scalar id column and a multi-hot column."""


def tiny_table() -> pa.Table:
    """5 rows: dense with a null, a scalar id column with a null, a multi-hot column with an
    empty list and a null list."""
    return pa.table(
        {
            "label": pa.array([1, 0, 1, 0, 1], pa.int8()),
            "d0": pa.array([0.5, None, 2.0, 3.0, 4.0], pa.float32()),
            "d1": pa.array([1.0, 2.0, 3.0, 4.0, 5.0], pa.float64()),
            "a": pa.array([3, None, 0, 9, 1], pa.int64()),
            "m": pa.array([[1, 2], [], None, [4], [5, 6, 7]], pa.list_(pa.int64())),
        }
    )


def write_dataset(
    root: Path,
    tables: dict[str, list[pa.Table]],
    sparse: list[SparseFeature],
    dense: list[str],
    row_group_rows: int = 1000,
) -> DatasetSchema:
    """Write `tables` (split -> one table per file) and a dataset.json describing them."""
    splits = {}
    for split, files in tables.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, table in enumerate(files):
            pq.write_table(table, root / split / f"part-{i:05d}.parquet", row_group_size=row_group_rows)
        splits[split] = SplitInfo(path=split, rows=sum(t.num_rows for t in files))
    schema = DatasetSchema(root=root, label="label", dense=dense, sparse=sparse, splits=splits)
    schema.save()
    return schema


def synthetic(root: Path, rows: int = 8000, **spec) -> DatasetSchema:
    """A small synthetic click dataset (`recsys prepare synthetic`), written quietly."""
    defaults = dict(files=2, row_group_rows=500, max_vocab=2000)
    return prepare_synthetic(SyntheticSpec(rows=rows, **{**defaults, **spec}), root, log=lambda *_: None)


CRITEO_VOCAB = 500
"""Distinct values per categorical column of `criteo_lines`."""


def criteo_lines(n: int, seed: int = 0) -> list[str]:
    """Criteo-shaped lines with a learnable click model: Zipf ids, skewed counts, empty fields."""
    rng = np.random.default_rng(seed)
    ids = rng.zipf(1.2, (n, 26)) % CRITEO_VOCAB
    effect = np.random.default_rng(99).normal(0, 1.0, (26, CRITEO_VOCAB))
    counts = rng.exponential(30, (n, 13)).astype(np.int64) - (rng.random((n, 13)) < 0.02) * 3
    logit = (
        -1.2 + effect[0, ids[:, 0]] + effect[1, ids[:, 1]] + effect[2, ids[:, 2]] + 0.3 * np.log1p(counts[:, 0].clip(0))
    )
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    empty_int = rng.random((n, 13)) < 0.1
    empty_cat = rng.random((n, 26)) < 0.05
    hexes = (ids * 2654435761 + np.arange(26)) & 0xFFFFFFFF
    lines = []
    for r in range(n):
        ints = ["" if empty_int[r, j] else str(counts[r, j]) for j in range(13)]
        cats = ["" if empty_cat[r, j] else f"{hexes[r, j]:08x}" for j in range(26)]
        lines.append("\t".join([str(labels[r]), *ints, *cats]))
    return lines


def write_tsv(path, lines) -> str:
    """Lines to a file (gzip when the name ends in .gz); returns its path."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def read_split(root, split) -> pa.Table:
    """A prepared split's rows in a fixed order, to compare two preparations."""
    return pq.read_table(os.path.join(root, split)).sort_by(
        [("int_0", "ascending"), ("cat_0", "ascending"), ("cat_1", "ascending")]
    )
