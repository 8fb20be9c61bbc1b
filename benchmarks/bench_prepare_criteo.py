"""`recsys prepare criteo` throughput against pyarrow's own CSV parse of the same file, in one run.

    python benchmarks/bench_prepare_criteo.py [--lines 4000000] [--workers 1 2]

Writes a Criteo-format TSV (cached under data/bench_criteo/), then times:
  - reference: `pyarrow.csv.open_csv` streaming every field as a string, single-threaded (what each
    of our worker processes runs before it converts anything), one process;
  - ours: `prepare()` in hash mode, for each worker count, output to a fresh directory.
Prints lines/s and MB/s of each and the ratio ours / reference.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from data_pipeline.prepare.criteo import CriteoOptions, prepare
from data_pipeline.prepare.criteo_parse import RAW_COLUMNS

CACHE = Path("data/bench_criteo")


def make_tsv(path: Path, lines: int, seed: int = 0) -> None:
    """Criteo-shaped lines, written with pyarrow's CSV writer (nulls become empty fields)."""
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink:
        writer = None
        for start in range(0, lines, 500_000):
            n = min(500_000, lines - start)
            columns = [pa.array(rng.integers(0, 2, n))]
            for _ in range(13):
                columns.append(pa.array(rng.exponential(40, n).astype(np.int64), mask=rng.random(n) < 0.1))
            for j in range(26):
                ids = (rng.zipf(1.15, n) * 2654435761 + j) & 0xFFFFFFFF
                columns.append(pa.array(np.char.mod("%08x", ids), mask=rng.random(n) < 0.05))
            table = pa.table(columns, names=RAW_COLUMNS)
            if writer is None:
                options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
                writer = pacsv.CSVWriter(sink, table.schema, write_options=options)
            writer.write_table(table)
        writer.close()
    tmp.rename(path)


def reference(path: Path) -> float:
    start = time.perf_counter()
    reader = pacsv.open_csv(
        str(path),
        read_options=pacsv.ReadOptions(column_names=RAW_COLUMNS, block_size=8 << 20, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in RAW_COLUMNS}, strings_can_be_null=True, null_values=[""]
        ),
    )
    for _ in reader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=4_000_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"train-{args.lines}.tsv"
    if not path.exists():
        print(f"writing {path} ...")
        make_tsv(path, args.lines)
    mb = path.stat().st_size / 2**20
    ref = reference(path)
    print(f"{args.lines:,} lines, {mb:,.0f} MB")
    print(f"{'':32s} {'lines/s':>12s} {'MB/s':>8s} {'ratio':>6s}")
    print(f"{'pyarrow CSV parse, 1 process':32s} {args.lines / ref:12,.0f} {mb / ref:8.1f} {1:6.2f}")
    for workers in args.workers:
        out = Path(tempfile.mkdtemp(prefix="bench_criteo_", dir=CACHE))
        shutil.rmtree(out)
        opts = CriteoOptions(inputs=[str(path)], num_embeddings=[1 << 20] * 26, workers=workers, chunk_bytes=64 << 20)
        start = time.perf_counter()
        prepare(opts, out, log=lambda *_: None)
        took = time.perf_counter() - start
        shutil.rmtree(out)
        print(
            f"{f'recsys prepare criteo, {workers} worker(s)':32s} {args.lines / took:12,.0f} "
            f"{mb / took:8.1f} {ref / took:6.2f}"
        )


if __name__ == "__main__":
    main()
