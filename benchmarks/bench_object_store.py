"""The reader on an object store against the same files on local disk, in one run.

    python benchmarks/bench_object_store.py              # 400k synthetic rows, row groups of 16k
    python benchmarks/bench_object_store.py --rows 2000000 --row-group-rows 65536

The store is a real S3 API server on loopback (moto's server mode, the tests' one): no network
latency, but every request goes through HTTP, s3fs and its buffering, which is what this measures.
One rank reads the train split shuffled as training does (`ParquetBatches`, no loader workers),
best of `--repeats`; the ratio is s3 / local rows per second. On a real bucket add a round trip per
row group.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.reader import ParquetBatches  # noqa: E402
from data_pipeline.schema import DatasetSchema  # noqa: E402
from tests.helpers.data import synthetic  # noqa: E402
from tests.helpers.object_store import s3_server, upload  # noqa: E402


def read(source: str | Path, batch_size: int) -> tuple[float, float]:
    """(rows/s, sum of the labels: the same on both sides, or they read different data)."""
    schema = DatasetSchema.load(source)
    start, rows, labels = time.perf_counter(), 0, 0.0
    for batch in ParquetBatches(schema, "train", batch_size, shuffle=True):
        rows += batch.batch_size
        labels += float(batch.labels.sum())
    return rows / (time.perf_counter() - start), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--row-group-rows", type=int, default=16_384)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, s3_server():
        local = Path(folder) / "data"
        synthetic(local, rows=args.rows, row_group_rows=args.row_group_rows, files=4)
        remote = upload(local, "bench")
        best = {"local": 0.0, "s3": 0.0}
        for _ in range(args.repeats):  # alternated, so a busy moment of the machine hits both
            for name, source in (("local", local), ("s3", remote)):
                rate, labels = read(source, args.batch_size)
                best[name] = max(best[name], rate)
                if name == "local":
                    expected = labels
                elif labels != expected:
                    sys.exit(f"error: s3 read labels summing to {labels}, the local files {expected}")
    print(f"{args.rows:,} rows, row groups of {args.row_group_rows:,}, batch {args.batch_size}, best of {args.repeats}")
    for name, rate in best.items():
        print(f"  {name:5s} {rate:12,.0f} rows/s")
    print(f"  s3 / local: {best['s3'] / best['local']:.2f}")


if __name__ == "__main__":
    main()
