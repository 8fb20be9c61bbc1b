"""Criteo click logs (Kaggle Display Advertising / Terabyte) -> our Parquet dataset.

    recsys prepare criteo --input day_0_first10k.tsv --out data/criteo-small   # a vocabulary of the train values
    recsys prepare criteo --input train.txt --out data/criteo-kaggle --hash-space fixed   # MLPerf: 26 x 10M rows
    recsys prepare criteo --input 'day_*.gz' --test-files day_23.gz --out data/criteo-tb --min-count 3
    torchx run -s local_cwd dist.ddp -j 4x1 -m data_pipeline.prepare.criteo -- --input 'day_*.gz' --out D

Input: one example per line, 40 tab-separated fields: label (0/1), 13 integer counts (may be
negative or empty), 26 categorical values as hex strings (may be empty); `.gz` files are read as is.

Output columns (the names the synthetic data uses too): `label` (int8), `int_0..int_12` (float32,
missing -> 0, then `log1p(max(x, 0))` unless `--dense-transform none`), `cat_0..cat_25` (int64 ids):
  - vocabulary (the default): a first pass counts every value on the train split; values seen at
    least T times get ids 2.. (in value order), rarer or unseen values share id 1, missing is id 0.
    T = --min-count, by default 2, raised for a feature whose vocabulary would not fit in
    --num-embeddings (10M) rows until it does (`criteo_sizes.VOCABULARY_RULE`);
  - fitted hashing (`--hash-space fitted`): the first pass counts each feature's distinct values on
    the train split (exactly, or by a bounded sketch when there are many) and sizes its table to
    them (`criteo_sizes.RULE`: 8 x the distinct count rounded up to a power of two, at least 16, at
    most --num-embeddings); id 0 = missing, id = 1 + splitmix64(value) mod (size - 1) otherwise;
  - fixed hashing (`--hash-space fixed`, MLPerf, no first pass): id = int(hex, 16) mod
    num_embeddings, every table --num-embeddings rows (10M, MLPerf's `max_ind_range`) or the 26
    sizes of --num-embeddings-per-feature; a missing value is id 0 (MLPerf fills it with 0).
Values that are not hex (or longer than 16 digits) are read as their 64-bit FNV-1a hash instead.

Why a vocabulary by default: on small data it gave the best held-out AUC of the three (values seen
once share the rare id with values never seen, so that id is trained for what test rows bring), and
its tables hold only what train holds. Its first pass keeps every distinct value with its count
(memory and disk grow with them); for Terabyte-scale inputs --hash-space fitted bounds the count,
and --hash-space fixed needs no first pass.

How the work is split: every input file is cut into units (uncompressed files into ~256 MB byte
ranges at line boundaries, gzip files whole), fixed by the file sizes alone, so the output and the
split of each row do not depend on how many processes run. Units run in a process pool (all cores);
under torchrun/TorchX (WORLD_SIZE > 1) each replica takes every W-th unit and the replicas meet at
gloo barriers between passes, with rank 0 merging the first pass's counts into the table sizes (or
the vocabulary) and the row group sizes (`criteo_sizes.make_plan`).

Row groups: --row-group-rows auto (default) sizes each split's row groups from its row count
(`output.row_group_size`: about 64 groups a split, 256..65,536 rows each; the counts come from the
first pass, or are estimated from the file sizes with --hash-space fixed), so a small file still
gives every rank and loader worker several row groups; an explicit number applies to every split.

Splits: files matching `--test-files` / `--valid-files` (globs on the file name) go to test / valid;
with only `--test-files`, each test row goes to valid or test with probability 1/2. Otherwise every
row is assigned to train/valid/test by a seeded random draw (`--split-fractions`, default 0.8,0.1,0.1).

Safety: each unit's Parquet files are written under temporary names and renamed when the unit is
complete, followed by a small manifest; an interrupted run started again with the same arguments
skips finished units. `dataset.json` is written last. Malformed lines (wrong field count, a label
that is not 0/1, a non-integer count) are skipped and reported with file and line number; more than
`--max-bad-rows` of them (default 0) stops the run with that report.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare.criteo_parse import (
    DENSE,
    LABEL,
    MAX_REPORTED,
    NUM_SPARSE,
    SPARSE,
    BadRows,
    Parsed,
    Unit,
    UnitParser,
    UnitReport,
    line_examples,
    plan_units,
)
from data_pipeline.prepare.criteo_sizes import PLAN_FILE, count_unit, fitted_ids, make_plan
from data_pipeline.prepare.output import (
    FIRST_ID,
    MISSING_ID,
    RARE_ID,
    DatasetOutput,
    input_identity,
    write_json,
)
from data_pipeline.schema import SPLITS, DataError, DatasetSchema, SparseFeature, SplitInfo

VERSION = 2  # bump when the output of the same inputs and options changes
IDS = ("vocabulary", "fitted", "fixed")


@dataclass(frozen=True)
class CriteoOptions:
    inputs: list[str]
    num_embeddings: list[int] = field(default_factory=lambda: [10_000_000] * NUM_SPARSE)
    """The table size of each of the 26 features with fixed hashing (MLPerf's max_ind_range,
    torchrec's num_embeddings_per_feature); the cap on it for a vocabulary (auto threshold) and
    fitted hashing."""
    ids: str = "vocabulary"
    """vocabulary: train values seen >= min_count times; fitted: hashed into tables sized to the
    train split's distinct values (criteo_sizes.RULE); fixed: hashed into num_embeddings rows."""
    min_count: int = 0
    """Vocabulary: values seen at least this often on train get ids; 0 = auto (2, raised per
    feature until its vocabulary fits num_embeddings)."""
    dense_transform: str = "log1p"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    valid_files: str | None = None
    test_files: str | None = None
    seed: int = 0
    max_bad_rows: int = 0
    row_group_rows: int = 0
    """Rows per Parquet row group; 0 = auto, from each split's row count (output.row_group_size)."""
    chunk_bytes: int = 256 << 20
    workers: int = 0
    """Processes per replica; 0 = every core."""

    def provenance(self) -> dict:
        settings = asdict(self)
        for key in ("inputs", "workers", "max_bad_rows"):  # not what is written
            settings.pop(key)
        return {"criteo": settings, "version": VERSION, "inputs": input_identity([Path(p) for p in self.inputs])}


# ---- the two passes over one unit (run in worker processes) --------------------------------------


def _ids(parsed: Parsed, vocab: list[np.ndarray] | None, sizes: list[int], mode: str) -> np.ndarray:
    ids = np.empty(parsed.values.shape, np.int64)
    for j in range(NUM_SPARSE):
        values = parsed.values[:, j]
        if vocab is None and mode == "fitted":
            ids[:, j] = fitted_ids(values, parsed.missing[:, j], sizes[j])
        elif vocab is None:
            ids[:, j] = np.where(parsed.missing[:, j], 0, values % np.uint64(sizes[j])).astype(np.int64)
        else:
            known = vocab[j]
            index = np.searchsorted(known, values).clip(max=max(len(known) - 1, 0))
            found = known[index] == values if len(known) else np.zeros(len(values), bool)
            ids[:, j] = np.where(parsed.missing[:, j], MISSING_ID, np.where(found, index + FIRST_ID, RARE_ID))
    return ids


def _table(parsed: Parsed, ids: np.ndarray, rows: np.ndarray) -> pa.Table:
    columns = {LABEL: pa.array(parsed.label[rows], pa.int8())}
    columns.update({name: pa.array(parsed.dense[rows, j]) for j, name in enumerate(DENSE)})
    columns.update({name: pa.array(ids[rows, j]) for j, name in enumerate(SPARSE)})
    return pa.table(columns)


def write_unit(unit: Unit, opts: CriteoOptions, out: str, sizes: list[int], groups: dict[str, int]) -> UnitReport:
    """Pass 2: write one unit's rows into per-split Parquet files (row groups of `groups[split]`
    rows), then its manifest."""
    vocab = None
    if opts.ids == "vocabulary":
        with np.load(Path(out) / "vocabulary.npz") as saved:
            vocab = [saved[name] for name in SPARSE]
    parser = UnitParser(unit, opts)
    finals = {s: Path(out) / s / f"part-{unit.key}.parquet" for s in SPLITS}
    temps = {s: p.with_name(f".{p.name}.tmp-{os.getpid()}") for s, p in finals.items()}
    writers: dict[str, pq.ParquetWriter] = {}
    pending: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
    try:
        for parsed in parser:
            ids = _ids(parsed, vocab, sizes, opts.ids)
            for index, split in enumerate(SPLITS):
                rows = np.flatnonzero(parsed.split == index)
                if len(rows) == 0:
                    continue
                pending[split].append(_table(parsed, ids, rows))
                parser.report.rows[split] += len(rows)
                if sum(t.num_rows for t in pending[split]) >= groups[split]:
                    _flush(pending, split, writers, temps, groups[split], final=False)
        for split in SPLITS:
            _flush(pending, split, writers, temps, groups[split], final=True)
            if split in writers:
                writers.pop(split).close()
                os.replace(temps[split], finals[split])
    except BaseException:
        for writer in writers.values():
            writer.close()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    report = parser.finish()
    write_json(asdict(report), Path(out) / "_units" / f"{unit.key}.json")
    return report


def _flush(pending, split, writers, temps, row_group_rows: int, final: bool) -> None:
    if not pending[split]:
        return
    table = pa.concat_tables(pending[split]).combine_chunks()
    keep = table.num_rows if final else table.num_rows - table.num_rows % row_group_rows
    if keep:
        if split not in writers:
            writers[split] = pq.ParquetWriter(temps[split], table.schema)
        writers[split].write_table(table.slice(0, keep), row_group_size=row_group_rows)
    pending[split] = [table.slice(keep)] if keep < table.num_rows else []


# ---- orchestration ---------------------------------------------------------------------------------


class _Replicas:
    """This process's place among the replicas of a TorchX/torchrun job (a world of 1 otherwise)."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1:
            from datetime import timedelta

            import torch.distributed as dist

            # Replicas wait at barriers while others finish whole gzip files or rank 0 merges
            # the vocabulary: far longer than the default 30 minutes on Terabyte-sized inputs.
            dist.init_process_group("gloo", timeout=timedelta(hours=24))

    def agree(self, ok: bool) -> bool:
        """A barrier that also tells every replica whether all of them succeeded."""
        if self.world == 1:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        return int(flag) == 0

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_units(fn, units: list[Unit], opts: CriteoOptions, out: str, done: str, label: str, show: bool, *args) -> None:
    """Run `fn(unit, opts, out, *args)` in a process pool over the units whose `done` file
    (a format string of the unit key, under `out`) does not exist yet."""
    todo = [u for u in units if not (Path(out) / done.format(u.key)).exists()]
    if len(todo) < len(units) and show:
        print(f"  {label}: {len(units) - len(todo)} of {len(units)} units already done, resuming")
    workers = min(opts.workers or os.cpu_count() or 1, max(len(todo), 1))
    bar = tqdm(total=sum(u.size for u in todo), unit="B", unit_scale=True, desc=label, disable=not show or not todo)
    with bar, ProcessPoolExecutor(workers) as pool:
        running = {pool.submit(fn, u, opts, out, *args): u for u in todo}
        try:
            _collect(running, bar, opts)
        except BaseException:
            # fail now, not after every queued unit; wait for the running ones: shutdown(wait=False)
            # leaves the pool's manager thread running, and Python 3.11's exit hook then races it
            # for the wakeup pipe ("OSError: Bad file descriptor" after the error line, seen under load)
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _collect(running: dict, bar, opts: CriteoOptions) -> None:
    """Wait for the units; stop at the first error or when malformed lines pass the limit."""
    bad = 0
    while running:
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            unit = running.pop(future)
            report = future.result()  # re-raises BadRows / DataError from the worker
            bar.update(unit.size)
            bad += report.bad
            if bad > opts.max_bad_rows:
                raise BadRows(
                    f"{bad} malformed lines so far (more than --max-bad-rows {opts.max_bad_rows}): "
                    + "; ".join(line_examples(unit, report.examples))
                )


def _inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise DataError(f"--input {pattern}: no file matches")
        for path in matched:
            if not os.path.isfile(path):
                raise DataError(f"--input {path}: no such file")
            if os.path.getsize(path) == 0:
                raise DataError(f"--input {path}: the file is empty")
        files += matched
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


def prepare(opts: CriteoOptions, out: str | Path, overwrite: bool = False, log=print) -> DatasetSchema:
    """Convert `opts.inputs` into the dataset at `out` (on every replica under torchrun; see the
    module docstring)."""
    out = str(out)
    files = _inputs(opts.inputs)
    opts = CriteoOptions(**{**asdict(opts), "inputs": files})
    if len(opts.num_embeddings) != NUM_SPARSE or min(opts.num_embeddings) <= 0:
        raise DataError(f"--num-embeddings-per-feature needs {NUM_SPARSE} positive sizes")
    if opts.ids not in IDS:
        raise DataError(f"ids must be one of {', '.join(IDS)}, not '{opts.ids}'")
    if opts.min_count and opts.ids != "vocabulary":
        raise DataError("--min-count builds a vocabulary; --hash-space is for hashing: pass one of them")
    if opts.row_group_rows < 0:
        raise DataError("--row-group-rows must be a positive number of rows or auto")
    output = DatasetOutput(out, opts.provenance(), overwrite)
    replicas = _Replicas()
    main = replicas.rank == 0
    try:
        existing = output.up_to_date()
        if existing is not None:
            if main:
                log(f"{out}: up to date; not prepared again")
            return existing
        error: BaseException | None = None
        if main:
            try:
                resuming = output.start()
                for sub in (*SPLITS, "_units", "_counts"):
                    (Path(out) / sub).mkdir(exist_ok=True)
                log(f"criteo: {len(files)} input files -> {out}{' (resuming)' if resuming else ''}")
            except BaseException as e:
                error = e
        if not replicas.agree(error is None):
            raise error or DataError("replica 0 could not claim the output directory")
        units = plan_units(files, opts.chunk_bytes)
        mine = units[replicas.rank :: replicas.world]
        if opts.ids != "fixed":
            error = _guard(lambda: _run_units(count_unit, mine, opts, out, "_counts/{}.npz", "count values", main))
            if not replicas.agree(error is None):
                raise error or DataError("another replica failed while counting values")
        if main:
            error = _guard(lambda: make_plan(units, opts, out, log))
        if not replicas.agree(error is None):
            raise error or DataError("replica 0 failed to size the tables")
        plan = json.loads((Path(out) / PLAN_FILE).read_text())
        sizes, groups = plan["sizes"], plan["row_group_rows"]
        error = _guard(
            lambda: _run_units(write_unit, mine, opts, out, "_units/{}.json", "write parquet", main, sizes, groups)
        )
        if not replicas.agree(error is None):
            raise error or DataError("another replica failed while writing")
        if main:
            error = _guard(lambda: _finish(output, units, opts, plan, log))
        if not replicas.agree(error is None):
            raise error or DataError("replica 0 failed to finish the dataset")
        return DatasetSchema.load(out)
    finally:
        replicas.close()


def _guard(fn) -> BaseException | None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - handed to every replica, then re-raised
        return e
    return None


def _finish(output: DatasetOutput, units: list[Unit], opts: CriteoOptions, plan: dict, log) -> DatasetSchema:
    rows = dict.fromkeys(SPLITS, 0)
    bad, lines, examples = 0, 0, []
    for unit in units:
        report = json.loads((output.root / "_units" / f"{unit.key}.json").read_text())
        for split in SPLITS:
            rows[split] += report["rows"][split]
        bad += report["bad"]
        lines += report["lines"]
        if len(examples) < MAX_REPORTED:
            examples += line_examples(unit, report["examples"], MAX_REPORTED)
    for split in SPLITS:
        if rows[split] == 0:
            raise DataError(f"split '{split}' would be empty: check --split-fractions / --valid-files / --test-files")
    schema = DatasetSchema(
        root=output.root,
        name="criteo",
        label=LABEL,
        dense=list(DENSE),
        sparse=[SparseFeature(name, int(size)) for name, size in zip(SPARSE, plan["sizes"])],
        splits={s: SplitInfo(path=s, rows=rows[s]) for s in SPLITS},
        extra={
            **{k: v for k, v in plan.items() if k not in ("sizes", "split_rows", "split_rows_estimated")},
            "vocabulary": "vocabulary.npz" if opts.ids == "vocabulary" else None,
            "lines": lines,
            "malformed_lines": bad,
            "malformed_examples": examples[:MAX_REPORTED],
        },
    )
    schema = output.finish(schema)
    (output.root / PLAN_FILE).unlink(missing_ok=True)
    for sub in ("_units", "_counts"):
        for path in (output.root / sub).glob("*"):
            path.unlink()
        (output.root / sub).rmdir()
    for leftover in output.root.glob("*/.*.tmp-*"):  # from workers killed mid-write (SIGKILL, OOM)
        leftover.unlink()
    log(f"  {lines:,} lines: " + ", ".join(f"{s} {rows[s]:,}" for s in SPLITS) + f"; {bad} malformed lines skipped")
    for example in examples[:5]:
        log(f"    {example}")
    return schema


# ---- command line -----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _count(text: str) -> int:
    if text.strip().lower() == "auto":
        return 0
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError("a count >= 1 or auto (to hash instead: --hash-space fitted or fixed)")
    return count


def _rows(text: str) -> int:
    if text.strip().lower() == "auto":
        return 0
    rows = int(text)
    if rows < 1:
        raise argparse.ArgumentTypeError("a positive number of rows or auto")
    return rows


def parse(argv: list[str]) -> tuple[CriteoOptions, str, bool]:
    """`recsys prepare criteo` flags -> (options, out, overwrite)."""
    parser = argparse.ArgumentParser(
        prog="recsys prepare criteo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True, help="TSV files or globs (.gz allowed)")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument(
        "--hash-space",
        choices=IDS[1:],
        help="hash the values instead of building a vocabulary (the default): fitted: each table sized to "
        "its feature's distinct train values, min(--num-embeddings, max(16, next power of two >= 8 x distinct)); "
        "fixed: every table --num-embeddings rows, id = value mod size (MLPerf; the default with "
        "--num-embeddings-per-feature)",
    )
    parser.add_argument(
        "--num-embeddings",
        type=int,
        default=10_000_000,
        help="the cap on each table (vocabulary, fitted hashing); with --hash-space fixed the rows of every "
        "table (MLPerf max_ind_range) (default %(default)s)",
    )
    parser.add_argument(
        "--num-embeddings-per-feature",
        type=_ints,
        help="26 comma-separated table sizes (fixed hashing; with --hash-space fitted, the 26 caps)",
    )
    parser.add_argument(
        "--min-count",
        type=_count,
        default=0,
        metavar="T|auto",
        help="vocabulary: values seen >= T times on train get ids (default auto: 2, raised per feature "
        "until its vocabulary fits --num-embeddings)",
    )
    parser.add_argument("--dense-transform", choices=["log1p", "none"], default="log1p")
    parser.add_argument(
        "--split-fractions", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.8, 0.1, 0.1)
    )
    parser.add_argument("--valid-files", help="glob on file names that make the valid split")
    parser.add_argument("--test-files", help="glob on file names that make the test split (Terabyte: day_23*)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-bad-rows", type=int, default=0, help="malformed lines to skip before failing")
    parser.add_argument(
        "--row-group-rows",
        type=_rows,
        default=0,
        metavar="N|auto",
        help="rows per Parquet row group (default auto: about 64 a split, 256..65,536 rows each)",
    )
    parser.add_argument(
        "--chunk-mb", type=float, default=256, help="uncompressed files are split into units of this size"
    )
    parser.add_argument("--workers", type=int, default=0, help="processes per replica (0: every core)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset at --out")
    args = parser.parse_args(argv)
    if len(args.split_fractions) != 3 or abs(sum(args.split_fractions) - 1) > 1e-6 or min(args.split_fractions) < 0:
        parser.error("--split-fractions needs three non-negative fractions that sum to 1")
    if args.min_count and (args.hash_space or args.num_embeddings_per_feature):
        parser.error(
            "--min-count builds a vocabulary; --hash-space and --num-embeddings-per-feature are for hashing: "
            "pass one of them"
        )
    ids = args.hash_space or ("fixed" if args.num_embeddings_per_feature else "vocabulary")
    opts = CriteoOptions(
        inputs=args.input,
        num_embeddings=args.num_embeddings_per_feature or [args.num_embeddings] * NUM_SPARSE,
        ids=ids,
        min_count=args.min_count,
        dense_transform=args.dense_transform,
        split_fractions=args.split_fractions,
        valid_files=args.valid_files,
        test_files=args.test_files,
        seed=args.seed,
        max_bad_rows=args.max_bad_rows,
        row_group_rows=args.row_group_rows,
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
        workers=args.workers,
    )
    return opts, args.out, args.overwrite


if __name__ == "__main__":
    sys.exit(prepare_main("criteo", sys.argv[1:]))
