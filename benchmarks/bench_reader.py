"""Reader throughput and memory: our loader against raw pyarrow decoding of the same files.

    python benchmarks/bench_reader.py            # 24M Criteo-shaped rows, 4.6 GB (written once, ~2 min)
    python benchmarks/bench_reader.py --quick    # 4M rows, 0.8 GB, for a quick look

The dataset is cached under data/bench_reader/ (git-ignored) and reused while its spec matches:
label, 13 float32 dense, 26 int64 sparse (two multi-hot, a few nulls as in Criteo), uniform random
ids, row groups of 65,536 rows. Each measurement runs in a fresh child process while this process
samples the memory of the child's process tree (DataLoader workers included):

  raw pyarrow  `ParquetFile.read_row_group` of every row group, same columns, into Arrow tables that
               are dropped: decoding only, the floor. With K processes each reads every K-th row
               group with `use_threads=False`, one core each like our workers: the fair reference.
               "plain" opens files with pyarrow's defaults; "same opts" as our reader does
               (`pre_buffer=True`), so ours / "same opts" is our overhead alone. "default threads"
               (one process, Arrow's thread pool on every core) is shown for scale.
  ours         `RankLoader(ParquetBatches(..., num_workers=K, drop_last=True))` as the trainer builds
               it: ready `Batch(dense, KJT, labels, weights)` objects in the main process, value
               checks on; "shuffled" is the training setting (shuffle buffer on), "in order" reads
               as evaluation does.

Columns: rows/s (wall), CPU seconds per million rows summed over the process tree (steadier than
wall time on a shared machine), peak memory of the process tree (sum of PSS, sampled every 50 ms),
and ours / raw at the same K. The last rows read a quarter of the files, to show that the loader's
memory does not grow with the data. Timing covers starting the workers through the last batch; the
page cache is warmed first, so this measures decoding, not the disk.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.schema import SCHEMA_FILE, DatasetSchema, SparseFeature, SplitInfo  # noqa: E402

NUM_DENSE, NUM_SPARSE = 13, 26
MULTI_HOT = (24, 25)  # list<int64> columns, Poisson(3) ids per row (some empty)
NULL_DENSE, NULL_IDS = (2, 9), (3, 11)  # columns with a few nulls, as in Criteo


@dataclass(frozen=True)
class Spec:
    rows: int = 24_000_000
    files: int = 16
    row_group_rows: int = 65_536
    seed: int = 0


# ---- the dataset ---------------------------------------------------------------------------------


def _vocab() -> np.ndarray:
    return np.geomspace(10, 10_000_000, NUM_SPARSE).round().astype(np.int64)


def _row_group(rng: np.random.Generator, n: int) -> pa.Table:
    """n random Criteo-shaped rows; ids are uniform (hashed ids compress about as badly)."""
    vocab = _vocab()
    columns = {"label": pa.array((rng.random(n) < 0.25).astype(np.int8))}
    for j in range(NUM_DENSE):
        values = np.log1p(rng.exponential(5.0, n)).astype(np.float32)
        columns[f"int_{j}"] = pa.array(values, mask=rng.random(n) < 0.03 if j in NULL_DENSE else None)
    for f in range(NUM_SPARSE):
        if f in MULTI_HOT:
            offsets = np.r_[0, np.cumsum(rng.poisson(3, n))].astype(np.int32)
            ids = pa.array(rng.integers(0, vocab[f], offsets[-1]))
            columns[f"cat_{f}"] = pa.ListArray.from_arrays(pa.array(offsets), ids)
        else:
            ids = rng.integers(0, vocab[f], n)
            columns[f"cat_{f}"] = pa.array(ids, mask=rng.random(n) < 0.1 if f in NULL_IDS else None)
    return pa.table(columns)


def build(root: Path, spec: Spec) -> DatasetSchema:
    """Write the dataset (or reuse it if its spec matches): split "train" holds every file,
    split "quarter" links to the first quarter of them."""
    if (root / SCHEMA_FILE).is_file():
        schema = DatasetSchema.load(root)
        if schema.extra.get("bench_reader") == asdict(spec):
            return schema
    print(f"writing {spec.rows:,} rows to {root} (once) ...", flush=True)
    start = time.perf_counter()
    for split in ("train", "quarter"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for old in (root / split).glob("*.parquet"):
            old.unlink()
    file_rows = np.array_split(np.arange(spec.rows), spec.files)
    for i, rows in enumerate(file_rows):
        rng = np.random.default_rng([spec.seed, i])
        path = root / "train" / f"part-{i:05d}.parquet"
        with pq.ParquetWriter(path, _row_group(rng, 1).schema) as writer:
            for chunk in np.array_split(rows, -(-len(rows) // spec.row_group_rows)):
                writer.write_table(_row_group(rng, len(chunk)), row_group_size=len(chunk))
        if i < spec.files // 4:
            (root / "quarter" / path.name).symlink_to(Path("..") / "train" / path.name)
        print(f"  {path.name}: {len(rows):,} rows ({time.perf_counter() - start:.0f} s)", flush=True)
    vocab = _vocab()
    schema = DatasetSchema(
        root=root,
        name="bench_reader",
        label="label",
        dense=[f"int_{j}" for j in range(NUM_DENSE)],
        sparse=[SparseFeature(f"cat_{f}", int(vocab[f]), f in MULTI_HOT) for f in range(NUM_SPARSE)],
        splits={
            "train": SplitInfo("train", spec.rows),
            "quarter": SplitInfo("quarter", sum(len(r) for r in file_rows[: spec.files // 4])),
        },
        extra={"bench_reader": asdict(spec)},
    )
    schema.save()
    return schema


# ---- one measurement (runs in a child process) ---------------------------------------------------


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the loader's workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _raw_share(groups: list[tuple[str, int]], columns: list[str], use_threads: bool, options: dict) -> int:
    files: dict[str, pq.ParquetFile] = {}
    rows = 0
    for path, index in groups:
        if path not in files:
            files[path] = pq.ParquetFile(path, **options)
        rows += files[path].read_row_group(index, columns=columns, use_threads=use_threads).num_rows
    return rows


def _raw(job: dict, schema: DatasetSchema) -> int:
    groups = [(str(p), i) for p in schema.split_files(job["split"]) for i in range(pq.read_metadata(p).num_row_groups)]
    args = (schema.columns(), job["use_threads"], job["options"])
    if job["workers"] == 1:
        return _raw_share(groups, *args)
    with multiprocessing.get_context("fork").Pool(job["workers"]) as pool:
        shares = [groups[w :: job["workers"]] for w in range(job["workers"])]
        return sum(pool.starmap(_raw_share, [(share, *args) for share in shares]))


def _ours(job: dict, schema: DatasetSchema) -> tuple[int, float, float]:
    from data_pipeline.loader import RankLoader
    from data_pipeline.reader import ParquetBatches

    kwargs = dict(num_workers=job["workers"], shuffle=job["shuffle"], drop_last=True, seed=0)
    if "shuffle_buffer_rows" in inspect.signature(ParquetBatches).parameters:  # absent before this benchmark
        kwargs["shuffle_buffer_rows"] = job["shuffle_buffer_rows"]
    loader = RankLoader(ParquetBatches(schema, job["split"], job["batch_size"], **kwargs))
    start_cpu, start = _cpu_seconds(), time.perf_counter()
    rows = sum(batch.batch_size for batch in loader)  # the workers are joined when the iterator ends
    return rows, time.perf_counter() - start, _cpu_seconds() - start_cpu


def measure(job: dict) -> dict:
    schema = DatasetSchema.load(job["data"])
    if job["kind"] == "ours":
        rows, wall, cpu = _ours(job, schema)
    else:
        start_cpu, start = _cpu_seconds(), time.perf_counter()
        rows = _raw(job, schema)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - start_cpu
    return {"rows": rows, "wall": wall, "cpu": cpu}


# ---- the driver ----------------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # the process ended meanwhile
                todo += [int(c) for c in children.read_text().split()]
    return pids


def _pss_mb(pids: list[int]) -> float:
    """Sum of proportional set sizes: shared pages (forked workers, shared-memory batches) count once."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run(job: dict) -> dict:
    """Run one measurement in a fresh process, sampling its process tree's memory meanwhile."""
    with tempfile.TemporaryFile("w+") as err:  # shown only on failure (torch's import chatter otherwise)
        child = subprocess.Popen(
            [sys.executable, __file__, "--measure", json.dumps(job)], stdout=subprocess.PIPE, stderr=err, text=True
        )
        peak = 0.0
        while child.poll() is None:
            peak = max(peak, _pss_mb(_tree(child.pid)))
            time.sleep(0.05)
        out = child.stdout.read()
        if child.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{err.read()}\nmeasurement {job} failed (exit {child.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4M rows in 8 files instead of the full size")
    parser.add_argument("--rows", type=int, help=f"dataset rows (default {Spec.rows:,}; --quick 4,000,000)")
    parser.add_argument("--files", type=int, help=f"files (default {Spec.files}; --quick 8)")
    parser.add_argument("--row-group-rows", type=int, default=Spec.row_group_rows)
    parser.add_argument("--data", default=str(ROOT / "data" / "bench_reader"), help="cache directory")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--shuffle-buffer-rows", type=int, default=131_072, help="default: data.shuffle_buffer_rows's")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="measure 1..N loader workers")
    parser.add_argument("--repeats", type=int, default=1, help="best of N runs per row")
    parser.add_argument("--only", help="run only the rows whose label contains this text")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return

    spec = Spec(
        rows=args.rows or (4_000_000 if args.quick else Spec.rows),
        files=args.files or (8 if args.quick else Spec.files),
        row_group_rows=args.row_group_rows,
    )
    root = Path(args.data) / f"rows{spec.rows}-files{spec.files}-rg{spec.row_group_rows}"
    schema = build(root, spec)
    files = schema.split_files("train")
    size_gb = sum(p.stat().st_size for p in files) / 1e9
    groups = sum(pq.read_metadata(p).num_row_groups for p in files)
    for path in files:  # warm the page cache: the runs below measure decoding, not the disk
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    print(
        f"{root}: {spec.rows:,} rows, {len(files)} files, {groups} row groups, {size_gb:.1f} GB; "
        f"batch {args.batch_size}, shuffle buffer {args.shuffle_buffer_rows:,} rows; {os.cpu_count()} cores"
    )

    base = {"data": str(root), "batch_size": args.batch_size, "shuffle_buffer_rows": args.shuffle_buffer_rows}
    plain = {"kind": "raw", "use_threads": False, "options": {}}
    same = {"kind": "raw", "use_threads": False, "options": {"pre_buffer": True}}
    rows = []  # (label, workers, split, job)
    for k in range(1, args.workers + 1):
        rows += [
            ("raw pyarrow, plain", k, "train", plain),
            ("raw pyarrow, same opts", k, "train", same),
            ("ours, shuffled", k, "train", {"kind": "ours", "shuffle": True}),
            ("ours, in order", k, "train", {"kind": "ours", "shuffle": False}),
        ]
    rows += [("raw pyarrow, default threads", 1, "train", {**plain, "use_threads": True})]
    rows += [
        ("ours, shuffled, 1/4 of the files", k, "quarter", {"kind": "ours", "shuffle": True}) for k in (1, args.workers)
    ]

    print(
        f"{'reader':32s} {'workers':>7s} {'rows/s':>12s} {'CPU s/M rows':>13s} {'peak MB':>8s}  "
        f"ours/raw at equal workers, by wall time (by CPU time): vs plain, vs same opts"
    )
    results: dict[tuple[str, int, str], dict] = {}
    for label, k, split, job in rows:
        if args.only and args.only not in label and not label.startswith("raw pyarrow, plain"):
            continue
        best = None
        for _ in range(args.repeats):
            r = run({**base, **job, "workers": k, "split": split})
            if best is None or r["wall"] < best["wall"]:
                best = {**r, "peak_mb": max(r["peak_mb"], best["peak_mb"] if best else 0)}
        best["rate"], best["cpu_rate"] = best["rows"] / best["wall"], best["rows"] / best["cpu"]
        results[label, k, split] = best
        ratio = ""
        if label.startswith("ours") and split == "train":
            ratio = "  " + ", ".join(
                f"{best['rate'] / raw['rate']:.2f}x ({best['cpu_rate'] / raw['cpu_rate']:.2f}x)"
                for raw in (results.get((name, k, split)) for name in ("raw pyarrow, plain", "raw pyarrow, same opts"))
                if raw
            )
        print(
            f"{label:32s} {k:>7d} {best['rate']:>12,.0f} {best['cpu'] / best['rows'] * 1e6:>13.2f} "
            f"{best['peak_mb']:>8.0f}{ratio}",
            flush=True,
        )


if __name__ == "__main__":
    main()
