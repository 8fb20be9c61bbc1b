"""Shared fixtures: small real Parquet datasets written by the tests, and a torchrun helper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.schema import DatasetSchema, SparseFeature, SplitInfo

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
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


TINY_SPARSE = [SparseFeature("a", 10), SparseFeature("m", 8, multi_hot=True)]


def run_trainer(args: list[str], nproc: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the per-rank entry, under torchrun when nproc > 0, from the repository root."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "-m", "trainer", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
