"""Loader throughput against raw pyarrow decoding of the same files, measured in one run.

    python benchmarks/loader_vs_pyarrow.py --data data/synthetic --batch-size 2048

Prints rows/s of (a) pyarrow reading every row group of the train split (the floor: decode only)
and (b) our ParquetBatches producing Batch(dense, KJT, labels) from the same row groups, and their
ratio. In-process (no workers), one rank, so the ratio is the conversion overhead alone.
"""

from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq

from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DatasetSchema


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    schema = DatasetSchema.load(args.data)
    dataset = ParquetBatches(schema, "train", args.batch_size, shuffle=False, drop_last=True)
    columns = schema.columns()

    def raw() -> int:
        rows = 0
        for group in dataset.row_groups:
            rows += pq.ParquetFile(group.file).read_row_group(group.index, columns=columns).num_rows
        return rows

    def ours() -> int:
        return sum(batch.batch_size for batch in dataset)

    best = {}
    for name, fn in (("pyarrow", raw), ("loader", ours)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            rows = fn()
            times.append(time.perf_counter() - start)
        best[name] = rows / min(times)
        print(f"{name:8s} {best[name]:>12,.0f} rows/s  ({rows:,} rows, best of {args.repeats})")
    print(f"loader / pyarrow = {best['loader'] / best['pyarrow']:.2f}")


if __name__ == "__main__":
    main()
